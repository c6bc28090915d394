//! Inception-v4 (paper Fig. 9), in the TF-slim / timm layout: `features.0 ..= features.21`,
//! then `last_linear`. The published layout matches the paper's figures block for block:
//! stem (Fig. 3) = `features.0..=5`, 4 x Inception-A (Fig. 4), Reduction-A (Fig. 7, k,l,m,n =
//! 192,224,256,384), 7 x Inception-B (Fig. 5), Reduction-B (Fig. 8), 3 x Inception-C (Fig. 6).

use burn::module::Module;
use burn::nn::pool::MaxPool2d;
use burn::tensor::{Device, Tensor};

use crate::layers::{
    ConvBnAct, FourBranch, Layer, ch, conv_chain, k, k1xn, knx1, max_pool_3s2, pool_proj, run_chain, run_layers,
};
use crate::models::{FeatureInfo, Head, Part, StageSpec, classifier};
use burn::nn::Linear;

/// Fig. 3, first split: 3x3 max pool || 3x3/2 conv 96, concatenated (pool first, 160 channels).
#[derive(Module, Debug)]
pub struct Mixed3a {
    pub maxpool: MaxPool2d,
    pub conv: ConvBnAct,
}

impl Mixed3a {
    pub fn new(width: f64, device: &Device) -> Self {
        let c = |n| ch(n, width);
        Self { maxpool: max_pool_3s2(), conv: ConvBnAct::new(c(64), c(96), k(3).s2(), device) }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(vec![self.maxpool.forward(x.clone()), self.conv.forward(x)], 1)
    }
}

/// Fig. 3, second split: 1x1 64 -> 3x3 96 || 1x1 64 -> 7x1 64 -> 1x7 64 -> 3x3 96 (192 channels).
#[derive(Module, Debug)]
pub struct Mixed4a {
    pub branch0: Vec<ConvBnAct>,
    pub branch1: Vec<ConvBnAct>,
}

impl Mixed4a {
    pub fn new(width: f64, device: &Device) -> Self {
        let c = |n| ch(n, width);
        let cin = c(64) + c(96); // Mixed3a: pool of 64 || conv 96 = 160
        Self {
            branch0: conv_chain(cin, &[(c(64), k(1)), (c(96), k(3))], device),
            branch1: conv_chain(cin, &[(c(64), k(1)), (c(64), k1xn(7)), (c(64), knx1(7)), (c(96), k(3))], device),
        }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(vec![run_chain(&self.branch0, x.clone()), run_chain(&self.branch1, x)], 1)
    }
}

/// Fig. 3, third split: 3x3/2 conv 192 || 3x3/2 max pool (384 channels).
#[derive(Module, Debug)]
pub struct Mixed5a {
    pub conv: ConvBnAct,
    pub maxpool: MaxPool2d,
}

impl Mixed5a {
    pub fn new(width: f64, device: &Device) -> Self {
        let c = |n| ch(n, width);
        let cin = c(96) + c(96); // Mixed4a: 96 || 96 = 192
        Self { conv: ConvBnAct::new(cin, c(192), k(3).s2(), device), maxpool: max_pool_3s2() }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(vec![self.conv.forward(x.clone()), self.maxpool.forward(x)], 1)
    }
}

/// Fig. 4, Inception-A on 35x35x384: 1x1 96 || 1x1 64 -> 3x3 96 || 1x1 64 -> 3x3 96 -> 3x3 96 ||
/// avg pool -> 1x1 96.
pub fn inception_a(cin: usize, width: f64, device: &Device) -> FourBranch {
    let c = |n| ch(n, width);
    FourBranch {
        branch0: ConvBnAct::new(cin, c(96), k(1), device),
        branch1: conv_chain(cin, &[(c(64), k(1)), (c(96), k(3).same())], device),
        branch2: conv_chain(cin, &[(c(64), k(1)), (c(96), k(3).same()), (c(96), k(3).same())], device),
        branch3: pool_proj(cin, c(96), device),
    }
}

/// Fig. 7, Reduction-A, shared by all three networks with their `(k, l, m, n)` (Table 1):
/// 3x3/2 conv n || 1x1 k -> 3x3 l -> 3x3/2 m || 3x3/2 max pool.
#[derive(Module, Debug)]
pub struct ReductionA {
    pub branch0: ConvBnAct,
    pub branch1: Vec<ConvBnAct>,
    pub branch2: MaxPool2d,
}

impl ReductionA {
    pub fn new(cin: usize, [k_, l, m, n]: [usize; 4], device: &Device) -> Self {
        Self {
            branch0: ConvBnAct::new(cin, n, k(3).s2(), device),
            branch1: conv_chain(cin, &[(k_, k(1)), (l, k(3).same()), (m, k(3).s2())], device),
            branch2: max_pool_3s2(),
        }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(
            vec![self.branch0.forward(x.clone()), run_chain(&self.branch1, x.clone()), self.branch2.forward(x)],
            1,
        )
    }
}

/// Fig. 5, Inception-B on 17x17x1024: 1x1 384 || 1x1 192 -> 1x7 224 -> 7x1 256 ||
/// 1x1 192 -> 7x1 192 -> 1x7 224 -> 7x1 224 -> 1x7 256 || avg pool -> 1x1 128.
pub fn inception_b(cin: usize, width: f64, device: &Device) -> FourBranch {
    let c = |n| ch(n, width);
    FourBranch {
        branch0: ConvBnAct::new(cin, c(384), k(1), device),
        branch1: conv_chain(cin, &[(c(192), k(1)), (c(224), k1xn(7)), (c(256), knx1(7))], device),
        branch2: conv_chain(
            cin,
            &[(c(192), k(1)), (c(192), knx1(7)), (c(224), k1xn(7)), (c(224), knx1(7)), (c(256), k1xn(7))],
            device,
        ),
        branch3: pool_proj(cin, c(128), device),
    }
}

/// Fig. 8, Reduction-B: 1x1 192 -> 3x3/2 192 || 1x1 256 -> 1x7 256 -> 7x1 320 -> 3x3/2 320 ||
/// 3x3/2 max pool (1536 channels).
#[derive(Module, Debug)]
pub struct ReductionB {
    pub branch0: Vec<ConvBnAct>,
    pub branch1: Vec<ConvBnAct>,
    pub branch2: MaxPool2d,
}

impl ReductionB {
    pub fn new(cin: usize, width: f64, device: &Device) -> Self {
        let c = |n| ch(n, width);
        Self {
            branch0: conv_chain(cin, &[(c(192), k(1)), (c(192), k(3).s2())], device),
            branch1: conv_chain(
                cin,
                &[(c(256), k(1)), (c(256), k1xn(7)), (c(320), knx1(7)), (c(320), k(3).s2())],
                device,
            ),
            branch2: max_pool_3s2(),
        }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(
            vec![run_chain(&self.branch0, x.clone()), run_chain(&self.branch1, x.clone()), self.branch2.forward(x)],
            1,
        )
    }
}

/// Fig. 6, Inception-C on 8x8x1536: 1x1 256 || 1x1 384 -> (1x3 256 | 3x1 256) ||
/// 1x1 384 -> 3x1 448 -> 1x3 512 -> (1x3 256 | 3x1 256) || avg pool -> 1x1 256.
#[derive(Module, Debug)]
pub struct InceptionC {
    pub branch0: ConvBnAct,
    pub branch1_0: ConvBnAct,
    pub branch1_1a: ConvBnAct,
    pub branch1_1b: ConvBnAct,
    pub branch2_0: ConvBnAct,
    pub branch2_1: ConvBnAct,
    pub branch2_2: ConvBnAct,
    pub branch2_3a: ConvBnAct,
    pub branch2_3b: ConvBnAct,
    pub branch3: Vec<Layer>,
}

impl InceptionC {
    pub fn new(cin: usize, width: f64, device: &Device) -> Self {
        let w = |n| ch(n, width);
        let c = |i, o, spec| ConvBnAct::new(i, o, spec, device);
        Self {
            branch0: c(cin, w(256), k(1)),
            branch1_0: c(cin, w(384), k(1)),
            branch1_1a: c(w(384), w(256), k1xn(3)),
            branch1_1b: c(w(384), w(256), knx1(3)),
            branch2_0: c(cin, w(384), k(1)),
            branch2_1: c(w(384), w(448), knx1(3)),
            branch2_2: c(w(448), w(512), k1xn(3)),
            branch2_3a: c(w(512), w(256), k1xn(3)),
            branch2_3b: c(w(512), w(256), knx1(3)),
            branch3: pool_proj(cin, w(256), device),
        }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x1 = self.branch1_0.forward(x.clone());
        let x2 = self.branch2_2.forward(self.branch2_1.forward(self.branch2_0.forward(x.clone())));
        Tensor::cat(
            vec![
                self.branch0.forward(x.clone()),
                self.branch1_1a.forward(x1.clone()),
                self.branch1_1b.forward(x1),
                self.branch2_3a.forward(x2.clone()),
                self.branch2_3b.forward(x2),
                run_layers(&self.branch3, x),
            ],
            1,
        )
    }
}

/// One entry of `features`; variants are invisible in parameter paths (`features.6.branch0...`).
// Built once per model; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum V4Block {
    Conv(ConvBnAct),
    Mixed3a(Mixed3a),
    Mixed4a(Mixed4a),
    Mixed5a(Mixed5a),
    InceptionA(FourBranch),
    ReductionA(ReductionA),
    InceptionB(FourBranch),
    ReductionB(ReductionB),
    InceptionC(InceptionC),
}

impl V4Block {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            V4Block::Conv(b) => b.forward(x),
            V4Block::Mixed3a(b) => b.forward(x),
            V4Block::Mixed4a(b) => b.forward(x),
            V4Block::Mixed5a(b) => b.forward(x),
            V4Block::InceptionA(b) => b.forward(x),
            V4Block::ReductionA(b) => b.forward(x),
            V4Block::InceptionB(b) => b.forward(x),
            V4Block::ReductionB(b) => b.forward(x),
            V4Block::InceptionC(b) => b.forward(x),
        }
    }
}

/// Inception-v4: `features` (stem + 4/7/3 blocks, 1536 channels at stride 32), global average
/// pool, `last_linear`.
#[derive(Module, Debug)]
pub struct InceptionV4 {
    pub features: Vec<V4Block>,
    pub last_linear: Option<Linear>,
    /// Channel multiplier (1.0 = the published network).
    pub width: f64,
}

/// The trunk's feature stages, as timm reports them: `features.0..=2` (the first convs of
/// Fig. 3), `3` (Mixed3a), `4..=9` (Mixed4a, Mixed5a, 4 x Inception-A), `10..=17` (Reduction-A,
/// 7 x Inception-B), `18..=21` (Reduction-B, 3 x Inception-C). The one place the v4 trunk is
/// grouped; `InceptionV4::new` writes the blocks in order.
pub fn stages(width: f64) -> Vec<StageSpec> {
    let c = |n| ch(n, width);
    let [a, b, cc] = widths(width);
    [(0..=2, c(64), 2), (3..=3, c(64) + c(96), 4), (4..=9, a, 8), (10..=17, b, 16), (18..=21, cc, 32)]
        .into_iter()
        .map(|(range, channels, reduction)| {
            let parts: Vec<String> = range.map(|i| format!("features.{i}")).collect();
            let module = parts.last().cloned().unwrap_or_default();
            StageSpec { info: FeatureInfo { module, channels, reduction }, parts }
        })
        .collect()
}

/// Output channels of the Inception-A, -B and -C stages (384, 1024, 1536 at width 1.0).
fn widths(width: f64) -> [usize; 3] {
    let c = |n| ch(n, width);
    [4 * c(96), c(384) + 2 * c(256) + c(128), 6 * c(256)]
}

impl InceptionV4 {
    pub fn new(num_classes: usize, width: f64, device: &Device) -> Self {
        let c = |n| ch(n, width);
        let mut f = vec![
            V4Block::Conv(ConvBnAct::new(3, c(32), k(3).s2(), device)),
            V4Block::Conv(ConvBnAct::new(c(32), c(32), k(3), device)),
            V4Block::Conv(ConvBnAct::new(c(32), c(64), k(3).same(), device)),
            V4Block::Mixed3a(Mixed3a::new(width, device)),
            V4Block::Mixed4a(Mixed4a::new(width, device)),
            V4Block::Mixed5a(Mixed5a::new(width, device)),
        ];
        let [a, b, cc] = widths(width);
        let stem = c(192) + 2 * c(96); // Mixed5a: conv 192 || pool of 96 + 96
        f.extend((0..4).map(|i| V4Block::InceptionA(inception_a(if i == 0 { stem } else { a }, width, device))));
        f.push(V4Block::ReductionA(ReductionA::new(a, [c(192), c(224), c(256), c(384)], device)));
        let red_a = c(384) + c(256) + a; // Fig. 7: n || m || pool
        f.extend((0..7).map(|i| V4Block::InceptionB(inception_b(if i == 0 { red_a } else { b }, width, device))));
        f.push(V4Block::ReductionB(ReductionB::new(b, width, device)));
        let red_b = c(192) + c(320) + b; // Fig. 8
        f.extend((0..3).map(|i| V4Block::InceptionC(InceptionC::new(if i == 0 { red_b } else { cc }, width, device))));
        Self { features: f, last_linear: classifier(cc, num_classes, device), width }
    }

    /// Run the part `features.N`.
    pub fn forward_part(&self, part: &str, x: Tensor<4>) -> Tensor<4> {
        let block =
            part.strip_prefix("features.").and_then(|i| i.parse::<usize>().ok()).and_then(|i| self.features.get(i));
        match block {
            Some(b) => b.forward(x),
            None => x,
        }
    }

    /// The blocks as named parts, consumed (for the fast engine's lowering), and the head.
    pub fn into_parts(self) -> (Vec<(String, Part)>, Head) {
        let parts = self
            .features
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let p = match b {
                    V4Block::Conv(c) => Part::Conv(c),
                    V4Block::Mixed3a(m) => Part::Mixed3a(m),
                    V4Block::Mixed4a(m) => Part::Mixed4a(m),
                    V4Block::Mixed5a(m) => Part::Mixed5a(m),
                    V4Block::InceptionA(b) | V4Block::InceptionB(b) => Part::FourBranch(b),
                    V4Block::ReductionA(r) => Part::ReductionA(r),
                    V4Block::ReductionB(r) => Part::ReductionB(r),
                    V4Block::InceptionC(c) => Part::InceptionC(c),
                };
                (format!("features.{i}"), p)
            })
            .collect();
        (parts, Head { bottleneck: None, classifier: self.last_linear })
    }
}
