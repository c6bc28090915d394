//! The `inception` command line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::predict::{EngineKind, Predictor};
use inception::train::{self, TrainConfig};
use inception::weights::{self, LoadOptions};
use inception::{bench, hub, labels, preprocess, summary};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "inception", version, about = "Inception-v4 and Inception-ResNet-v1/v2 in Rust (burn)")]
struct Cli {
    /// Compute device: cpu (burn flex), or vulkan / cuda when compiled in.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Executor for classify / embed / check / bench: `fast` (frozen CPU engine, default on
    /// cpu) or `burn` (default on GPU devices).
    #[arg(long, global = true)]
    engine: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Top-K classes of each image (preprocessing from the model's pretrained config).
    Classify {
        /// Without --model and --weights: the embedded Fashion-MNIST demo model.
        #[arg(long)]
        model: Option<String>,
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
    /// Time inference or a training step: median/min/max of N runs, images/s, peak RSS.
    Bench {
        #[arg(long, default_value = "inception_resnet_v2")]
        model: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 299)]
        size: usize,
        /// infer or train
        #[arg(long, default_value = "infer")]
        mode: String,
        /// Worker threads (sets RAYON_NUM_THREADS); default: all cores.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Train from scratch or fine-tune (the paper's recipe by default) on Fashion-MNIST or an
    /// image folder; checkpoints, metrics and the final EMA weights go to --out.
    Train {
        #[arg(long, default_value = "inception_resnet_v1")]
        model: String,
        /// `fashion-mnist`, an idx folder, or an image folder (class subfolders; or train/ + val/).
        #[arg(long)]
        data: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// JSON file with a full TrainConfig; flags given here override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long)]
        size: Option<usize>,
        /// Channel multiplier (Inception-ResNet models).
        #[arg(long)]
        width: Option<f64>,
        #[arg(long)]
        lr: Option<f64>,
        /// Initial weights for fine-tuning (reference key names); the classifier is replaced.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Keep the first N feature stages fixed (with --weights).
        #[arg(long)]
        freeze: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop each epoch after N steps (quick runs).
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long)]
        eval_limit: Option<usize>,
        #[arg(long)]
        checkpoint_every: Option<usize>,
        /// Data-parallel replicas of --device (GPU 0..N-1; on the CPU, N shards of each batch).
        #[arg(long)]
        devices: Option<usize>,
        /// Continue from --out/checkpoint.safetensors.
        #[arg(long)]
        resume: bool,
    },
    /// Top-1 / top-5 and loss on a dataset, single crop or the paper's multi-crop protocols.
    Eval {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        weights: Option<PathBuf>,
        /// A training run folder (uses its model.safetensors and config.json).
        #[arg(long)]
        run: Option<PathBuf>,
        #[arg(long)]
        data: String,
        /// 1, 12 or 144 crops per image.
        #[arg(long, default_value_t = 1)]
        crops: usize,
        #[arg(long)]
        size: Option<usize>,
        #[arg(long)]
        crop_pct: Option<f64>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Reproduce the paper's training claims at small scale: `residual-speedup` or
    /// `residual-scaling`; report, curves and CSV go to --out.
    Reproduce {
        experiment: String,
        #[arg(long, default_value = "fashion-mnist")]
        data: String,
        /// quick (<= 15 min on 2 CPU cores), full (GPU), or test (2 steps)
        #[arg(long, default_value = "quick")]
        budget: String,
        #[arg(long)]
        out: PathBuf,
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
    let key = format!("{}bias", weights::classifier_prefix(kind));
    Ok(weights::header_shape(path, &key)?.and_then(|s| s.first().copied()).unwrap_or(0))
}

fn load_predictor(model: &str, weights_path: Option<&Path>, engine: EngineKind, dev: &Device) -> Result<Predictor> {
    Ok(Predictor::new(load_model(model, weights_path, dev)?, engine, dev))
}

fn load_model(model: &str, weights_path: Option<&Path>, dev: &Device) -> Result<Model> {
    let kind: ModelKind = model.parse()?;
    let path = match weights_path {
        Some(p) => p.to_path_buf(),
        None => hub::fetch(kind)?,
    };
    let cfg = match weights::read_config(&path)? {
        Some(c) if c.model != kind => bail!("{} holds {} weights, not {kind}", path.display(), c.model),
        Some(c) => c,
        None => ModelConfig::new(kind, classes_in_file(kind, &path)?),
    };
    let m = Model::new(&cfg, dev);
    let m = weights::load(m, &path, &LoadOptions::default())?;
    Ok(m)
}

#[derive(Serialize)]
struct Prediction {
    image: String,
    top: Vec<(usize, String, f32)>,
}

fn classify(m: &Predictor, demo: bool, top: usize, json: bool, images: &[PathBuf]) -> Result<bool> {
    let cfg = if demo { inception::demo::pretrained()? } else { m.kind().pretrained() };
    let names = match (demo, m.num_classes()) {
        (true, _) => inception::demo::labels(),
        (false, 1000) => labels::imagenet(),
        _ => Vec::new(),
    };
    let mut ok = true;
    let mut results = Vec::new();
    for path in images {
        let loaded = if demo {
            // the demo saw grayscale Fashion-MNIST: luma repeated to 3 channels
            preprocess::load_rgb(path).map(|i| {
                let g = image::DynamicImage::ImageRgb8(i).to_luma8();
                preprocess::transform(&image::DynamicImage::ImageLuma8(g).to_rgb8(), &cfg, cfg.input_size)
            })
        } else {
            preprocess::load_image(path, &cfg, cfg.input_size)
        };
        let img = match loaded {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
                continue;
            }
        };
        let s = cfg.input_size;
        let p = inception::predict::softmax(&m.run(&img, [1, 3, s, s], false).logits.data);
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

fn embed(m: &Predictor, layer: &str, out: &Path, batch: usize, inputs: &[PathBuf]) -> Result<bool> {
    let cfg = m.kind().pretrained();
    let stage = if layer == "pooled" {
        None
    } else {
        let info = inception::models::feature_info(m.kind(), m.width());
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
        let s = cfg.input_size;
        let flat: Vec<f32> = imgs.concat();
        let mut o = m.run(&flat, [imgs.len(), 3, s, s], stage.is_some());
        let t = match stage {
            None => o.embedding,
            Some(i) => o.stages.swap_remove(i),
        };
        shape = t.shape;
        data.extend(t.data);
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

fn check(m: &Predictor, inputs: &Path, atol: f32) -> Result<bool> {
    let bytes = weights::read_file(inputs)?;
    let st = weights::parse(inputs, &bytes)?;
    let x = weights::tensor_f32(inputs, &st, "input")?;
    let [n, c, h, w] = x.shape[..] else {
        bail!("{}: 'input' must be [N, 3, H, W], found {:?}", inputs.display(), x.shape);
    };
    if c != 3 {
        bail!("{}: 'input' must be [N, 3, H, W], found {:?}", inputs.display(), x.shape);
    }
    // Optional feature maps `stage0..stage4` (timm `forward_intermediates` order).
    let has_stages = st.names().iter().any(|k| k.starts_with("stage"));
    let out = m.run(&x.data, [n, c, h, w], has_stages);
    let mut got: Vec<(String, &inception::predict::Output)> =
        out.stages.iter().enumerate().map(|(i, o)| (format!("stage{i}"), o)).collect();
    got.push(("logits".into(), &out.logits));
    got.push(("pre_logits".into(), &out.pre_logits));
    got.push(("embedding".into(), &out.embedding));
    let mut ok = true;
    let mut compared = 0;
    for (name, o) in got {
        let Ok(expected) = weights::tensor_f32(inputs, &st, &name) else { continue };
        let (pass, diff) = compare(&o.shape, &o.data, &expected, atol);
        println!("{name} max_abs_diff={diff:.3e} {}", if pass { "ok" } else { "FAIL" });
        ok &= pass;
        compared += 1;
    }
    if compared == 0 {
        bail!("{}: none of logits, pre_logits, embedding, stage0..4 present", inputs.display());
    }
    Ok(ok)
}

fn run(cli: Cli) -> Result<bool> {
    if let Cmd::Bench { threads: Some(t), .. } = &cli.cmd {
        // SAFETY: no other thread exists yet; the thread pool reads this when it starts.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", t.to_string()) };
    }
    let dev = device(&cli.device)?;
    let engine: EngineKind = match &cli.engine {
        Some(e) => e.parse()?,
        None if cli.device == "cpu" || cli.device == "flex" => EngineKind::Fast,
        None => EngineKind::Burn,
    };
    if engine == EngineKind::Fast && !(cli.device == "cpu" || cli.device == "flex") {
        bail!("the fast engine runs on the cpu only; use --engine burn with --device {}", cli.device);
    }
    match cli.cmd {
        Cmd::Bench { model, batch, size, mode, threads, warmup, runs, json } => {
            let mode = match mode.as_str() {
                "infer" => bench::BenchMode::Infer,
                "train" => bench::BenchMode::Train,
                other => bail!("unknown mode '{other}' (infer, train)"),
            };
            let cfg = bench::BenchConfig {
                model: model.parse()?,
                mode,
                batch,
                size,
                warmup,
                runs,
                device: cli.device.clone(),
                engine: if mode == bench::BenchMode::Train { EngineKind::Burn } else { engine },
                threads,
            };
            let r = bench::run(&cfg, &dev)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r}");
            }
            Ok(true)
        }
        Cmd::Classify { model, weights, top, json, images } => match (model, weights) {
            (None, None) => {
                let m = Predictor::new(inception::demo::model(&dev)?, engine, &dev);
                classify(&m, true, top, json, &images)
            }
            (model, weights) => {
                let from_file = weights.as_deref().and_then(|w| weights::read_config(w).ok().flatten());
                let model = model.or(from_file.map(|c| c.model.name().to_string()));
                let model = model.unwrap_or_else(|| "inception_resnet_v2".to_string());
                classify(&load_predictor(&model, weights.as_deref(), engine, &dev)?, false, top, json, &images)
            }
        },
        Cmd::Embed { model, weights, layer, out, batch, inputs } => {
            embed(&load_predictor(&model, weights.as_deref(), engine, &dev)?, &layer, &out, batch, &inputs)
        }
        Cmd::Check { model, weights, inputs, atol } => {
            check(&load_predictor(&model, Some(&weights), engine, &dev)?, &inputs, atol)
        }
        Cmd::Train {
            model,
            data,
            out,
            config,
            epochs,
            batch,
            size,
            width,
            lr,
            weights,
            freeze,
            seed,
            max_steps,
            eval_limit,
            checkpoint_every,
            devices,
            resume,
        } => {
            let saved = if resume { train::saved_config(&out)? } else { None };
            let mut cfg = match (&config, saved) {
                (None, Some(saved)) => saved,
                (config, _) => match config {
                    Some(p) => serde_json::from_slice::<TrainConfig>(
                        &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                    )
                    .with_context(|| format!("{}: not a train config", p.display()))?,
                    None => {
                        let data = data.clone().context("--data is required (or --config)")?;
                        let mut c = TrainConfig::new(model.parse()?, &data);
                        if data.contains("fashion") {
                            // small grayscale images: the smallest input the nets take, no crop
                            c.size = 75;
                            c.crop_pct = 1.0;
                            c.min_area = 0.5;
                        }
                        c
                    }
                },
            };
            if let Some(d) = data {
                cfg.data = d;
            }
            macro_rules! set {
                ($($f:ident => $dst:expr),*) => {$(if let Some(v) = $f { $dst = v; })*};
            }
            set!(epochs => cfg.epochs, batch => cfg.batch, size => cfg.size, width => cfg.model.width, lr => cfg.lr,
                 freeze => cfg.freeze, seed => cfg.seed, devices => cfg.devices);
            if weights.is_some() {
                cfg.weights = weights;
            }
            cfg.max_steps = max_steps.or(cfg.max_steps);
            cfg.eval_limit = eval_limit.or(cfg.eval_limit);
            cfg.checkpoint_every = checkpoint_every.or(cfg.checkpoint_every);
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut epoch_start = true;
            let summary = train::train(cfg, &out, resume, &dev, &mut |s, n, loss| {
                if epoch_start || s == 1 {
                    bar.reset();
                    bar.set_length(n as u64);
                    epoch_start = false;
                }
                bar.set_position(s as u64);
                bar.set_message(format!("loss {loss:.4}"));
                if s == n {
                    epoch_start = true;
                }
                true
            })?;
            bar.finish_and_clear();
            let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
            println!("{metrics}");
            println!(
                "trained {} epochs, eval top-1 {:.4}; weights: {} ({} unreadable images skipped)",
                summary.epochs,
                summary.final_eval_top1,
                summary.model_path.display(),
                summary.skipped
            );
            Ok(true)
        }
        Cmd::Eval { model, weights, run, data, crops, size, crop_pct, limit, batch, json } => {
            if ![1, 12, 144].contains(&crops) {
                bail!("--crops must be 1, 12 or 144");
            }
            let (wpath, run_cfg) = match (&run, &weights) {
                (Some(r), _) => {
                    let c: TrainConfig = serde_json::from_slice(
                        &std::fs::read(r.join("config.json"))
                            .with_context(|| format!("{}: no config.json", r.display()))?,
                    )?;
                    (r.join("model.safetensors"), Some(c))
                }
                (None, Some(w)) => (w.clone(), None),
                (None, None) => bail!("give --weights FILE or --run RUN_DIR"),
            };
            let kind = match (&model, weights::read_config(&wpath)?, &run_cfg) {
                (Some(m), _, _) => m.clone(),
                (None, Some(c), _) => c.model.name().to_string(),
                (None, None, Some(c)) => c.model.model.name().to_string(),
                (None, None, None) => bail!("--model is required for {}", wpath.display()),
            };
            let p = load_predictor(&kind, Some(&wpath), engine, &dev)?;
            let pre = p.kind().pretrained();
            let size = size.or(run_cfg.as_ref().map(|c| c.size)).unwrap_or(pre.input_size);
            let crop_pct = crop_pct.or(run_cfg.as_ref().map(|c| c.crop_pct)).unwrap_or(pre.crop_pct);
            let ds = train::data::Dataset::open(&data, false)?;
            if p.num_classes() != ds.classes.len() {
                bail!("the model has {} classes, {} has {}", p.num_classes(), ds.name, ds.classes.len());
            }
            let r = train::evaluate(&p, &ds, size, crop_pct, crops, limit, batch);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} images, {} crop(s): top-1 {:.4} top-5 {:.4} loss {:.4} ({} unreadable skipped)",
                    r.images, r.crops, r.top1, r.top5, r.loss, r.skipped
                );
            }
            Ok(r.skipped == 0)
        }
        Cmd::Reproduce { experiment, data, budget, out } => {
            use inception::train::reproduce::{self, Budget, Experiment};
            let exp: Experiment =
                serde_json::from_value(serde_json::Value::String(experiment.clone())).map_err(|_| {
                    anyhow::anyhow!("unknown experiment '{experiment}' (residual-speedup, residual-scaling)")
                })?;
            let budget: Budget = serde_json::from_value(serde_json::Value::String(budget.clone()))
                .map_err(|_| anyhow::anyhow!("unknown budget '{budget}' (quick, full, test)"))?;
            let report = reproduce::run(exp, budget, &data, &out, &dev)?;
            println!("{}", std::fs::read_to_string(&report)?);
            Ok(true)
        }
        Cmd::Summary { model, size, json } => {
            let kind: ModelKind = model.parse()?;
            let m = Model::new(&ModelConfig::new(kind, kind.pretrained().num_classes), &dev);
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
