//! inception-rs: Inception-v4, Inception-ResNet-v1 and Inception-ResNet-v2 (Szegedy, Ioffe,
//! Vanhoucke, Alemi, AAAI 2017) on burn, with strict import of the timm / facenet-pytorch
//! weights.

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
pub mod bundle;
pub mod commands;
pub mod demo;
pub mod engine;
pub mod hub;
pub mod labels;
pub mod lower;
pub mod predict;
pub mod preprocess;
pub mod serve;
pub mod sgemm;
pub mod summary;
pub mod train;
