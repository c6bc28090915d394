//! One interface over the two executors: burn (any device, the training graph) and the frozen
//! CPU `fast` engine. Inputs are NCHW f32 slices; outputs are row-major with their shapes.

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::engine::{Act, Engine};
use crate::models::{Model, ModelKind, l2_normalize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// burn on the selected device.
    Burn,
    /// The frozen CPU engine (`engine.rs`).
    Fast,
}

impl std::str::FromStr for EngineKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "burn" => Ok(EngineKind::Burn),
            "fast" => Ok(EngineKind::Fast),
            other => Err(crate::Error::Invalid(format!("unknown engine '{other}' (burn, fast)"))),
        }
    }
}

/// Softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// A row-major tensor.
#[derive(Clone, Debug)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Output {
    fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        Self { shape, data: t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default() }
    }
}

/// Everything one forward gives.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// `feature_info` stage maps, NCHW (only when asked for).
    pub stages: Vec<Output>,
    pub pre_logits: Output,
    pub logits: Output,
    /// IR-v1: L2-normalised pre-logits; others: the pre-logits.
    pub embedding: Output,
}

pub enum Predictor {
    Burn(Box<Model>, Device),
    Fast(Box<Engine>),
}

impl Predictor {
    pub fn new(model: Model, engine: EngineKind, device: &Device) -> Self {
        match engine {
            EngineKind::Burn => Predictor::Burn(Box::new(model), device.clone()),
            EngineKind::Fast => Predictor::Fast(Box::new(crate::lower::lower(model))),
        }
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Predictor::Burn(m, _) => m.kind(),
            Predictor::Fast(e) => e.kind(),
        }
    }

    /// Channel multiplier of the model.
    pub fn width(&self) -> f64 {
        match self {
            Predictor::Burn(m, _) => m.config().width,
            Predictor::Fast(e) => e.width(),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Predictor::Burn(m, _) => m.num_classes(),
            Predictor::Fast(e) => e.num_classes(),
        }
    }

    /// Run on an NCHW batch; `stages` also returns every stage map.
    pub fn run(&self, x: &[f32], shape: [usize; 4], stages: bool) -> Outputs {
        let v1 = self.kind() == ModelKind::InceptionResnetV1;
        match self {
            Predictor::Burn(m, device) => {
                let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), device);
                let mut maps = Vec::new();
                let f = m.forward_features_tapped(x, &mut |_, t| {
                    if stages {
                        maps.push(Output::from_tensor(t.clone()));
                    }
                });
                let pre = m.forward_head(f.clone(), true);
                let logits = Output::from_tensor(m.forward_head(f, false));
                let embedding = Output::from_tensor(if v1 { l2_normalize(pre.clone()) } else { pre.clone() });
                Outputs { stages: maps, pre_logits: Output::from_tensor(pre), logits, embedding }
            }
            Predictor::Fast(e) => {
                let n = shape[0];
                let mut maps = Vec::new();
                let x = Act::from_nchw(x, shape);
                let f = if stages {
                    e.forward_features_tapped(x, &mut |_, a| {
                        maps.push(Output { shape: a.shape_nchw().to_vec(), data: a.to_nchw() })
                    })
                } else {
                    e.forward_features(x)
                };
                let (pre, d) = e.pre_logits(&f);
                let (logits, c) = e.logits(&pre, n);
                let mut emb = pre.clone();
                if v1 {
                    for row in emb.chunks_mut(d) {
                        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                        row.iter_mut().for_each(|v| *v /= norm);
                    }
                }
                Outputs {
                    stages: maps,
                    pre_logits: Output { shape: vec![n, d], data: pre },
                    logits: Output { shape: vec![n, c], data: logits },
                    embedding: Output { shape: vec![n, d], data: emb },
                }
            }
        }
    }
}
