//! Inception-ResNet-v1 and -v2 (paper Sec. 3.2, Figs. 10-19) as one trunk driven by a config
//! table. Two published layouts:
//! - IR-v2, TF-slim / timm (`inception_resnet_v2`): Inception-v3 style stem + `mixed_5b` (320 ch),
//!   10 x Block35, Reduction-A (256,256,384,384), 20 x Block17, Reduction-B, 9 x Block8 + a final
//!   Block8 without ReLU, `conv2d_7b` 1x1 to 1536, `classif`. Widths 320 / 1088 / 2080.
//! - IR-v1, facenet-pytorch (`inception_resnet_v1`): the paper's Fig. 14 stem, 5 x Block35,
//!   Reduction-A (192,192,256,384), 10 x Block17, Reduction-B, 5 + 1 Block8; widths 256 / 896 /
//!   1792; head `last_linear` (no bias) -> `last_bn` -> optional `logits`, embedding L2-normalised.
//!
//! Residual scale is a config value per stage (paper Sec. 3.3): 0.17 / 0.10 / 0.20 in both
//! references; the last Block8 uses 1.0 and no ReLU.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::FourBranch;
use crate::layers::{
    BN_EPS, ConvBnAct, ConvSpec, ch, conv_bias, conv_chain, conv_counted, k, k1xn, knx1, max_pool_3s2, pool_proj,
    run_chain,
};
use crate::models::inception_v4::{Mixed3a, Mixed4a, Mixed5a, ReductionA};
use crate::models::{FeatureInfo, classifier, linear_counted};

/// Channel table of one residual Inception block: input/output width, the 1x1 branch, and the
/// branch chains (first step is always a 1x1; the rest use `kernels`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResBlockSpec {
    pub channels: usize,
    pub branch0: usize,
    pub branch1: Vec<usize>,
    /// Third branch (Inception-ResNet-A only).
    pub branch2: Vec<usize>,
}

/// Which published layout: decides the stem, the head and the checkpoint names.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum IrLayout {
    /// TF-slim / timm Inception-ResNet-v2.
    SlimV2,
    /// facenet-pytorch Inception-ResNet-v1.
    FacenetV1,
    /// The paper's Inception-ResNet-v1 (Figs. 10-15): Fig. 14 stem, 5/10/5 blocks, pool, linear.
    PaperV1,
    /// The paper's Inception-ResNet-v2 (Figs. 3, 16-19): Fig. 3 stem, 5/10/5 blocks, pool, linear.
    PaperV2,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IrConfig {
    pub layout: IrLayout,
    /// Inception-ResNet-A (Block35), -B (Block17), -C (Block8).
    pub block_a: ResBlockSpec,
    pub block_b: ResBlockSpec,
    pub block_c: ResBlockSpec,
    /// Reduction-A `(k, l, m, n)`, paper Table 1.
    pub reduction_a: [usize; 4],
    /// Reduction-B branch chains (each starts with a 1x1, ends with a 3x3/2).
    pub reduction_b: [Vec<usize>; 3],
    /// Blocks per residual stage.
    pub repeats: [usize; 3],
    /// Residual scale per stage (paper Sec. 3.3).
    pub scales: [f64; 3],
    /// Scale of the final Block8 (no ReLU).
    pub last_scale: f64,
    /// Classes of the classifier; 0 = none.
    pub num_classes: usize,
    /// Width multiplier applied to every channel count (1.0 = the published network); small
    /// variants for small data and machines are the same code.
    #[serde(default = "one")]
    pub width: f64,
    /// No shortcut in the residual blocks: the plain Inception counterpart of the same cost
    /// (`inception reproduce residual-speedup`).
    #[serde(default)]
    pub plain: bool,
}

fn one() -> f64 {
    1.0
}

/// Channels out of the stem: `mixed_5b` (v2: 96 + 64 + 96 + 64) or `conv2d_4b` (v1: 256).
fn stem_out(layout: IrLayout, width: f64) -> usize {
    match layout {
        IrLayout::SlimV2 => ch(96, width) + ch(64, width) + ch(96, width) + ch(64, width),
        IrLayout::FacenetV1 | IrLayout::PaperV1 => ch(256, width),
        // Fig. 3: Mixed5a = 3x3/2 conv 192 || max pool over Mixed4a's 96 + 96
        IrLayout::PaperV2 => ch(192, width) + 2 * ch(96, width),
    }
}

impl ResBlockSpec {
    fn scaled(&self, w: f64) -> Self {
        let v = |xs: &[usize]| xs.iter().map(|&x| ch(x, w)).collect();
        Self {
            channels: ch(self.channels, w),
            branch0: ch(self.branch0, w),
            branch1: v(&self.branch1),
            branch2: v(&self.branch2),
        }
    }
}

/// `(channels, branch0, branch1, branch2)` of a residual block.
fn block(channels: usize, branch0: usize, branch1: &[usize], branch2: &[usize]) -> ResBlockSpec {
    ResBlockSpec { channels, branch0, branch1: branch1.to_vec(), branch2: branch2.to_vec() }
}

impl IrConfig {
    /// A table with the references' residual scales (0.17 / 0.10 / 0.20, last block 1.0).
    fn table(
        layout: IrLayout,
        [block_a, block_b, block_c]: [ResBlockSpec; 3],
        reduction_a: [usize; 4],
        reduction_b: [Vec<usize>; 3],
        repeats: [usize; 3],
        num_classes: usize,
    ) -> Self {
        Self {
            layout,
            block_a,
            block_b,
            block_c,
            reduction_a,
            reduction_b,
            repeats,
            scales: [0.17, 0.10, 0.20],
            last_scale: 1.0,
            num_classes,
            width: 1.0,
            plain: false,
        }
    }

    /// TF-slim / timm `inception_resnet_v2`.
    pub fn slim_v2(num_classes: usize) -> Self {
        Self::table(
            IrLayout::SlimV2,
            [
                block(320, 32, &[32, 32], &[32, 48, 64]),
                block(1088, 192, &[128, 160, 192], &[]),
                block(2080, 192, &[192, 224, 256], &[]),
            ],
            [256, 256, 384, 384],
            [vec![256, 384], vec![256, 288], vec![256, 288, 320]],
            [10, 20, 9],
            num_classes,
        )
    }

    /// facenet-pytorch `InceptionResnetV1` (paper Figs. 10-14).
    pub fn facenet_v1(num_classes: usize) -> Self {
        Self::table(
            IrLayout::FacenetV1,
            [
                block(256, 32, &[32, 32], &[32, 32, 32]),
                block(896, 128, &[128, 128, 128], &[]),
                block(1792, 192, &[192, 192, 192], &[]),
            ],
            [192, 192, 256, 384],
            [vec![256, 384], vec![256, 256], vec![256, 256, 256]],
            [5, 10, 5],
            num_classes,
        )
    }

    /// The paper's Inception-ResNet-v1 (Figs. 10-14, Table 1): the facenet trunk without the
    /// extra final Block8 and bottleneck; the classifier sits on the pooled 1792 channels.
    pub fn paper_v1(num_classes: usize) -> Self {
        Self { layout: IrLayout::PaperV1, ..Self::facenet_v1(num_classes) }
    }

    /// The paper's Inception-ResNet-v2 (Figs. 3, 16-19, Table 1). Fig. 19 draws Inception-ResNet-C
    /// with 2048 output channels, but its input, the Reduction-B output of Fig. 18, has
    /// 384 + 288 + 320 + 1152 = 2144, and a residual sum needs equal widths: we use 2144 (2048
    /// would need a projection on the shortcut that the paper never draws).
    pub fn paper_v2(num_classes: usize) -> Self {
        Self::table(
            IrLayout::PaperV2,
            [
                block(384, 32, &[32, 32], &[32, 48, 64]),
                block(1152, 192, &[128, 160, 192], &[]),
                block(2144, 192, &[192, 224, 256], &[]),
            ],
            [256, 256, 384, 384],
            [vec![256, 384], vec![256, 288], vec![256, 288, 320]],
            [5, 10, 5],
            num_classes,
        )
    }

    /// The same layout with every channel count multiplied by `width` (rounded, at least 1).
    /// Block widths are then re-derived from what feeds them (stem / reduction outputs), so
    /// rounding never breaks a residual sum.
    pub fn with_width(mut self, width: f64) -> Self {
        let w = width / self.width;
        self.block_a = self.block_a.scaled(w);
        self.block_b = self.block_b.scaled(w);
        self.block_c = self.block_c.scaled(w);
        self.reduction_a = self.reduction_a.map(|x| ch(x, w));
        self.reduction_b = self.reduction_b.clone().map(|b| b.iter().map(|&x| ch(x, w)).collect());
        self.block_a.channels = stem_out(self.layout, width);
        self.block_b.channels = self.reduction_a[3] + self.reduction_a[2] + self.block_a.channels;
        self.block_c.channels =
            self.reduction_b.iter().map(|b| b.last().copied().unwrap_or(0)).sum::<usize>() + self.block_b.channels;
        self.width = width;
        self
    }
}

/// Residual Inception block: branches concatenated, 1x1 biased up-projection (`conv2d`, no BN:
/// the paper puts BN only on non-summation layers), `x + scale * up`, ReLU unless the last.
/// Block35 = Inception-ResNet-A (Figs. 10/16), Block17 = -B (Figs. 11/17), Block8 = -C (Figs. 13/19).
#[derive(Module, Debug)]
pub struct ResBlock {
    pub branch0: ConvBnAct,
    pub branch1: Vec<ConvBnAct>,
    pub branch2: Vec<ConvBnAct>,
    pub conv2d: Conv2d,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub act: bool,
    /// `false`: no shortcut (`y = up(cat)`), the plain counterpart.
    #[module(skip)]
    pub shortcut: bool,
}

/// Inception-ResNet-A (Block35), -B (Block17) or -C (Block8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResKind {
    A,
    B,
    C,
}

/// Kernels of the non-1x1 steps of a branch: A uses 3x3s, B 1x7 then 7x1, C 1x3 then 3x1.
fn branch_kernels(kind: ResKind) -> [ConvSpec; 2] {
    match kind {
        ResKind::A => [k(3).same(), k(3).same()],
        ResKind::B => [k1xn(7), knx1(7)],
        ResKind::C => [k1xn(3), knx1(3)],
    }
}

impl ResBlock {
    pub fn new(kind: ResKind, s: &ResBlockSpec, scale: f64, act: bool, device: &Device) -> Self {
        let ks = branch_kernels(kind);
        let chain = |widths: &[usize]| -> Vec<ConvBnAct> {
            let steps: Vec<(usize, ConvSpec)> =
                widths.iter().enumerate().map(|(i, &w)| (w, if i == 0 { k(1) } else { ks[i - 1] })).collect();
            conv_chain(s.channels, &steps, device)
        };
        let branch1 = chain(&s.branch1);
        let branch2 = chain(&s.branch2);
        let cat = s.branch0 + s.branch1.last().copied().unwrap_or(0) + s.branch2.last().copied().unwrap_or(0);
        Self {
            branch0: ConvBnAct::new(s.channels, s.branch0, k(1), device),
            branch1,
            branch2,
            conv2d: conv_bias(cat, s.channels, device),
            scale,
            act,
            shortcut: true,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut parts = vec![self.branch0.forward(x.clone()), run_chain(&self.branch1, x.clone())];
        if !self.branch2.is_empty() {
            parts.push(run_chain(&self.branch2, x.clone()));
        }
        let up = conv_counted(&self.conv2d, Tensor::cat(parts, 1));
        let y = if self.shortcut { x + up.mul_scalar(self.scale) } else { up };
        if self.act { relu(y) } else { y }
    }
}

/// Reduction-B (Fig. 12 for v1, Fig. 18 for v2): three conv branches ending in 3x3/2, plus a
/// 3x3/2 max pool.
#[derive(Module, Debug)]
pub struct ReductionB {
    pub branch0: Vec<ConvBnAct>,
    pub branch1: Vec<ConvBnAct>,
    pub branch2: Vec<ConvBnAct>,
    pub branch3: MaxPool2d,
}

impl ReductionB {
    pub fn new(cin: usize, widths: &[Vec<usize>; 3], device: &Device) -> Self {
        let chain = |w: &[usize]| {
            let steps: Vec<(usize, ConvSpec)> = w
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    (
                        c,
                        if i == 0 {
                            k(1)
                        } else if i + 1 == w.len() {
                            k(3).s2()
                        } else {
                            k(3).same()
                        },
                    )
                })
                .collect();
            conv_chain(cin, &steps, device)
        };
        Self {
            branch0: chain(&widths[0]),
            branch1: chain(&widths[1]),
            branch2: chain(&widths[2]),
            branch3: max_pool_3s2(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(
            vec![
                run_chain(&self.branch0, x.clone()),
                run_chain(&self.branch1, x.clone()),
                run_chain(&self.branch2, x.clone()),
                self.branch3.forward(x),
            ],
            1,
        )
    }
}

/// TF-slim `Mixed_5b` (an Inception-v3 "A" block, 192 -> 320 channels): 1x1 96 ||
/// 1x1 48 -> 5x5 64 || 1x1 64 -> 3x3 96 -> 3x3 96 || avg pool -> 1x1 64.
pub fn mixed_5b(width: f64, device: &Device) -> FourBranch {
    let c = |n| ch(n, width);
    FourBranch {
        branch0: ConvBnAct::new(c(192), c(96), k(1), device),
        branch1: conv_chain(c(192), &[(c(48), k(1)), (c(64), k(5).same())], device),
        branch2: conv_chain(c(192), &[(c(64), k(1)), (c(96), k(3).same()), (c(96), k(3).same())], device),
        branch3: pool_proj(c(192), c(64), device),
    }
}

/// The Inception-ResNet trunk and head. Layout-specific parts are `Option`s: `conv2d_4b` (v1
/// stem), `maxpool_5a` + `mixed_5b` + `conv2d_7b` + `classif` (slim v2), `last_linear` +
/// `last_bn` + `logits` (facenet v1). Field names are the checkpoint keys (v2 names for the
/// repeats; the facenet names are mapped in `weights::key_remap`).
#[derive(Module, Debug)]
pub struct InceptionResnet {
    pub conv2d_1a: ConvBnAct,
    pub conv2d_2a: ConvBnAct,
    pub conv2d_2b: ConvBnAct,
    pub maxpool_3a: Option<MaxPool2d>,
    pub conv2d_3b: Option<ConvBnAct>,
    pub conv2d_4a: Option<ConvBnAct>,
    /// Fig. 3 stem (paper v2 layout).
    pub mixed_3a: Option<Mixed3a>,
    pub mixed_4a: Option<Mixed4a>,
    pub mixed_5a: Option<Mixed5a>,
    pub conv2d_4b: Option<ConvBnAct>,
    pub maxpool_5a: Option<MaxPool2d>,
    pub mixed_5b: Option<FourBranch>,
    pub repeat: Vec<ResBlock>,
    pub mixed_6a: ReductionA,
    pub repeat_1: Vec<ResBlock>,
    pub mixed_7a: ReductionB,
    pub repeat_2: Vec<ResBlock>,
    pub block8: Option<ResBlock>,
    pub conv2d_7b: Option<ConvBnAct>,
    pub classif: Option<Linear>,
    pub last_linear: Option<Linear>,
    pub last_bn: Option<BatchNorm>,
    pub logits: Option<Linear>,
    /// Paper layouts: dropout (keep 0.8) before the classifier, training only (Figs. 9, 15).
    pub dropout: Option<Dropout>,
    #[module(skip)]
    pub layout: IrLayout,
    #[module(skip)]
    pub width: f64,
}

impl InceptionResnet {
    pub fn new(cfg: &IrConfig, device: &Device) -> Self {
        let v2 = cfg.layout == IrLayout::SlimV2;
        let facenet = cfg.layout == IrLayout::FacenetV1;
        let fig3 = cfg.layout == IrLayout::PaperV2;
        let paper = matches!(cfg.layout, IrLayout::PaperV1 | IrLayout::PaperV2);
        let (a, b, cc) = (&cfg.block_a, &cfg.block_b, &cfg.block_c);
        let stage = |kind: ResKind, s: &ResBlockSpec, n: usize, scale: f64| -> Vec<ResBlock> {
            (0..n).map(|_| ResBlock { shortcut: !cfg.plain, ..ResBlock::new(kind, s, scale, true, device) }).collect()
        };
        let c = |n| ch(n, cfg.width);
        assert_eq!(stem_out(cfg.layout, cfg.width), a.channels, "Block35 width must equal the stem output");
        Self {
            conv2d_1a: ConvBnAct::new(3, c(32), k(3).s2(), device),
            conv2d_2a: ConvBnAct::new(c(32), c(32), k(3), device),
            conv2d_2b: ConvBnAct::new(c(32), c(64), k(3).same(), device),
            maxpool_3a: (!fig3).then(max_pool_3s2),
            conv2d_3b: (!fig3).then(|| ConvBnAct::new(c(64), c(80), k(1), device)),
            conv2d_4a: (!fig3).then(|| ConvBnAct::new(c(80), c(192), k(3), device)),
            mixed_3a: fig3.then(|| Mixed3a::new(cfg.width, device)),
            mixed_4a: fig3.then(|| Mixed4a::new(cfg.width, device)),
            mixed_5a: fig3.then(|| Mixed5a::new(cfg.width, device)),
            conv2d_4b: (!v2 && !fig3).then(|| ConvBnAct::new(c(192), c(256), k(3).s2(), device)),
            maxpool_5a: v2.then(max_pool_3s2),
            mixed_5b: v2.then(|| mixed_5b(cfg.width, device)),
            repeat: stage(ResKind::A, a, cfg.repeats[0], cfg.scales[0]),
            mixed_6a: ReductionA::new(a.channels, cfg.reduction_a, device),
            repeat_1: stage(ResKind::B, b, cfg.repeats[1], cfg.scales[1]),
            mixed_7a: ReductionB::new(b.channels, &cfg.reduction_b, device),
            repeat_2: stage(ResKind::C, cc, cfg.repeats[2], cfg.scales[2]),
            block8: (!paper).then(|| ResBlock::new(ResKind::C, cc, cfg.last_scale, false, device)),
            conv2d_7b: v2.then(|| ConvBnAct::new(cc.channels, c(1536), k(1), device)),
            classif: match cfg.layout {
                IrLayout::SlimV2 => classifier(c(1536), cfg.num_classes, device),
                IrLayout::FacenetV1 => None,
                IrLayout::PaperV1 | IrLayout::PaperV2 => classifier(cc.channels, cfg.num_classes, device),
            },
            last_linear: facenet.then(|| LinearConfig::new(cc.channels, c(512)).with_bias(false).init(device)),
            last_bn: facenet.then(|| BatchNormConfig::new(c(512)).with_epsilon(BN_EPS).init(device)),
            logits: if facenet { classifier(c(512), cfg.num_classes, device) } else { None },
            dropout: paper.then(|| DropoutConfig::new(0.2).init()),
            layout: cfg.layout,
            width: cfg.width,
        }
    }

    /// Stage outputs as timm reports them (the paper layouts by analogy).
    pub fn feature_info(layout: IrLayout, width: f64) -> Vec<FeatureInfo> {
        let cfg = match layout {
            IrLayout::SlimV2 => IrConfig::slim_v2(0),
            IrLayout::FacenetV1 => IrConfig::facenet_v1(0),
            IrLayout::PaperV1 => IrConfig::paper_v1(0),
            IrLayout::PaperV2 => IrConfig::paper_v2(0),
        }
        .with_width(width);
        let (a, b, c) = (cfg.block_a.channels, cfg.block_b.channels, cfg.block_c.channels);
        let f = |m: &str, c, r| FeatureInfo { module: m.to_string(), channels: c, reduction: r };
        let (c64, c192) = (ch(64, width), ch(192, width));
        match layout {
            IrLayout::SlimV2 => vec![
                f("conv2d_2b", c64, 2),
                f("conv2d_4a", c192, 4),
                f("repeat", a, 8),
                f("repeat_1", b, 16),
                f("conv2d_7b", ch(1536, width), 32),
            ],
            IrLayout::FacenetV1 => vec![
                f("conv2d_2b", c64, 2),
                f("conv2d_4a", c192, 4),
                f("repeat_1", a, 8),
                f("repeat_2", b, 16),
                f("block8", c, 32),
            ],
            IrLayout::PaperV1 => {
                vec![
                    f("conv2d_2b", c64, 2),
                    f("conv2d_4a", c192, 4),
                    f("repeat", a, 8),
                    f("repeat_1", b, 16),
                    f("repeat_2", c, 32),
                ]
            }
            IrLayout::PaperV2 => vec![
                f("conv2d_2b", c64, 2),
                f("mixed_4a", 2 * ch(96, width), 4),
                f("repeat", a, 8),
                f("repeat_1", b, 16),
                f("repeat_2", c, 32),
            ],
        }
    }

    /// Width of the pre-logits: `conv2d_7b` output (v2) or the facenet bottleneck (v1).
    pub fn num_features(&self) -> usize {
        match (&self.conv2d_7b, &self.last_linear) {
            (Some(c), _) => c.out_channels(),
            (None, Some(l)) => l.weight.dims()[1],
            (None, None) => self.repeat_2.last().map_or(0, |b| b.conv2d.weight.dims()[0]),
        }
    }

    /// Trunk up to the last feature map, calling `tap(stage_index, &output)` at each stage end.
    pub fn forward_features_tapped(&self, x: Tensor<4>, tap: &mut dyn FnMut(usize, &Tensor<4>)) -> Tensor<4> {
        let x = self.conv2d_1a.forward(x);
        let x = self.conv2d_2a.forward(x);
        let x = self.conv2d_2b.forward(x);
        tap(0, &x);
        let mut x = x;
        if let (Some(p), Some(c3), Some(c4)) = (&self.maxpool_3a, &self.conv2d_3b, &self.conv2d_4a) {
            x = c4.forward(c3.forward(p.forward(x)));
        }
        if let (Some(m3), Some(m4)) = (&self.mixed_3a, &self.mixed_4a) {
            x = m4.forward(m3.forward(x));
        }
        tap(1, &x);
        if let Some(m) = &self.mixed_5a {
            x = m.forward(x);
        }
        if let Some(c) = &self.conv2d_4b {
            x = c.forward(x);
        }
        if let (Some(p), Some(m)) = (&self.maxpool_5a, &self.mixed_5b) {
            x = m.forward(p.forward(x));
        }
        let x = self.repeat.iter().fold(x, |x, b| b.forward(x));
        tap(2, &x);
        let x = self.mixed_6a.forward(x);
        let x = self.repeat_1.iter().fold(x, |x, b| b.forward(x));
        tap(3, &x);
        let x = self.mixed_7a.forward(x);
        let x = self.repeat_2.iter().fold(x, |x, b| b.forward(x));
        let mut x = x;
        if let Some(b) = &self.block8 {
            x = b.forward(x);
        }
        if let Some(c) = &self.conv2d_7b {
            x = c.forward(x);
        }
        tap(4, &x);
        x
    }

    /// Pooled features -> pre-logits (v2: the pooled 1536; v1: `last_bn(last_linear(.))`, 512-d).
    pub fn pre_logits(&self, pooled: Tensor<2>) -> Tensor<2> {
        match (&self.last_linear, &self.last_bn) {
            (Some(l), Some(bn)) => bn.forward(linear_counted(l, pooled)),
            _ => pooled,
        }
    }

    /// Dropout before the classifier (identity outside training and for the published layouts).
    pub fn head_dropout(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.dropout {
            Some(d) => d.forward(x),
            None => x,
        }
    }

    pub fn classifier_ref(&self) -> &Option<Linear> {
        match self.layout {
            IrLayout::FacenetV1 => &self.logits,
            _ => &self.classif,
        }
    }

    pub fn set_classifier(&mut self, head: Option<Linear>) {
        match self.layout {
            IrLayout::FacenetV1 => self.logits = head,
            _ => self.classif = head,
        }
    }
}
