//! The shipped demo model: a width-0.25 Inception-ResNet-v1 trained with our own `train` on
//! Fashion-MNIST (75 px, grayscale). `classify` uses it when no model or weights are given, so
//! the first command works offline. The file describes itself (config, preprocessing, class
//! names; see `bundle`); `Bundle::demo` loads it. How it was made: `assets/demo/README.md`.

/// The weights, with their description in the safetensors metadata.
pub const MODEL: &[u8] = include_bytes!("../assets/demo/model.safetensors");
/// How the embedded model is named in messages.
pub const NAME: &str = "<embedded demo model>";
