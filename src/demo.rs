//! The shipped demo model: a width-0.25 Inception-ResNet-v1 trained with our own `train` on
//! Fashion-MNIST (75 px, grayscale repeated to RGB). `classify` uses it when no model or weights
//! are given, so the first command works offline. How it was made: `assets/demo/README.md`.

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::models::{Interpolation, Model, PretrainedCfg};
use crate::train::TrainConfig;
use crate::train::data::FASHION_MNIST_LABELS;
use crate::weights::{self, LoadOptions};

const MODEL: &[u8] = include_bytes!("../assets/demo/model.safetensors");
const CONFIG: &str = include_str!("../assets/demo/config.json");

/// The run's config (model, size, crop).
pub fn config() -> Result<TrainConfig> {
    serde_json::from_str(CONFIG).map_err(|e| Error::Invalid(format!("demo config: {e}")))
}

/// Preprocessing of the demo: its training size, no crop, mean = std = 0.5.
pub fn pretrained() -> Result<PretrainedCfg> {
    let c = config()?;
    Ok(PretrainedCfg {
        hub_id: None,
        input_size: c.size,
        crop_pct: 1.0,
        interpolation: Interpolation::Bilinear,
        mean: [0.5; 3],
        std: [0.5; 3],
        num_classes: FASHION_MNIST_LABELS.len(),
    })
}

pub fn labels() -> Vec<String> {
    FASHION_MNIST_LABELS.iter().map(|s| s.to_string()).collect()
}

/// The demo model on `device`.
pub fn model(device: &Device) -> Result<Model> {
    let c = config()?;
    let m = Model::new(&c.model, device);
    weights::load_bytes(m, MODEL, std::path::Path::new("<embedded demo model>"), &LoadOptions::default())
}
