//! Fine-tune a model on an image folder (one subfolder per class) with the paper's recipe,
//! starting from a weight file, with a new classifier and the stem frozen.
//!
//!     cargo run --release --example fine_tune -- WEIGHTS.safetensors DATA_DIR RUN_DIR

use burn::tensor::Device;
use inception::models::ModelKind;
use inception::train::{TrainConfig, train};

fn main() -> inception::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, data, out] = &args[..] else {
        eprintln!("usage: fine_tune WEIGHTS DATA_DIR RUN_DIR");
        std::process::exit(2);
    };
    let kind = inception::Bundle::load(None, Some(weights.as_ref()), &Device::flex())?.model.kind();
    let mut cfg = TrainConfig::new(kind, data);
    cfg.weights = Some(weights.into());
    cfg.freeze = 2; // the stem stages keep their weights
    cfg.epochs = 2;
    cfg.lr = 0.01;
    if kind == ModelKind::InceptionResnetV1 {
        cfg.size = 160;
    }
    let s = train(cfg, out.as_ref(), false, &Device::flex(), &mut |step, steps, loss| {
        eprint!("\rstep {step}/{steps} loss {loss:.4}   ");
        true
    })?;
    println!("\ntop-1 {:.4}; weights in {}", s.final_eval_top1, s.model_path.display());
    Ok(())
}
