//! inception-rs: Inception-v4, Inception-ResNet-v1 and Inception-ResNet-v2 (Szegedy, Ioffe,
//! Vanhoucke, Alemi, AAAI 2017) on burn, with strict import of the timm / facenet-pytorch
//! weights.
//!
//! Load a model with what it takes to use it (`Bundle`: weights, config, preprocessing, class
//! names), freeze it into an executor (`Predictor`), classify an image:
//!
//! ```
//! use burn::tensor::Device;
//! use inception::predict::{EngineKind, Predictor};
//! use inception::{Bundle, commands};
//!
//! let device = Device::flex();
//! // `Bundle::load(Some("inception_resnet_v2"), Some(path), &device)` for a timm file; here
//! // the Fashion-MNIST demo model shipped in the binary
//! let bundle = Bundle::demo(&device)?;
//! let predictor = Predictor::new(bundle.model.clone(), EngineKind::Fast, &device);
//! let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/samples/bag_18.png");
//! let x = bundle.pre.load(&image)?; // the exact tensor timm's eval transform would give
//! let s = bundle.pre.input_size;
//! let logits = predictor.run(&x, [1, 3, s, s], false).logits.data;
//! let top = commands::top_k(&bundle.classes, &logits, 3)?;
//! assert_eq!(top[0].name, "Bag");
//! # Ok::<(), inception::Error>(())
//! ```

pub mod args;
pub mod error;
pub mod layers;
pub mod models;
pub mod weights;

pub use bundle::Bundle;
pub use error::{Error, KeyProblem, Result};
pub use models::{Model, ModelConfig, ModelKind};
pub use preprocess::Preprocess;
pub mod bench;
mod buffers;
pub mod bundle;
pub mod commands;
pub mod demo;
pub mod devices;
pub mod engine;
pub mod faces;
pub mod hub;
pub mod labels;
pub mod lower;
pub mod predict;
pub mod preprocess;
pub mod quant;
pub mod serve;
pub mod sgemm;
pub mod summary;
pub mod train;
pub mod winograd;
