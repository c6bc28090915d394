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
//!
//! `IrConfig::stages` is the one place where each layout's trunk order is written: the struct
//! is built from it (a part exists iff its table lists it), and `forward_part` / `into_parts`
//! only map a part's name to its field.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::FourBranch;
use crate::layers::{
    BN_EPS, ConvBnAct, ConvSpec, ch, conv_bias, conv_chain, k, k1xn, knx1, max_pool_3s2, pool_proj, run_chain,
};
use crate::models::inception_v4::{Mixed3a, Mixed4a, Mixed5a, ReductionA};
use crate::models::{Head, ModelKind, Part, StageSpec, classifier};

/// Channel table of one residual Inception block: input/output width, the 1x1 branch, and the
/// branch chains (the first step of a chain is a 1x1; the rest use the block's kernels, see
/// `branch_kernels`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResBlockSpec {
    pub channels: usize,
    pub branch0: usize,
    pub branch1: Vec<usize>,
    /// Third branch (Inception-ResNet-A only).
    pub branch2: Vec<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IrConfig {
    /// Which published layout (an Inception-ResNet `ModelKind`): decides the stem, the head and
    /// the checkpoint names, through `stages`.
    pub layout: ModelKind,
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
    /// No shortcut in the residual blocks, BatchNorm after their up-projections: the plain
    /// Inception counterpart of the same cost (`inception reproduce residual-speedup`).
    #[serde(default)]
    pub plain: bool,
}

fn one() -> f64 {
    1.0
}

/// Channels out of the stem: `mixed_5b` (v2: 96 + 64 + 96 + 64) or `conv2d_4b` (v1: 256).
fn stem_out(layout: ModelKind, width: f64) -> usize {
    match layout {
        ModelKind::InceptionResnetV2 => ch(96, width) + ch(64, width) + ch(96, width) + ch(64, width),
        // Fig. 3: Mixed5a = 3x3/2 conv 192 || max pool over Mixed4a's 96 + 96
        ModelKind::InceptionResnetV2Paper => ch(192, width) + 2 * ch(96, width),
        _ => ch(256, width),
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
        layout: ModelKind,
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
            ModelKind::InceptionResnetV2,
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
            ModelKind::InceptionResnetV1,
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
        Self { layout: ModelKind::InceptionResnetV1Paper, ..Self::facenet_v1(num_classes) }
    }

    /// The paper's Inception-ResNet-v2 (Figs. 3, 16-19, Table 1). Fig. 19 draws Inception-ResNet-C
    /// with 2048 output channels, but its input, the Reduction-B output of Fig. 18, has
    /// 384 + 288 + 320 + 1152 = 2144, and a residual sum needs equal widths: we use 2144 (2048
    /// would need a projection on the shortcut that the paper never draws).
    pub fn paper_v2(num_classes: usize) -> Self {
        Self::table(
            ModelKind::InceptionResnetV2Paper,
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

    /// The table of an Inception-ResNet kind (`None` for Inception-v4).
    pub fn for_kind(kind: ModelKind, num_classes: usize) -> Option<Self> {
        match kind {
            ModelKind::InceptionV4 => None,
            ModelKind::InceptionResnetV2 => Some(Self::slim_v2(num_classes)),
            ModelKind::InceptionResnetV1 => Some(Self::facenet_v1(num_classes)),
            ModelKind::InceptionResnetV2Paper => Some(Self::paper_v2(num_classes)),
            ModelKind::InceptionResnetV1Paper => Some(Self::paper_v1(num_classes)),
        }
    }

    /// The trunk in order, grouped into timm's feature stages: the single description of each
    /// layout's topology. Part names are our field names (= checkpoint keys but for facenet's
    /// `repeat_N`, see `weights::key_remap`); feature modules are named as in the checkpoints.
    pub fn stages(&self) -> Vec<StageSpec> {
        let w = self.width;
        let (a, b, c) = (self.block_a.channels, self.block_b.channels, self.block_c.channels);
        let stem = StageSpec::new("conv2d_2b", ch(64, w), 2, &["conv2d_1a", "conv2d_2a", "conv2d_2b"]);
        let v3_stem = StageSpec::new("conv2d_4a", ch(192, w), 4, &["maxpool_3a", "conv2d_3b", "conv2d_4a"]);
        match self.layout {
            // TF-slim: Inception-v3 stem, Mixed_5b, 10 / 20 / 9 + 1 blocks, 1x1 to 1536
            ModelKind::InceptionResnetV2 => vec![
                stem,
                v3_stem,
                StageSpec::new("repeat", a, 8, &["maxpool_5a", "mixed_5b", "repeat"]),
                StageSpec::new("repeat_1", b, 16, &["mixed_6a", "repeat_1"]),
                StageSpec::new("conv2d_7b", ch(1536, w), 32, &["mixed_7a", "repeat_2", "block8", "conv2d_7b"]),
            ],
            // facenet: the paper's Fig. 14 stem, 5 / 10 / 5 + 1 blocks
            ModelKind::InceptionResnetV1 => vec![
                stem,
                v3_stem,
                StageSpec::new("repeat_1", a, 8, &["conv2d_4b", "repeat"]),
                StageSpec::new("repeat_2", b, 16, &["mixed_6a", "repeat_1"]),
                StageSpec::new("block8", c, 32, &["mixed_7a", "repeat_2", "block8"]),
            ],
            // the paper's IR-v1 (Figs. 10-15): Fig. 14 stem, 5 / 10 / 5 blocks
            ModelKind::InceptionResnetV1Paper => vec![
                stem,
                v3_stem,
                StageSpec::new("repeat", a, 8, &["conv2d_4b", "repeat"]),
                StageSpec::new("repeat_1", b, 16, &["mixed_6a", "repeat_1"]),
                StageSpec::new("repeat_2", c, 32, &["mixed_7a", "repeat_2"]),
            ],
            // the paper's IR-v2 (Figs. 3, 16-19): the Inception-v4 stem, 5 / 10 / 5 blocks
            _ => vec![
                stem,
                StageSpec::new("mixed_4a", 2 * ch(96, w), 4, &["mixed_3a", "mixed_4a"]),
                StageSpec::new("repeat", a, 8, &["mixed_5a", "repeat"]),
                StageSpec::new("repeat_1", b, 16, &["mixed_6a", "repeat_1"]),
                StageSpec::new("repeat_2", c, 32, &["mixed_7a", "repeat_2"]),
            ],
        }
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
    /// BatchNorm after the up-projection: only in the plain counterpart (no shortcut).
    pub bn: Option<BatchNorm>,
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
            bn: None,
            scale,
            act,
            shortcut: true,
        }
    }

    /// The plain counterpart of the same cost (the paper's Inception-v3/v4 side of Figs. 24-26):
    /// no shortcut; the up-projection is then an ordinary layer, so it gets BatchNorm like every
    /// other non-summation layer (bias-free conv + BN).
    pub fn without_shortcut(mut self, device: &Device) -> Self {
        let [cout, cin, _, _] = self.conv2d.weight.dims();
        let up = ConvBnAct::new(cin, cout, k(1), device);
        self.conv2d = up.conv;
        self.bn = Some(up.bn);
        self.shortcut = false;
        self
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut parts = vec![self.branch0.forward(x.clone()), run_chain(&self.branch1, x.clone())];
        if !self.branch2.is_empty() {
            parts.push(run_chain(&self.branch2, x.clone()));
        }
        let mut up = self.conv2d.forward(Tensor::cat(parts, 1));
        if let Some(bn) = &self.bn {
            up = bn.forward(up);
        }
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

/// The Inception-ResNet trunk and head. A trunk part exists iff the layout's `stages` table
/// lists it (the others are `None` or empty); the head is `classif` (timm v2, paper layouts)
/// or facenet's `last_linear` + `last_bn` + `logits`. Field names are the checkpoint keys (v2
/// names for the repeats; the facenet names are mapped in `weights::key_remap`).
#[derive(Module, Debug)]
pub struct InceptionResnet {
    pub conv2d_1a: Option<ConvBnAct>,
    pub conv2d_2a: Option<ConvBnAct>,
    pub conv2d_2b: Option<ConvBnAct>,
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
    pub mixed_6a: Option<ReductionA>,
    pub repeat_1: Vec<ResBlock>,
    pub mixed_7a: Option<ReductionB>,
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
    pub layout: ModelKind,
    #[module(skip)]
    pub width: f64,
}

impl InceptionResnet {
    /// Build the parts `cfg.stages()` lists, and the layout's head.
    pub fn new(cfg: &IrConfig, device: &Device) -> Self {
        let parts: Vec<String> = cfg.stages().into_iter().flat_map(|s| s.parts).collect();
        let has = |name: &str| parts.iter().any(|p| p == name);
        let facenet = cfg.layout == ModelKind::InceptionResnetV1;
        let paper = matches!(cfg.layout, ModelKind::InceptionResnetV1Paper | ModelKind::InceptionResnetV2Paper);
        let (a, b, cc) = (&cfg.block_a, &cfg.block_b, &cfg.block_c);
        let stage = |name: &str, kind: ResKind, s: &ResBlockSpec, n: usize, scale: f64| -> Vec<ResBlock> {
            let n = if has(name) { n } else { 0 };
            (0..n)
                .map(|_| {
                    let b = ResBlock::new(kind, s, scale, true, device);
                    if cfg.plain { b.without_shortcut(device) } else { b }
                })
                .collect()
        };
        let c = |n| ch(n, cfg.width);
        let conv = |name: &str, cin, cout, spec| has(name).then(|| ConvBnAct::new(cin, cout, spec, device));
        // `block_a.channels` is re-derived from the stem in `with_width`
        debug_assert_eq!(stem_out(cfg.layout, cfg.width), a.channels);
        let pooled = if has("conv2d_7b") { c(1536) } else { cc.channels };
        Self {
            conv2d_1a: conv("conv2d_1a", 3, c(32), k(3).s2()),
            conv2d_2a: conv("conv2d_2a", c(32), c(32), k(3)),
            conv2d_2b: conv("conv2d_2b", c(32), c(64), k(3).same()),
            maxpool_3a: has("maxpool_3a").then(max_pool_3s2),
            conv2d_3b: conv("conv2d_3b", c(64), c(80), k(1)),
            conv2d_4a: conv("conv2d_4a", c(80), c(192), k(3)),
            mixed_3a: has("mixed_3a").then(|| Mixed3a::new(cfg.width, device)),
            mixed_4a: has("mixed_4a").then(|| Mixed4a::new(cfg.width, device)),
            mixed_5a: has("mixed_5a").then(|| Mixed5a::new(cfg.width, device)),
            conv2d_4b: conv("conv2d_4b", c(192), c(256), k(3).s2()),
            maxpool_5a: has("maxpool_5a").then(max_pool_3s2),
            mixed_5b: has("mixed_5b").then(|| mixed_5b(cfg.width, device)),
            repeat: stage("repeat", ResKind::A, a, cfg.repeats[0], cfg.scales[0]),
            mixed_6a: has("mixed_6a").then(|| ReductionA::new(a.channels, cfg.reduction_a, device)),
            repeat_1: stage("repeat_1", ResKind::B, b, cfg.repeats[1], cfg.scales[1]),
            mixed_7a: has("mixed_7a").then(|| ReductionB::new(b.channels, &cfg.reduction_b, device)),
            repeat_2: stage("repeat_2", ResKind::C, cc, cfg.repeats[2], cfg.scales[2]),
            block8: has("block8").then(|| ResBlock::new(ResKind::C, cc, cfg.last_scale, false, device)),
            conv2d_7b: conv("conv2d_7b", cc.channels, c(1536), k(1)),
            classif: if facenet { None } else { classifier(pooled, cfg.num_classes, device) },
            last_linear: facenet.then(|| LinearConfig::new(cc.channels, c(512)).with_bias(false).init(device)),
            last_bn: facenet.then(|| BatchNormConfig::new(c(512)).with_epsilon(BN_EPS).init(device)),
            logits: if facenet { classifier(c(512), cfg.num_classes, device) } else { None },
            dropout: paper.then(|| DropoutConfig::new(0.2).init()),
            layout: cfg.layout,
            width: cfg.width,
        }
    }

    /// The trunk's stage table (see `IrConfig::stages`).
    pub fn stages(&self) -> Vec<StageSpec> {
        IrConfig::for_kind(self.layout, 0).map(|c| c.with_width(self.width).stages()).unwrap_or_default()
    }

    /// Run the trunk part named `part` (a field; an absent part passes `x` through).
    pub fn forward_part(&self, part: &str, x: Tensor<4>) -> Tensor<4> {
        fn opt<M>(m: &Option<M>, x: Tensor<4>, f: impl Fn(&M, Tensor<4>) -> Tensor<4>) -> Tensor<4> {
            match m {
                Some(m) => f(m, x),
                None => x,
            }
        }
        let chain = |blocks: &[ResBlock], x| blocks.iter().fold(x, |x, b| b.forward(x));
        match part {
            "conv2d_1a" => opt(&self.conv2d_1a, x, ConvBnAct::forward),
            "conv2d_2a" => opt(&self.conv2d_2a, x, ConvBnAct::forward),
            "conv2d_2b" => opt(&self.conv2d_2b, x, ConvBnAct::forward),
            "maxpool_3a" => opt(&self.maxpool_3a, x, MaxPool2d::forward),
            "conv2d_3b" => opt(&self.conv2d_3b, x, ConvBnAct::forward),
            "conv2d_4a" => opt(&self.conv2d_4a, x, ConvBnAct::forward),
            "mixed_3a" => opt(&self.mixed_3a, x, Mixed3a::forward),
            "mixed_4a" => opt(&self.mixed_4a, x, Mixed4a::forward),
            "mixed_5a" => opt(&self.mixed_5a, x, Mixed5a::forward),
            "conv2d_4b" => opt(&self.conv2d_4b, x, ConvBnAct::forward),
            "maxpool_5a" => opt(&self.maxpool_5a, x, MaxPool2d::forward),
            "mixed_5b" => opt(&self.mixed_5b, x, FourBranch::forward),
            "repeat" => chain(&self.repeat, x),
            "mixed_6a" => opt(&self.mixed_6a, x, ReductionA::forward),
            "repeat_1" => chain(&self.repeat_1, x),
            "mixed_7a" => opt(&self.mixed_7a, x, ReductionB::forward),
            "repeat_2" => chain(&self.repeat_2, x),
            "block8" => opt(&self.block8, x, ResBlock::forward),
            "conv2d_7b" => opt(&self.conv2d_7b, x, ConvBnAct::forward),
            _ => x,
        }
    }

    /// The trunk parts by name, consumed (for the fast engine's lowering), and the head.
    pub fn into_parts(self) -> (Vec<(&'static str, Part)>, Head) {
        use Part as P;
        let parts: Vec<(&'static str, Option<Part>)> = vec![
            ("conv2d_1a", self.conv2d_1a.map(P::Conv)),
            ("conv2d_2a", self.conv2d_2a.map(P::Conv)),
            ("conv2d_2b", self.conv2d_2b.map(P::Conv)),
            ("maxpool_3a", self.maxpool_3a.map(|_| P::MaxPool)),
            ("conv2d_3b", self.conv2d_3b.map(P::Conv)),
            ("conv2d_4a", self.conv2d_4a.map(P::Conv)),
            ("mixed_3a", self.mixed_3a.map(P::Mixed3a)),
            ("mixed_4a", self.mixed_4a.map(P::Mixed4a)),
            ("mixed_5a", self.mixed_5a.map(P::Mixed5a)),
            ("conv2d_4b", self.conv2d_4b.map(P::Conv)),
            ("maxpool_5a", self.maxpool_5a.map(|_| P::MaxPool)),
            ("mixed_5b", self.mixed_5b.map(P::FourBranch)),
            ("repeat", Some(P::Residual(self.repeat))),
            ("mixed_6a", self.mixed_6a.map(P::ReductionA)),
            ("repeat_1", Some(P::Residual(self.repeat_1))),
            ("mixed_7a", self.mixed_7a.map(P::IrReductionB)),
            ("repeat_2", Some(P::Residual(self.repeat_2))),
            ("block8", self.block8.map(|b| P::Residual(vec![b]))),
            ("conv2d_7b", self.conv2d_7b.map(P::Conv)),
        ];
        let head = match self.layout {
            ModelKind::InceptionResnetV1 => {
                Head { bottleneck: self.last_linear.map(|l| (l, self.last_bn)), classifier: self.logits }
            }
            _ => Head { bottleneck: None, classifier: self.classif },
        };
        (parts.into_iter().filter_map(|(n, p)| p.map(|p| (n, p))).collect(), head)
    }

    /// Width of the pre-logits: `conv2d_7b` output (v2) or the facenet bottleneck (v1).
    pub fn num_features(&self) -> usize {
        match (&self.conv2d_7b, &self.last_linear) {
            (Some(c), _) => c.out_channels(),
            (None, Some(l)) => l.weight.dims()[1],
            (None, None) => self.repeat_2.last().map_or(0, |b| b.conv2d.weight.dims()[0]),
        }
    }

    /// Pooled features -> pre-logits (v2: the pooled 1536; v1: `last_bn(last_linear(.))`, 512-d).
    pub fn pre_logits(&self, pooled: Tensor<2>) -> Tensor<2> {
        match (&self.last_linear, &self.last_bn) {
            (Some(l), Some(bn)) => bn.forward(l.forward(pooled)),
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
            ModelKind::InceptionResnetV1 => &self.logits,
            _ => &self.classif,
        }
    }

    pub fn set_classifier(&mut self, classifier: Option<Linear>) {
        match self.layout {
            ModelKind::InceptionResnetV1 => self.logits = classifier,
            _ => self.classif = classifier,
        }
    }
}
