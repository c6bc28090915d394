//! Pooled embeddings of images (IR-v1: the L2-normalised face embedding), and their cosine
//! similarities.
//!
//!     cargo run --release --example embed -- IMAGE IMAGE...

use burn::tensor::Device;
use inception::Bundle;
use inception::predict::{EngineKind, Predictor};

fn main() -> inception::Result<()> {
    let images: Vec<String> = std::env::args().skip(1).collect();
    let device = Device::flex();
    let bundle = Bundle::demo(&device)?;
    let predictor = Predictor::new(bundle.model.clone(), EngineKind::Fast, &device);
    let s = bundle.pre.input_size;
    let mut embeddings = Vec::new();
    for path in &images {
        let x = bundle.pre.load(std::path::Path::new(path))?;
        let e = predictor.run(&x, [1, 3, s, s], false).embedding.data;
        let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        embeddings.push(e.iter().map(|v| v / norm).collect::<Vec<f32>>());
    }
    for (i, a) in embeddings.iter().enumerate() {
        for (j, b) in embeddings.iter().enumerate().skip(i + 1) {
            let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            println!("{} ~ {}: cosine {cos:.3}", images[i], images[j]);
        }
    }
    Ok(())
}
