//! The `inception` command line: parses flags, calls the library (`commands`, `train`,
//! `bench`, `summary`), prints. Exit codes: 0 ok, 1 some inputs failed, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand};
use inception::bundle::{self, Bundle};
use inception::devices::DeviceArg;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::predict::{EngineKind, Predictor};
use inception::train::reproduce::{Budget, Experiment};
use inception::{args, bench, commands, summary, train};

#[derive(Parser)]
#[command(
    name = "inception",
    version,
    about = "Inception-v4 and Inception-ResNet-v1/v2 (Szegedy et al. 2017) in Rust",
    after_help = "Examples:\n  inception classify photo.jpg                      # the embedded Fashion-MNIST demo\n  \
                  inception classify --model inception_resnet_v2 --weights model.safetensors photo.jpg\n  \
                  inception preprocess --model inception_v4 photo.jpg --out x.safetensors\n  \
                  inception train --model inception_resnet_v1 --data fashion-mnist --out runs/a --epochs 4"
)]
struct Cli {
    /// Compute device: cpu (burn flex), or vulkan[:N] / cuda[:N] when compiled in (see
    /// `inception devices`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Executor for classify / embed / check / eval / bench: `fast` (frozen CPU engine,
    /// default on cpu) or `burn` (default on GPU devices).
    #[arg(long, global = true, value_parser = ["fast", "burn"])]
    engine: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where a model comes from: both absent = the embedded demo; `--model` alone = published
/// weights from the hub; `--weights` = a local file (its own description wins).
#[derive(clap::Args)]
struct Source {
    /// Network (default: what the weight file says, or the demo model).
    #[arg(long, value_parser = args::model())]
    model: Option<ModelKind>,
    /// Local safetensors file (ours, timm's or converted facenet-pytorch).
    #[arg(long)]
    weights: Option<PathBuf>,
}

fn usize_range(lo: u64, hi: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(lo..=hi)
}

#[derive(Subcommand)]
enum Cmd {
    /// Top-K classes of each image (preprocessing as the model file says).
    Classify {
        #[command(flatten)]
        src: Source,
        /// How many classes to print per image.
        #[arg(long, default_value_t = 5, value_parser = usize_range(1, 100_000))]
        top: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Image files (JPEG, PNG, WebP, BMP).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Images or folders to a safetensors file of embeddings (pooled features or a stage's map).
    Embed {
        #[command(flatten)]
        src: Source,
        /// `pooled` (IR-v1: the L2-normalised 512-d face embedding) or a stage name from `summary`.
        #[arg(long, default_value = "pooled")]
        layer: String,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Images per forward pass.
        #[arg(long, default_value_t = 8, value_parser = usize_range(1, 1024))]
        batch: usize,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Write the exact input tensor the network sees for an image (`input`, [1, 3, H, W]).
    Preprocess {
        #[command(flatten)]
        src: Source,
        /// Override the input size (75 to 2048).
        #[arg(long, value_parser = usize_range(75, 2048))]
        size: Option<usize>,
        /// Override the crop fraction, in (0, 1].
        #[arg(long, value_parser = args::crop_pct)]
        crop_pct: Option<f64>,
        image: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare an eval forward on `input` of IO.safetensors with its `logits` / `pre_logits` /
    /// `embedding` / `stage0..4`; exit 0 iff every present tensor is within atol.
    Check {
        #[command(flatten)]
        src: Source,
        /// Reference file with `input` and the expected outputs.
        #[arg(long)]
        inputs: PathBuf,
        /// Largest allowed absolute difference.
        #[arg(long, default_value_t = 1e-4, value_parser = args::tolerance)]
        atol: f32,
    },
    /// Time inference or a training step: median/min/max of N runs, images/s, peak RSS.
    Bench {
        #[arg(long, default_value = "inception_resnet_v2", value_parser = args::model())]
        model: ModelKind,
        /// Images per run.
        #[arg(long, default_value_t = 1, value_parser = usize_range(1, 4096))]
        batch: usize,
        /// Input size (75 to 2048).
        #[arg(long, default_value_t = 299, value_parser = usize_range(75, 2048))]
        size: usize,
        /// What to time.
        #[arg(long, default_value = "infer", value_parser = ["infer", "train"])]
        mode: String,
        /// Worker threads (sets RAYON_NUM_THREADS); default: all cores.
        #[arg(long, value_parser = usize_range(1, 1024))]
        threads: Option<usize>,
        /// Untimed runs first.
        #[arg(long, default_value_t = 2, value_parser = usize_range(0, 1000))]
        warmup: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 10, value_parser = usize_range(1, 10_000))]
        runs: usize,
        /// Arithmetic of inference: f32, or int8 (the fast engine quantized, calibrated on
        /// synthetic images).
        #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
        precision: String,
        /// Channel multiplier, in (0, 4].
        #[arg(long, default_value_t = 1.0, value_parser = args::width)]
        width: f64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Post-training static int8 quantization: calibrate on images, write a self-describing
    /// int8 model (per-channel int8 weights, uint8 activations) that classify, embed, eval,
    /// serve and bench run on the fast engine.
    Quantize {
        #[command(flatten)]
        src: Source,
        /// Calibration images: a folder, or a dataset (`fashion-mnist`: its training split).
        #[arg(long)]
        calib: String,
        /// How many calibration images (at least 100 recommended).
        #[arg(long, default_value_t = 200, value_parser = usize_range(1, 100_000))]
        images: usize,
        /// Percentile of each activation's calibration values mapped to 255 (100 = maximum).
        #[arg(long, default_value_t = 99.99, value_parser = args::percentile)]
        percentile: f64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train from scratch or fine-tune (the paper's recipe by default) on Fashion-MNIST or an
    /// image folder; checkpoints, metrics and the final EMA weights go to --out.
    Train {
        #[command(flatten)]
        flags: train::TrainFlags,
        /// Run folder (config, checkpoints, metrics, curves, model).
        #[arg(long)]
        out: PathBuf,
    },
    /// Top-1 / top-5 and loss on a dataset, single crop or the paper's multi-crop protocols.
    Eval {
        #[command(flatten)]
        src: Source,
        /// A training run folder (uses its model.safetensors).
        #[arg(long, conflicts_with = "weights")]
        run: Option<PathBuf>,
        /// `fashion-mnist`, an idx folder, or an image folder.
        #[arg(long)]
        data: String,
        /// Crops per image: 1, 12 or 144.
        #[arg(long, default_value = "1", value_parser = ["1", "12", "144"])]
        crops: String,
        /// Override the input size (75 to 2048).
        #[arg(long, value_parser = usize_range(75, 2048))]
        size: Option<usize>,
        /// Override the crop fraction, in (0, 1].
        #[arg(long, value_parser = args::crop_pct)]
        crop_pct: Option<f64>,
        /// Evaluate the first N images only.
        #[arg(long, value_parser = usize_range(1, u64::MAX))]
        limit: Option<usize>,
        /// Images per forward pass (single crop).
        #[arg(long, default_value_t = 32, value_parser = usize_range(1, 4096))]
        batch: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Reproduce the paper's training claims at small scale; report, curves and CSV go to --out.
    Reproduce {
        /// residual-speedup or residual-scaling.
        #[arg(value_parser = ["residual-speedup", "residual-scaling"])]
        experiment: String,
        /// `fashion-mnist`, an idx folder, or an image folder.
        #[arg(long, default_value = "fashion-mnist")]
        data: String,
        /// quick (<= 15 min on 2 CPU cores), medium (about 2 hours there), full (GPU), or test
        /// (2 steps).
        #[arg(long, default_value = "quick", value_parser = ["test", "quick", "medium", "full"])]
        budget: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// An HTTP service: POST /v1/classify, /v1/embed; GET / (a page), /v1/models, /healthz,
    /// /metrics. Without --model / --weights: the embedded demo model.
    Serve {
        #[command(flatten)]
        src: Source,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Most requests in one forward pass.
        #[arg(long, default_value_t = 8, value_parser = usize_range(1, 1024))]
        max_batch: usize,
        /// How long the engine waits for more requests to batch, in milliseconds.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        batch_window_ms: u64,
        /// Requests waiting for the engine before new ones get 503.
        #[arg(long, default_value_t = 64, value_parser = usize_range(1, 1_000_000))]
        queue: usize,
        /// Largest request body in MB (413 above).
        #[arg(long, default_value_t = 20, value_parser = usize_range(1, 1024))]
        max_body_mb: usize,
    },
    /// Faces: detect (MTCNN), embed (Inception-ResNet-v1), verify, and the LFW pairs protocol.
    Faces {
        #[command(subcommand)]
        cmd: FacesCmd,
    },
    /// Redraw the plots of a training run folder or a `reproduce` folder from its results.
    Plot {
        /// A run folder (metrics.json) or an experiment folder (results.csv).
        dir: PathBuf,
    },
    /// The compute devices of this machine and what each `--device` value selects.
    Devices,
    /// Per stage output shape, parameters and MACs.
    Summary {
        #[arg(long, default_value = "inception_resnet_v2", value_parser = args::model())]
        model: ModelKind,
        /// Input size (75 to 2048; default: the model's).
        #[arg(long, value_parser = usize_range(75, 2048))]
        size: Option<usize>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FacesCmd {
    /// Faces of each image: box [x1, y1, x2, y2], probability, 5 landmarks (eyes, nose, mouth).
    Detect {
        #[command(flatten)]
        detect: DetectFlags,
        /// Keep one face per image, chosen by this rule (default: all faces, largest first).
        #[arg(long, value_parser = ["largest", "probability", "largest_over_threshold", "center_weighted_size"])]
        select: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Write each image with its boxes and landmarks drawn into this folder.
        #[arg(long)]
        draw: Option<PathBuf>,
        /// Repeat the detection N times and report its median time per image.
        #[arg(long, default_value_t = 1, value_parser = usize_range(1, 10_000))]
        runs: usize,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Detect, align and embed every face into a safetensors file (`embeddings` [faces, d];
    /// image, face index and box per row in the metadata).
    Embed {
        #[command(flatten)]
        face: FaceFlags,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Distance between the faces of two photos (the selected face of each) and the decision.
    Verify {
        #[command(flatten)]
        face: FaceFlags,
        /// Same person when the Euclidean distance of the unit embeddings is below this.
        #[arg(long, default_value_t = 1.1, value_parser = args::distance)]
        threshold: f32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        a: PathBuf,
        b: PathBuf,
    },
    /// The LFW protocol on a pairs file: 10-fold accuracy, validation rate at FAR 1e-3, ROC.
    EvalPairs {
        #[command(flatten)]
        face: FaceFlags,
        /// LFW's pairs.txt, or lines `PATH_A PATH_B 1|0`.
        #[arg(long)]
        pairs: PathBuf,
        /// Folder the pairs' images are under.
        #[arg(long)]
        root: PathBuf,
        /// Folder for roc.csv, roc.png and report.json.
        #[arg(long, default_value = "eval-pairs")]
        out: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// MTCNN settings (facenet-pytorch's defaults).
#[derive(clap::Args)]
struct DetectFlags {
    /// Smallest face searched for, in pixels.
    #[arg(long, default_value_t = 20.0, value_parser = args::min_face)]
    min_face_size: f32,
    /// P-, R- and O-Net probability thresholds.
    #[arg(long, default_value = "0.6,0.7,0.7", value_parser = args::thresholds)]
    thresholds: [f32; 3],
    /// Scale step of the image pyramid.
    #[arg(long, default_value_t = 0.709, value_parser = args::pyramid_factor)]
    factor: f32,
    /// MTCNN weights (default: the shipped facenet-pytorch ones).
    #[arg(long)]
    mtcnn: Option<PathBuf>,
}

impl DetectFlags {
    fn mtcnn(&self) -> Result<inception::faces::Mtcnn> {
        let cfg = inception::faces::DetectConfig {
            min_face_size: self.min_face_size,
            thresholds: self.thresholds,
            factor: self.factor,
        };
        Ok(match &self.mtcnn {
            Some(p) => inception::faces::Mtcnn::from_file(p, cfg)?,
            None => inception::faces::Mtcnn::new(cfg)?,
        })
    }
}

/// Detection, crop and embedding network.
#[derive(clap::Args)]
struct FaceFlags {
    #[command(flatten)]
    detect: DetectFlags,
    /// Inception-ResNet-v1 face weights (facenet-pytorch converted with
    /// scripts/convert_facenet.py, or a file we wrote).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// `box` (facenet-pytorch's crop) or `landmarks` (5-point similarity alignment).
    #[arg(long, default_value = "box", value_parser = ["box", "landmarks"])]
    align: String,
    /// Margin around the box, in pixels of the crop.
    #[arg(long, default_value_t = 0.0, value_parser = args::margin)]
    margin: f32,
    /// Which face of a photo verify and eval-pairs use.
    #[arg(long, default_value = "largest", value_parser = ["largest", "probability", "largest_over_threshold", "center_weighted_size"])]
    select: String,
}

impl FaceFlags {
    fn pipeline(&self) -> Result<inception::faces::Pipeline> {
        let config = inception::faces::PipelineConfig {
            align: self.align.parse()?,
            margin: self.margin,
            selection: self.select.parse()?,
        };
        let embedder = inception::faces::FaceEmbedder::load(self.weights.as_deref())?;
        Ok(inception::faces::Pipeline { mtcnn: self.detect.mtcnn()?, embedder, config })
    }
}

/// GPU drivers can crash the process (Mesa's lavapipe segfaults on our shaders): open the
/// device once in a child process first, so a crash is an error message here.
fn probe_in_child(device: &str) -> Result<()> {
    if std::env::var_os(PROBE).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe).env(PROBE, "1").args(["--device", device, "devices"]).output()?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(_) => bail!("{}", said.trim().trim_start_matches("error: ")),
        None => bail!("device '{device}' crashed in a test computation ({}): use --device cpu", out.status),
    }
}

/// Set in the child of `probe_in_child`.
const PROBE: &str = "INCEPTION_DEVICE_PROBE";

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let b = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

/// Training step `s` of `n` on a progress bar that restarts with each epoch or run.
fn step(pb: &indicatif::ProgressBar, s: usize, n: usize, msg: String) {
    if s == 1 || pb.length() != Some(n as u64) {
        pb.reset();
        pb.set_length(n as u64);
    }
    pb.set_position(s as u64);
    pb.set_message(msg);
}

fn run(cli: Cli) -> Result<bool> {
    if let Cmd::Bench { threads: Some(t), .. } = &cli.cmd {
        // SAFETY: no other thread exists yet; the thread pool reads this when it starts.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", t.to_string()) };
    }
    if std::env::var_os(PROBE).is_some() {
        // the child of `probe_in_child`: open the device (one tiny computation) and stop
        inception::devices::open(&cli.device.parse()?)?;
        return Ok(true);
    }
    if let Cmd::Devices = cli.cmd {
        print!("{}", inception::devices::report());
        return Ok(true);
    }
    let device_arg: DeviceArg = cli.device.parse()?;
    if device_arg != DeviceArg::Cpu {
        probe_in_child(&cli.device)?;
    }
    let dev = inception::devices::open(&device_arg)?;
    let on_cpu = device_arg == DeviceArg::Cpu;
    let engine: EngineKind = match &cli.engine {
        Some(e) => e.parse()?,
        None if on_cpu => EngineKind::Fast,
        None => EngineKind::Burn,
    };
    if engine == EngineKind::Fast && !on_cpu {
        bail!("the fast engine runs on the cpu only; use --engine burn with --device {}", cli.device);
    }
    let load = |src: &Source| -> Result<(Bundle, Predictor)> {
        let b = Bundle::load(src.model.map(|k| k.name()), src.weights.as_deref(), &dev)?;
        let p = b.predictor(engine, &dev)?;
        Ok((b, p))
    };
    match cli.cmd {
        Cmd::Classify { src, top, json, images } => {
            let (b, p) = load(&src)?;
            let results = commands::classify(&b, &p, &images, top);
            for r in &results {
                if let Some(e) = &r.error {
                    eprintln!("error: {e}");
                } else if !json {
                    println!("{}", r.image);
                    for c in &r.top {
                        println!("  {:>7.4}  {} ({})", c.prob, c.name, c.index);
                    }
                }
            }
            if json {
                print_json(&results)?;
            }
            Ok(results.iter().all(|r| r.error.is_none()))
        }
        Cmd::Embed { src, layer, out, batch, inputs } => {
            let (b, p) = load(&src)?;
            let n = inception::preprocess::collect_images(&inputs)?.len();
            let pb = bar(n, "embed");
            let r = commands::embed(&b, &p, &layer, &inputs, &out, batch, &mut |k| pb.inc(k as u64))?;
            pb.finish_and_clear();
            for (path, why) in &r.skipped {
                eprintln!("skipped: {path}: {why}");
            }
            println!(
                "wrote {} embeddings {:?} to {} ({} skipped)",
                r.embedded,
                r.shape,
                out.display(),
                r.skipped.len()
            );
            Ok(r.skipped.is_empty())
        }
        Cmd::Preprocess { src, size, crop_pct, image, out } => {
            let mut pre = bundle::preprocess_of(src.model, src.weights.as_deref())?;
            pre.input_size = size.unwrap_or(pre.input_size);
            pre.crop_pct = crop_pct.unwrap_or(pre.crop_pct);
            let shape = commands::preprocess_file(&pre, &image, &out)?;
            println!("wrote input {shape:?} to {} ({})", out.display(), serde_json::to_string(&pre)?);
            Ok(true)
        }
        Cmd::Check { src, inputs, atol } => {
            if src.weights.is_none() {
                bail!("check needs --weights FILE");
            }
            let (_, p) = load(&src)?;
            let rows = commands::check(&p, &inputs, atol)?;
            for r in &rows {
                println!("{} max_abs_diff={:.3e} {}", r.name, r.max_abs_diff, if r.ok { "ok" } else { "FAIL" });
            }
            Ok(rows.iter().all(|r| r.ok))
        }
        Cmd::Bench { model, batch, size, mode, threads, warmup, runs, precision, width, json } => {
            let mode = if mode == "train" { bench::BenchMode::Train } else { bench::BenchMode::Infer };
            let precision = if precision == "int8" { bench::Precision::Int8 } else { bench::Precision::F32 };
            let cfg = bench::BenchConfig {
                model,
                mode,
                batch,
                size,
                warmup,
                runs,
                device: cli.device.clone(),
                engine,
                threads,
                precision,
                width,
            };
            let r = bench::run(&cfg, &dev)?;
            if json {
                println!("{}", serde_json::to_string(&r)?)
            } else {
                println!("{r}")
            }
            Ok(true)
        }
        Cmd::Quantize { src, calib, images, percentile, out } => {
            let b = Bundle::load(src.model.map(|k| k.name()), src.weights.as_deref(), &dev)?;
            let pb = bar(images.div_ceil(8), "calibrating");
            let r = commands::quantize(&b, &calib, images, percentile, &out, &mut |_| pb.inc(1))?;
            pb.finish_and_clear();
            for (path, why) in &r.skipped {
                eprintln!("skipped {path}: {why}");
            }
            println!(
                "wrote {} ({:.1} MiB): {} of {} convolutions int8, calibrated on {} images of {} (percentile {})",
                r.out.display(),
                r.bytes as f64 / (1u64 << 20) as f64,
                r.config.int8_convs,
                r.config.convs,
                r.config.images,
                r.config.calibration,
                r.config.percentile
            );
            Ok(true)
        }
        Cmd::Train { flags, out } => {
            let mut cfg = flags.resolve(&out)?;
            // the training executor: --engine when given (a resumed run keeps its own)
            if cli.engine.is_some() || !flags.resume {
                cfg.engine = engine;
            }
            cfg.validate()?;
            let pb = bar(0, "loss");
            let summary = train::train(cfg, &out, flags.resume, &dev, &mut |s, n, loss| {
                step(&pb, s, n, format!("loss {loss:.4}"));
                true
            })?;
            pb.finish_and_clear();
            println!("{}", std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default());
            println!(
                "trained {} epochs, eval top-1 {:.4}; weights: {} ({} unreadable images skipped)",
                summary.epochs,
                summary.final_eval_top1,
                summary.model_path.display(),
                summary.skipped
            );
            Ok(true)
        }
        Cmd::Eval { src, run, data, crops, size, crop_pct, limit, batch, json } => {
            let weights = run.as_deref().map(bundle::run_weights).or(src.weights.clone());
            let Some(weights) = weights else { bail!("give --weights FILE or --run RUN_DIR") };
            let src = Source { model: src.model, weights: Some(weights) };
            let (mut b, p) = load(&src)?;
            b.pre.input_size = size.unwrap_or(b.pre.input_size);
            b.pre.crop_pct = crop_pct.unwrap_or(b.pre.crop_pct);
            let crops: usize = crops.parse()?;
            let ds = train::data::Dataset::open(&data, false)?;
            let n = limit.map_or(ds.len(), |l| l.min(ds.len()));
            let pb = bar(n, "eval");
            let r = commands::eval(&b, &p, &ds, crops, limit, batch, &mut |k| pb.inc(k as u64))?;
            pb.finish_and_clear();
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "{} images, {} crop(s): top-1 {:.4} top-5 {:.4} loss {:.4} ({} unreadable skipped)",
                    r.images, r.crops, r.top1, r.top5, r.loss, r.skipped
                );
            }
            if r.non_finite > 0 {
                eprintln!(
                    "error: {} of {} images got non-finite scores (NaN / inf), counted as wrong",
                    r.non_finite, r.images
                );
            }
            Ok(r.skipped == 0 && r.non_finite == 0)
        }
        Cmd::Reproduce { experiment, data, budget, out } => {
            let exp: Experiment = serde_json::from_value(serde_json::Value::String(experiment))?;
            let budget: Budget = serde_json::from_value(serde_json::Value::String(budget))?;
            let pb = bar(0, "");
            let report = train::reproduce::run(exp, budget, &data, &out, &dev, &mut |label, s, n, loss| {
                step(&pb, s, n, format!("{label}: loss {loss:.4}"))
            })?;
            pb.finish_and_clear();
            println!("{}", std::fs::read_to_string(&report)?);
            Ok(true)
        }
        Cmd::Serve { src, addr, max_batch, batch_window_ms, queue, max_body_mb } => {
            let (b, p) = load(&src)?;
            let cfg = inception::serve::ServeConfig {
                addr,
                max_batch,
                batch_window: std::time::Duration::from_millis(batch_window_ms),
                queue,
                max_body: max_body_mb << 20,
            };
            let name = b.model.kind().name();
            inception::serve::serve(b, p, cfg, |a| eprintln!("serving {name} on http://{a}/ (Ctrl-C to stop)"))?;
            Ok(true)
        }
        Cmd::Plot { dir } => {
            if dir.join("results.csv").exists() {
                train::reproduce::replot(&dir)?;
            } else {
                train::replot(&dir)?;
            }
            println!("wrote {}", dir.join("curves.png").display());
            Ok(true)
        }
        Cmd::Devices => Ok(true),
        Cmd::Faces { cmd } => faces(cmd),
        Cmd::Summary { model, size, json } => {
            let size = size.unwrap_or(model.pretrained().pre.input_size);
            bench::check_memory(model, 1, size, false)?;
            let m = Model::new(&ModelConfig::new(model, model.pretrained().num_classes), &dev);
            let s = summary::summarize(&m, size)?;
            if json {
                print_json(&s)?
            } else {
                println!("{s}")
            }
            Ok(true)
        }
    }
}

fn faces(cmd: FacesCmd) -> Result<bool> {
    use inception::faces;
    match cmd {
        FacesCmd::Detect { detect, select, json, draw, runs, images } => {
            let m = detect.mtcnn()?;
            let paths = inception::preprocess::collect_images(&images)?;
            let select = select.map(|s| s.parse::<faces::Selection>()).transpose()?;
            let found = faces::detect_files(&m, &paths, runs, draw.as_deref(), select)?;
            let ok = found.iter().all(|d| d.error.is_none());
            if json {
                print_json(&found)?;
            }
            for d in &found {
                if let Some(e) = &d.error {
                    eprintln!("error: {e}");
                } else if !json {
                    let ms = d.ms.map(|t| format!(" ({t:.1} ms)")).unwrap_or_default();
                    println!("{}: {} face(s){ms}", d.image, d.faces.len());
                    for f in &d.faces {
                        let [x1, y1, x2, y2] = f.bbox;
                        println!("  prob {:.4}  box [{x1:.1}, {y1:.1}, {x2:.1}, {y2:.1}]", f.prob);
                    }
                }
            }
            Ok(ok)
        }
        FacesCmd::Embed { face, out, inputs } => {
            let p = face.pipeline()?;
            let n = inception::preprocess::collect_images(&inputs)?.len();
            let pb = bar(n, "embedding faces");
            let r = p.embed_files(&inputs, &out, &mut || pb.inc(1))?;
            pb.finish_and_clear();
            for (path, e) in &r.skipped {
                eprintln!("skipped {path}: {e}");
            }
            for path in &r.no_face {
                eprintln!("no face: {path}");
            }
            println!("wrote {} ({} faces x {}) to {}", r.shape[0], r.shape[0], r.shape[1], r.out.display());
            Ok(r.skipped.is_empty())
        }
        FacesCmd::Verify { face, threshold, json, a, b } => {
            let p = face.pipeline()?;
            let v = faces::verify(&p, &a, &b, threshold)?;
            if json {
                print_json(&v)?;
            } else {
                let word = if v.same { "same person" } else { "different people" };
                println!("distance {:.4} (threshold {:.3}): {word}", v.distance, v.threshold);
            }
            Ok(true)
        }
        FacesCmd::EvalPairs { face, pairs, root, out, json } => {
            let p = face.pipeline()?;
            let list = faces::pairs::read_pairs(&pairs, &root)?;
            let pb = bar(list.len() * 2, "embedding pair images");
            let r = faces::pairs::eval_pairs(&p, &list, &out, &mut || pb.inc(1))?;
            pb.finish_and_clear();
            inception::weights::write_atomic(&out.join("report.json"), serde_json::to_string_pretty(&r)?.as_bytes())?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "{} pairs ({} same), {} folds: accuracy {:.4} +- {:.4}, VAL {:.4} +- {:.4} @ FAR {:.5}, AUC {:.4}",
                    r.pairs, r.same, r.folds, r.accuracy_mean, r.accuracy_std, r.val_mean, r.val_std, r.far_mean, r.auc
                );
                if !r.no_face.is_empty() {
                    println!("no face found in {} image(s): their central square was used", r.no_face.len());
                }
                println!("wrote {}, {}", r.roc_csv.display(), r.roc_png.display());
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let code = exit_code();
    if std::env::var_os("INCEPTION_REPORT_RSS").is_some() {
        // for scripts/reliability.py: the peak resident set of this process
        eprintln!("peak_rss_mib={:.1}", bench::peak_rss_mb());
    }
    code
}

fn exit_code() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
