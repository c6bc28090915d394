//! Model registry: names as in timm (dashes accepted), pretrained configs, and one `Model` type
//! with the timm-style API (`forward`, `forward_features`, `forward_head`, `feature_info`,
//! `reset_classifier`, `embed`).
//!
//! Each family describes its trunk once, as a list of `StageSpec`s (timm's feature stages, each
//! an ordered list of named parts): `inception_v4::stages` and `IrConfig::stages`. The burn
//! forward, the fast engine's lowering (`crate::lower`), `feature_info`, `stage_of_key` and
//! `summary` all walk that list.

pub mod inception_resnet;
pub mod inception_v4;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::layers::{self, global_avg_pool};
pub use crate::preprocess::{Interpolation, Preprocess};
use inception_resnet::{InceptionResnet, IrConfig};
use inception_v4::InceptionV4;

/// The networks we ship, by their timm names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    InceptionV4,
    InceptionResnetV2,
    InceptionResnetV1,
    /// The paper's own figures (Figs. 3, 16-19) rather than the TF-slim layout.
    InceptionResnetV2Paper,
    /// The paper's own figures (Figs. 10-15) rather than facenet's.
    InceptionResnetV1Paper,
}

impl ModelKind {
    pub const ALL: [ModelKind; 5] = [
        ModelKind::InceptionV4,
        ModelKind::InceptionResnetV2,
        ModelKind::InceptionResnetV1,
        ModelKind::InceptionResnetV2Paper,
        ModelKind::InceptionResnetV1Paper,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::InceptionV4 => "inception_v4",
            ModelKind::InceptionResnetV2 => "inception_resnet_v2",
            ModelKind::InceptionResnetV1 => "inception_resnet_v1",
            ModelKind::InceptionResnetV2Paper => "inception_resnet_v2_paper",
            ModelKind::InceptionResnetV1Paper => "inception_resnet_v1_paper",
        }
    }

    /// Preprocessing and provenance of the published weights.
    pub fn pretrained(self) -> PretrainedCfg {
        match self {
            ModelKind::InceptionV4 => PretrainedCfg::imagenet("timm/inception_v4.tf_in1k", 0.875),
            ModelKind::InceptionResnetV2 => PretrainedCfg::imagenet("timm/inception_resnet_v2.tf_in1k", 0.8975),
            // facenet: aligned 160 px face crops, (x - 127.5) / 128.
            ModelKind::InceptionResnetV1 => PretrainedCfg { hub_id: None, pre: Preprocess::facenet(), num_classes: 0 },
            // no published weights: ImageNet-style preprocessing for training from scratch
            ModelKind::InceptionResnetV2Paper | ModelKind::InceptionResnetV1Paper => {
                PretrainedCfg { hub_id: None, ..PretrainedCfg::imagenet("", 0.875) }
            }
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        let norm = norm.strip_prefix("timm/").unwrap_or(&norm);
        let norm = norm.split('.').next().unwrap_or(norm);
        ModelKind::ALL.into_iter().find(|k| k.name() == norm).ok_or_else(|| Error::UnknownModel {
            name: s.to_string(),
            known: ModelKind::ALL.map(|k| k.name()).join(", "),
        })
    }
}

/// timm's `pretrained_cfg` subset that decides preprocessing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainedCfg {
    pub hub_id: Option<String>,
    pub pre: Preprocess,
    pub num_classes: usize,
}

impl PretrainedCfg {
    fn imagenet(hub_id: &str, crop_pct: f64) -> Self {
        Self { hub_id: Some(hub_id.to_string()), pre: Preprocess::inception(299, crop_pct), num_classes: 1000 }
    }
}

/// One feature stage of a trunk: what timm's `feature_info` reports, and the trunk parts (field
/// names, or `features.N` for Inception-v4) that make it, in execution order.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub info: FeatureInfo,
    pub parts: Vec<String>,
}

impl StageSpec {
    pub fn new(module: &str, channels: usize, reduction: usize, parts: &[&str]) -> Self {
        Self {
            info: FeatureInfo { module: module.to_string(), channels, reduction },
            parts: parts.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// One trunk part, handed over by value to the fast engine's lowering (`crate::lower`).
// Built once per model; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Part {
    Conv(layers::ConvBnAct),
    /// 3x3 / 2 max pool.
    MaxPool,
    Mixed3a(inception_v4::Mixed3a),
    Mixed4a(inception_v4::Mixed4a),
    Mixed5a(inception_v4::Mixed5a),
    /// Inception-A / -B of v4 and TF-slim's Mixed_5b.
    FourBranch(layers::FourBranch),
    ReductionA(inception_v4::ReductionA),
    ReductionB(inception_v4::ReductionB),
    InceptionC(inception_v4::InceptionC),
    IrReductionB(inception_resnet::ReductionB),
    /// A run of residual blocks (Inception-ResNet-A, -B or -C).
    Residual(Vec<inception_resnet::ResBlock>),
}

/// What follows global pooling: facenet's bottleneck (`last_linear` + `last_bn`), and the
/// classifier.
pub struct Head {
    pub bottleneck: Option<(Linear, Option<burn::nn::BatchNorm>)>,
    pub classifier: Option<Linear>,
}

/// One stage output as timm's `feature_info` reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeatureInfo {
    pub module: String,
    pub channels: usize,
    pub reduction: usize,
}

/// What a model is built from; written next to checkpoints and results.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub model: ModelKind,
    pub num_classes: usize,
    /// Channel multiplier (1.0 = the published width).
    #[serde(default = "default_width")]
    pub width: f64,
    /// Inception-ResNet without shortcuts (same cost), for the residual-speedup experiment.
    #[serde(default)]
    pub plain: bool,
    /// One residual scale for every stage instead of the layout's (paper Sec. 3.3).
    #[serde(default)]
    pub residual_scale: Option<f64>,
}

fn default_width() -> f64 {
    1.0
}

impl ModelConfig {
    pub fn new(model: ModelKind, num_classes: usize) -> Self {
        Self { model, num_classes, width: 1.0, plain: false, residual_scale: None }
    }
}

/// A linear classifier, `None` when the model has 0 classes (timm's `Identity`).
pub fn classifier(cin: usize, num_classes: usize, device: &Device) -> Option<Linear> {
    (num_classes > 0).then(|| LinearConfig::new(cin, num_classes).init(device))
}

// Built once per model; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    V4(InceptionV4),
    Ir(InceptionResnet),
}

impl Model {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        match cfg.model {
            ModelKind::InceptionV4 => Model::V4(InceptionV4::new(cfg.num_classes, cfg.width, device)),
            kind => {
                let ir =
                    IrConfig::for_kind(kind, cfg.num_classes).unwrap_or_else(|| IrConfig::slim_v2(cfg.num_classes));
                let mut ir = ir.with_width(cfg.width);
                ir.plain = cfg.plain;
                if let Some(scale) = cfg.residual_scale {
                    ir.scales = [scale; 3];
                }
                Model::Ir(InceptionResnet::new(&ir, device))
            }
        }
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Model::V4(_) => ModelKind::InceptionV4,
            Model::Ir(m) => m.layout,
        }
    }

    pub fn config(&self) -> ModelConfig {
        let (width, plain, residual_scale) = match self {
            Model::V4(m) => (m.width, false, None),
            Model::Ir(m) => {
                let scales: Vec<f64> = m.repeat.iter().chain(&m.repeat_1).chain(&m.repeat_2).map(|b| b.scale).collect();
                let uniform = scales.windows(2).all(|w| w[0] == w[1]);
                let default_scales = [0.17, 0.10, 0.20];
                let is_default = [&m.repeat, &m.repeat_1, &m.repeat_2]
                    .iter()
                    .zip(default_scales)
                    .all(|(st, d)| st.iter().all(|b| b.scale == d));
                let plain = m.repeat.first().is_some_and(|b| !b.shortcut);
                let scale = (!is_default && uniform).then(|| scales.first().copied()).flatten();
                (m.width, plain, scale)
            }
        };
        ModelConfig { model: self.kind(), num_classes: self.num_classes(), width, plain, residual_scale }
    }

    fn head(&self) -> &Option<Linear> {
        match self {
            Model::V4(m) => &m.last_linear,
            Model::Ir(m) => m.classifier_ref(),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.head().as_ref().map_or(0, |l| l.weight.dims()[1])
    }

    /// Width of `forward_head(.., pre_logits = true)`.
    pub fn num_features(&self) -> usize {
        match self {
            Model::V4(m) => inception_v4::stages(m.width).last().map_or(1536, |s| s.info.channels),
            Model::Ir(m) => m.num_features(),
        }
    }

    /// Replace the classifier by a fresh one with `num_classes` outputs (0 removes it).
    pub fn reset_classifier(mut self, num_classes: usize, device: &Device) -> Self {
        let cin = self.num_features();
        let head = classifier(cin, num_classes, device);
        match &mut self {
            Model::V4(m) => m.last_linear = head,
            Model::Ir(m) => m.set_classifier(head),
        }
        self
    }

    /// The trunk's description (see the module docs).
    pub fn stages(&self) -> Vec<StageSpec> {
        match self {
            Model::V4(m) => inception_v4::stages(m.width),
            Model::Ir(m) => m.stages(),
        }
    }

    pub fn feature_info(&self) -> Vec<FeatureInfo> {
        self.stages().into_iter().map(|s| s.info).collect()
    }

    /// Trunk up to the last feature map, calling `tap(stage, &output)` at each `feature_info` stage.
    pub fn forward_features_tapped(&self, mut x: Tensor<4>, tap: &mut dyn FnMut(usize, &Tensor<4>)) -> Tensor<4> {
        for (i, stage) in self.stages().iter().enumerate() {
            for part in &stage.parts {
                x = match self {
                    Model::V4(m) => m.forward_part(part, x),
                    Model::Ir(m) => m.forward_part(part, x),
                };
            }
            tap(i, &x);
        }
        x
    }

    /// The trunk parts in execution order with the index of their stage, and the head,
    /// consumed: what the fast engine is lowered from.
    pub fn into_parts(self) -> (Vec<(usize, Part)>, Head) {
        let stages = self.stages();
        let (mut parts, head): (Vec<(String, Part)>, Head) = match self {
            Model::V4(m) => m.into_parts(),
            Model::Ir(m) => {
                let (p, h) = m.into_parts();
                (p.into_iter().map(|(n, p)| (n.to_string(), p)).collect(), h)
            }
        };
        let mut ordered = Vec::with_capacity(parts.len());
        for (i, stage) in stages.iter().enumerate() {
            for name in &stage.parts {
                if let Some(at) = parts.iter().position(|(n, _)| n == name) {
                    ordered.push((i, parts.swap_remove(at).1));
                }
            }
        }
        (ordered, head)
    }

    /// Last feature map `[N, C, H/32, W/32]` (before global pooling).
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_features_tapped(x, &mut |_, _| {})
    }

    /// Global pool (+ the facenet bottleneck) and, unless `pre_logits`, the classifier.
    pub fn forward_head(&self, features: Tensor<4>, pre_logits: bool) -> Tensor<2> {
        let pooled = global_avg_pool(features);
        let pre = match self {
            Model::V4(_) => pooled,
            Model::Ir(m) => m.pre_logits(pooled),
        };
        match (pre_logits, self.head(), self) {
            (false, Some(l), Model::Ir(m)) => l.forward(m.head_dropout(pre)),
            (false, Some(l), _) => l.forward(pre),
            _ => pre,
        }
    }

    /// Logits `[N, num_classes]` (pre-logits when the model has no classifier).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let f = self.forward_features(x);
        self.forward_head(f, false)
    }

    /// Embedding: IR-v1's L2-normalised 512-d face embedding; pooled features for the others.
    pub fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        let pre = self.forward_head(self.forward_features(x), true);
        match self.kind() {
            ModelKind::InceptionResnetV1 => l2_normalize(pre),
            _ => pre,
        }
    }

    /// Trainable parameters (BatchNorm running statistics excluded), as timm counts them.
    pub fn num_params(&self) -> usize {
        crate::weights::param_shapes(self)
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The trunk description of a model kind at a width multiplier, without building the model.
pub fn stages(kind: ModelKind, width: f64) -> Vec<StageSpec> {
    match IrConfig::for_kind(kind, 0) {
        None => inception_v4::stages(width),
        Some(cfg) => cfg.with_width(width).stages(),
    }
}

/// `feature_info` of a model kind at a width multiplier, without building the model.
pub fn feature_info(kind: ModelKind, width: f64) -> Vec<FeatureInfo> {
    stages(kind, width).into_iter().map(|s| s.info).collect()
}

/// `x / max(||x||_2, 1e-12)` along dim 1, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Which `feature_info` stage a checkpoint key belongs to (`None`: the head), from the trunk
/// description: the stage listing the key's part (`features.N` for v4, else its first field).
pub fn stage_of_key(kind: ModelKind, key: &str) -> Option<usize> {
    let field = crate::weights::field_of_key(kind, key);
    let mut segs = field.split('.');
    let first = segs.next().unwrap_or("");
    let part = match (first, segs.next()) {
        ("features", Some(i)) => format!("features.{i}"),
        _ => first.to_string(),
    };
    stages(kind, 1.0).iter().position(|s| s.parts.contains(&part))
}
