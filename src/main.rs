//! The `inception` command line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::{Parser, Subcommand};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::weights::{self, LoadOptions};
use inception::{hub, labels, preprocess, summary};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "inception", version, about = "Inception-v4 and Inception-ResNet-v1/v2 in Rust (burn)")]
struct Cli {
    /// Compute device: cpu (burn flex), or vulkan / cuda when compiled in.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Top-K classes of each image (preprocessing from the model's pretrained config).
    Classify {
        #[arg(long, default_value = "inception_resnet_v2")]
        model: String,
        /// Local safetensors file; without it the published weights are fetched from the hub.
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        top: usize,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Images or folders to a safetensors file of embeddings (pooled features or a stage's map).
    Embed {
        #[arg(long, default_value = "inception_resnet_v2")]
        model: String,
        #[arg(long)]
        weights: Option<PathBuf>,
        /// `pooled` (IR-v1: the L2-normalised 512-d face embedding) or a stage name from `summary`.
        #[arg(long, default_value = "pooled")]
        layer: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Compare an eval forward on `input` of IO.safetensors with its `logits` / `pre_logits` /
    /// `embedding`; exit 0 iff every present tensor is within atol.
    Check {
        #[arg(long)]
        model: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long, default_value_t = 1e-4)]
        atol: f32,
    },
    /// Per stage output shape, parameters and MACs.
    Summary {
        #[arg(long, default_value = "inception_resnet_v2")]
        model: String,
        #[arg(long)]
        size: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" | "gpu" => Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(0))),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        other => bail!(
            "device '{other}' is not available in this build (cpu{}{})",
            if cfg!(feature = "vulkan") { ", vulkan" } else { "" },
            if cfg!(feature = "cuda") { ", cuda" } else { "" }
        ),
    }
}

/// Infer the class count from the file's classifier so any fine-tuned head loads.
fn classes_in_file(kind: ModelKind, path: &Path) -> Result<usize> {
    let bytes = weights::read_file(path)?;
    let st = weights::parse(path, &bytes)?;
    let key = match kind {
        ModelKind::InceptionV4 => "last_linear.bias",
        ModelKind::InceptionResnetV2 => "classif.bias",
        ModelKind::InceptionResnetV1 => "logits.bias",
    };
    Ok(st.tensor(key).map(|t| t.shape().first().copied().unwrap_or(0)).unwrap_or(0))
}

fn load_model(model: &str, weights_path: Option<&Path>, dev: &Device) -> Result<Model> {
    let kind: ModelKind = model.parse()?;
    let path = match weights_path {
        Some(p) => p.to_path_buf(),
        None => hub::fetch(kind)?,
    };
    let num_classes = classes_in_file(kind, &path)?;
    let m = Model::new(&ModelConfig { model: kind, num_classes }, dev);
    let m = weights::load(m, &path, &LoadOptions::default())?;
    Ok(m)
}

fn to_vec2(t: Tensor<2>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (dims, t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default())
}

#[derive(Serialize)]
struct Prediction {
    image: String,
    top: Vec<(usize, String, f32)>,
}

fn classify(
    model: &str,
    weights_path: Option<&Path>,
    top: usize,
    json: bool,
    images: &[PathBuf],
    dev: &Device,
) -> Result<bool> {
    let m = load_model(model, weights_path, dev)?;
    let cfg = m.kind().pretrained();
    let names = if m.num_classes() == 1000 { labels::imagenet() } else { Vec::new() };
    let mut ok = true;
    let mut results = Vec::new();
    for path in images {
        let img = match preprocess::load_image(path, &cfg, cfg.input_size) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
                continue;
            }
        };
        let x = preprocess::batch(&[img], cfg.input_size, dev);
        let probs = burn::tensor::activation::softmax(m.forward(x), 1);
        let (_, p) = to_vec2(probs);
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top: Vec<(usize, String, f32)> = idx
            .into_iter()
            .take(top)
            .map(|i| (i, names.get(i).cloned().unwrap_or_else(|| format!("class {i}")), p[i]))
            .collect();
        if !json {
            println!("{}", path.display());
            for (i, name, prob) in &top {
                println!("  {prob:>7.4}  {name} ({i})");
            }
        }
        results.push(Prediction { image: path.display().to_string(), top });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(ok)
}

fn embed(
    model: &str,
    weights_path: Option<&Path>,
    layer: &str,
    out: &Path,
    batch: usize,
    inputs: &[PathBuf],
    dev: &Device,
) -> Result<bool> {
    let m = load_model(model, weights_path, dev)?;
    let cfg = m.kind().pretrained();
    let stage = if layer == "pooled" {
        None
    } else {
        let info = m.feature_info();
        Some(info.iter().position(|f| f.module == layer).with_context(|| {
            format!(
                "unknown layer '{layer}' (pooled, {})",
                info.iter().map(|f| f.module.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?)
    };
    let paths = preprocess::collect_images(inputs)?;
    let mut done_paths = Vec::new();
    let mut skipped = Vec::new();
    let mut data = Vec::new();
    let mut shape: Vec<usize> = Vec::new();
    for chunk in paths.chunks(batch.max(1)) {
        let mut imgs = Vec::new();
        for p in chunk {
            match preprocess::load_image(p, &cfg, cfg.input_size) {
                Ok(v) => {
                    imgs.push(v);
                    done_paths.push(p.display().to_string());
                }
                Err(e) => {
                    eprintln!("skipped: {e}");
                    skipped.push(p.display().to_string());
                }
            }
        }
        if imgs.is_empty() {
            continue;
        }
        let x = preprocess::batch(&imgs, cfg.input_size, dev);
        let (dims, v) = match stage {
            None => to_vec2(m.embed(x)),
            Some(s) => {
                let t = m.forward_stages(x).swap_remove(s);
                (t.dims().to_vec(), t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default())
            }
        };
        shape = dims;
        data.extend(v);
    }
    if done_paths.is_empty() {
        bail!("no image could be read ({} skipped)", skipped.len());
    }
    shape[0] = done_paths.len();
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("embeddings".to_string(), (shape.clone(), data));
    let meta = HashMap::from([
        ("paths".to_string(), serde_json::to_string(&done_paths)?),
        ("skipped".to_string(), serde_json::to_string(&skipped)?),
        ("model".to_string(), m.kind().name().to_string()),
        ("layer".to_string(), layer.to_string()),
    ]);
    weights::save_tensors(out, &tensors, Some(meta))?;
    println!("wrote {} embeddings {:?} to {} ({} skipped)", done_paths.len(), shape, out.display(), skipped.len());
    Ok(skipped.is_empty())
}

/// `(within atol, max |a - b|)`; a shape mismatch fails with an infinite difference.
fn compare(shape: &[usize], got: &[f32], expected: &weights::FileTensor, atol: f32) -> (bool, f32) {
    if shape != expected.shape.as_slice() {
        eprintln!("shape mismatch: expected {:?}, got {:?}", expected.shape, shape);
        return (false, f32::INFINITY);
    }
    let diff = got
        .iter()
        .zip(&expected.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
    (diff <= atol, diff)
}

fn check(model: &str, weights_path: &Path, inputs: &Path, atol: f32, dev: &Device) -> Result<bool> {
    let m = load_model(model, Some(weights_path), dev)?;
    let bytes = weights::read_file(inputs)?;
    let st = weights::parse(inputs, &bytes)?;
    let x = weights::tensor_f32(inputs, &st, "input")?;
    if x.shape.len() != 4 || x.shape[1] != 3 {
        bail!("{}: 'input' must be [N, 3, H, W], found {:?}", inputs.display(), x.shape);
    }
    let x = Tensor::<4>::from_data(TensorData::new(x.data, x.shape.clone()), dev);
    let stages = m.forward_stages(x.clone());
    let feats = m.forward_features(x);
    let pre = m.forward_head(feats.clone(), true);
    let mut ok = true;
    let mut compared = 0;
    // Optional feature maps `stage0..stage4` (timm `forward_intermediates` order).
    for (i, t) in stages.into_iter().enumerate() {
        let Ok(expected) = weights::tensor_f32(inputs, &st, &format!("stage{i}")) else { continue };
        let shape = t.dims().to_vec();
        let got = t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let (pass, diff) = compare(&shape, &got, &expected, atol);
        println!("stage{i} max_abs_diff={diff:.3e} {}", if pass { "ok" } else { "FAIL" });
        ok &= pass;
        compared += 1;
    }
    for name in ["logits", "pre_logits", "embedding"] {
        let Ok(expected) = weights::tensor_f32(inputs, &st, name) else { continue };
        let got = match name {
            "logits" => m.forward_head(feats.clone(), false),
            "pre_logits" => pre.clone(),
            _ => inception::models::l2_normalize(pre.clone()),
        };
        let (shape, got) = to_vec2(got);
        let (pass, diff) = compare(&shape, &got, &expected, atol);
        println!("{name} max_abs_diff={diff:.3e} {}", if pass { "ok" } else { "FAIL" });
        ok &= pass;
        compared += 1;
    }
    if compared == 0 {
        bail!("{}: none of logits, pre_logits, embedding present", inputs.display());
    }
    Ok(ok)
}

fn run(cli: Cli) -> Result<bool> {
    let dev = device(&cli.device)?;
    match cli.cmd {
        Cmd::Classify { model, weights, top, json, images } => {
            classify(&model, weights.as_deref(), top, json, &images, &dev)
        }
        Cmd::Embed { model, weights, layer, out, batch, inputs } => {
            embed(&model, weights.as_deref(), &layer, &out, batch, &inputs, &dev)
        }
        Cmd::Check { model, weights, inputs, atol } => check(&model, &weights, &inputs, atol, &dev),
        Cmd::Summary { model, size, json } => {
            let kind: ModelKind = model.parse()?;
            let m = Model::new(&ModelConfig { model: kind, num_classes: kind.pretrained().num_classes }, &dev);
            let s = summary::summarize(&m, size.unwrap_or(kind.pretrained().input_size), &dev)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{s}");
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
