//! Classify images with a model file (ours, timm's, or converted facenet) or the demo model.
//!
//!     cargo run --release --example classify -- [--weights FILE] IMAGE...

use burn::tensor::Device;
use inception::predict::{EngineKind, Predictor};
use inception::{Bundle, commands};

fn main() -> inception::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let weights = match args.iter().position(|a| a == "--weights") {
        Some(i) if i + 1 < args.len() => {
            Some(std::path::PathBuf::from(args.drain(i..=i + 1).nth(1).unwrap_or_default()))
        }
        _ => None,
    };
    let device = Device::flex();
    let bundle = Bundle::load(None, weights.as_deref(), &device)?;
    let predictor = Predictor::new(bundle.model.clone(), EngineKind::Fast, &device);
    let images: Vec<std::path::PathBuf> = args.iter().map(Into::into).collect();
    for p in commands::classify(&bundle, &predictor, &images, 3) {
        match p.error {
            Some(e) => eprintln!("{}: {e}", p.image),
            None => println!(
                "{}: {}",
                p.image,
                p.top.iter().map(|c| format!("{} {:.3}", c.name, c.prob)).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(())
}
