//! `inception train` and `inception eval`: the paper's recipe (TF-RMSProp, lr 0.045 x 0.94
//! every two epochs, gradient clipping, weight decay, label smoothing, EMA of the weights for
//! evaluation and export), on Fashion-MNIST or an image folder, with atomic checkpoints that
//! resume exactly (model, optimizer, EMA, schedule, data order, epoch and step).

pub mod data;
pub mod fast;
pub mod optim;
pub mod plot;
pub mod reproduce;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{Model, ModelConfig, ModelKind, stage_of_key};
use crate::predict::{EngineKind, Predictor, softmax};
use crate::preprocess::{Interpolation, Preprocess};
use crate::weights::{self, LoadOptions};
use data::{Dataset, SplitMix, Transform, load_batch, load_raw, multi_crops};
use optim::{OptimConfig, OptimState};

/// Everything a run is built from; written to `RUN_DIR/config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelConfig,
    /// `fashion-mnist`, an idx folder, or an image folder.
    pub data: String,
    pub epochs: usize,
    pub batch: usize,
    pub size: usize,
    pub lr: f64,
    pub lr_decay: f64,
    pub lr_decay_epochs: f64,
    pub label_smoothing: f64,
    pub optim: OptimConfig,
    /// Smallest crop area of the random resized crop.
    pub min_area: f64,
    /// Eval resize: shorter side `size / crop_pct`.
    pub crop_pct: f64,
    pub seed: u64,
    /// Stop each epoch after this many steps (quick runs); `None` = whole epoch.
    pub max_steps: Option<usize>,
    /// Evaluate on at most this many images.
    pub eval_limit: Option<usize>,
    /// Also checkpoint every N steps.
    pub checkpoint_every: Option<usize>,
    /// Fine-tuning: initial weights (reference key names) and the first `freeze` stages kept fixed.
    pub weights: Option<PathBuf>,
    pub freeze: usize,
    /// Data-parallel replicas: each step splits the batch over this many devices of the chosen
    /// kind, sums their gradients on the first and updates once.
    #[serde(default = "one_device")]
    pub devices: usize,
    /// Train on a fixed random subset of this many images (quick experiments).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Resampling filter of augmentation and evaluation.
    #[serde(default = "bilinear")]
    pub interpolation: Interpolation,
    /// The training executor on the CPU: `fast` (`train::fast`) or `burn` (GPU devices always
    /// use burn). Runs saved before the fast engine existed trained on burn.
    #[serde(default = "burn_engine")]
    pub engine: EngineKind,
    /// BatchNorm momentum of the fast engine (PyTorch's convention: the weight of a new batch
    /// in the running statistics; TF-slim's decay 0.9997 is 0.0003). The burn path keeps its
    /// layers' 0.1.
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
    /// Before each evaluation and the export, the EMA weights' BatchNorm statistics are
    /// recomputed from this many training batches (0: keep the running statistics, which were
    /// gathered with the raw weights); fast engine only.
    #[serde(default)]
    pub bn_recalibration: usize,
}

fn burn_engine() -> EngineKind {
    EngineKind::Burn
}

fn default_bn_momentum() -> f64 {
    0.1
}

fn one_device() -> usize {
    1
}

fn bilinear() -> Interpolation {
    Interpolation::Bilinear
}

impl TrainConfig {
    pub fn new(model: ModelKind, data: &str) -> Self {
        Self {
            model: ModelConfig::new(model, 0),
            data: data.to_string(),
            epochs: 10,
            batch: 32,
            size: 299,
            lr: 0.045,
            lr_decay: 0.94,
            lr_decay_epochs: 2.0,
            label_smoothing: 0.1,
            optim: OptimConfig::default(),
            min_area: 0.25,
            crop_pct: 0.875,
            seed: 0,
            max_steps: None,
            eval_limit: None,
            checkpoint_every: None,
            weights: None,
            freeze: 0,
            devices: 1,
            train_limit: None,
            interpolation: Interpolation::Bilinear,
            engine: EngineKind::Fast,
            bn_momentum: default_bn_momentum(),
            bn_recalibration: 0,
        }
    }

    /// The preprocessing of this run (evaluation, export): `size`, `crop_pct`, mean = std =
    /// 0.5; grayscale when trained on Fashion-MNIST.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            input_size: self.size,
            crop_pct: self.crop_pct,
            interpolation: self.interpolation,
            mean: [0.5; 3],
            std: [0.5; 3],
            grayscale: data::is_fashion_mnist(&self.data),
        }
    }

    /// Staircase schedule: `lr * lr_decay ^ floor(epoch / lr_decay_epochs)`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr * self.lr_decay.powf((epoch as f64 / self.lr_decay_epochs).floor())
    }
}

impl TrainConfig {
    /// Every value in range, or an error naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: String, range: &str| Err(Error::Invalid(format!("{what} = {v} is outside {range}")));
        self.preprocess().validate()?;
        if self.batch == 0 {
            return bad("batch", self.batch.to_string(), "[1, inf)");
        }
        if self.epochs == 0 {
            return bad("epochs", self.epochs.to_string(), "[1, inf)");
        }
        if !(self.model.width.is_finite() && self.model.width > 0.0 && self.model.width <= 4.0) {
            return bad("width", self.model.width.to_string(), "(0, 4]");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "(0, inf)");
        }
        if !(self.min_area.is_finite() && self.min_area > 0.0 && self.min_area <= 1.0) {
            return bad("min_area", self.min_area.to_string(), "(0, 1]");
        }
        if !(self.label_smoothing.is_finite() && (0.0..1.0).contains(&self.label_smoothing)) {
            return bad("label_smoothing", self.label_smoothing.to_string(), "[0, 1)");
        }
        if !(self.lr_decay.is_finite()
            && self.lr_decay > 0.0
            && self.lr_decay_epochs.is_finite()
            && self.lr_decay_epochs > 0.0)
        {
            return bad(
                "lr_decay / lr_decay_epochs",
                format!("{} / {}", self.lr_decay, self.lr_decay_epochs),
                "(0, inf)",
            );
        }
        if self.devices == 0 || self.devices > 64 {
            return bad("devices", self.devices.to_string(), "[1, 64]");
        }
        if self.engine == EngineKind::Fast && self.devices > 1 {
            return Err(Error::Invalid(
                "--devices > 1 (data-parallel replicas) needs --engine burn; the fast engine runs the whole batch"
                    .into(),
            ));
        }
        if !(self.bn_momentum.is_finite() && self.bn_momentum > 0.0 && self.bn_momentum <= 1.0) {
            return bad("bn_momentum", self.bn_momentum.to_string(), "(0, 1]");
        }
        let o = &self.optim;
        if ![o.rho, o.momentum, o.epsilon, o.weight_decay, o.ema_decay].iter().all(|v| v.is_finite() && *v >= 0.0)
            || o.clip_norm.is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return Err(Error::Invalid(format!("optimizer settings out of range: {o:?}")));
        }
        crate::bench::check_memory(self.model.model, self.batch, self.size, true)
    }
}

/// Training flags as given on the command line; `None` keeps the config's value.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TrainFlags {
    /// Network to train.
    #[arg(long, value_parser = crate::args::model())]
    pub model: Option<ModelKind>,
    /// `fashion-mnist`, an idx folder, or an image folder (class subfolders; or train/ + val/).
    #[arg(long)]
    pub data: Option<String>,
    /// JSON file with a full TrainConfig; flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Epochs to train (>= 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub epochs: Option<usize>,
    /// Images per step (>= 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub batch: Option<usize>,
    /// Input size in pixels (75 to 2048).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(75..=2048))]
    pub size: Option<usize>,
    /// Channel multiplier of the Inception-ResNet models, in (0, 4].
    #[arg(long, value_parser = crate::args::width)]
    pub width: Option<f64>,
    /// Initial learning rate (> 0; the paper: 0.045).
    #[arg(long, value_parser = crate::args::positive)]
    pub lr: Option<f64>,
    /// Initial weights for fine-tuning (reference key names); the classifier is replaced.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Keep the first N feature stages fixed (with --weights).
    #[arg(long)]
    pub freeze: Option<usize>,
    /// Seed of initialisation, data order, augmentation and dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop each epoch after N steps (quick runs).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_steps: Option<usize>,
    /// Evaluate on at most N images after each epoch.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub eval_limit: Option<usize>,
    /// Also write a checkpoint every N steps.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub checkpoint_every: Option<usize>,
    /// Data-parallel replicas of --device (GPU 0..N-1; on the CPU, N shards of each batch).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub devices: Option<usize>,
    /// BatchNorm momentum of the fast engine, in (0, 1] (PyTorch's convention; TF-slim's decay
    /// 0.9997 is 0.0003).
    #[arg(long, value_parser = crate::args::unit_interval)]
    pub bn_momentum: Option<f64>,
    /// Recompute the EMA weights' BatchNorm statistics from N training batches before each
    /// evaluation and the export (fast engine; 0 = off).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=10_000))]
    pub bn_recalibration: Option<usize>,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
}

impl TrainFlags {
    /// The run's config: the saved one when resuming, else `--config` or the recipe's defaults
    /// for `--model` / `--data`, with the given flags on top; validated.
    pub fn resolve(&self, out: &Path) -> Result<TrainConfig> {
        let saved = if self.resume { saved_config(out)? } else { None };
        let mut cfg = match (&self.config, saved) {
            (None, Some(saved)) => saved,
            (Some(p), _) => serde_json::from_slice::<TrainConfig>(&weights::read_file(p)?)
                .map_err(|e| Error::Invalid(format!("{}: not a train config: {e}", p.display())))?,
            (None, None) => {
                let data =
                    self.data.clone().ok_or_else(|| Error::Invalid("--data is required (or --config)".into()))?;
                let mut c = TrainConfig::new(self.model.unwrap_or(ModelKind::InceptionResnetV1), &data);
                if data::is_fashion_mnist(&data) {
                    // small grayscale images: the smallest input the nets take, no crop
                    c.size = 75;
                    c.crop_pct = 1.0;
                    c.min_area = 0.5;
                }
                c
            }
        };
        if let Some(m) = self.model
            && m != cfg.model.model
        {
            if self.resume && out.join(CHECKPOINT).exists() {
                return Err(Error::Invalid(format!(
                    "--model {m} contradicts the run in {}, which trains {}",
                    out.display(),
                    cfg.model.model
                )));
            }
            cfg.model = ModelConfig { model: m, ..cfg.model };
        }
        if let Some(d) = &self.data {
            cfg.data = d.clone();
        }
        macro_rules! set {
            ($($f:ident => $dst:expr),*) => {$(if let Some(v) = self.$f { $dst = v; })*};
        }
        set!(epochs => cfg.epochs, batch => cfg.batch, size => cfg.size, width => cfg.model.width, lr => cfg.lr,
             freeze => cfg.freeze, seed => cfg.seed, devices => cfg.devices, bn_momentum => cfg.bn_momentum,
             bn_recalibration => cfg.bn_recalibration);
        if self.weights.is_some() {
            cfg.weights = self.weights.clone();
        }
        cfg.max_steps = self.max_steps.or(cfg.max_steps);
        cfg.eval_limit = self.eval_limit.or(cfg.eval_limit);
        cfg.checkpoint_every = self.checkpoint_every.or(cfg.checkpoint_every);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One row of `metrics.csv`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub eval_loss: f64,
    pub eval_top1: f64,
    pub eval_top5: f64,
    pub images_per_s: f64,
    pub seconds: f64,
    pub skipped: usize,
    /// Fraction of exact zeros in the last feature map before pooling (paper Sec. 3.3).
    pub zero_fraction: f64,
}

/// Where a run is; saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub global_step: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub seen: u64,
    pub skipped: usize,
    pub history: Vec<EpochMetrics>,
}

/// Evaluation result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub images: usize,
    /// Images whose scores were not finite (NaN / inf): counted as wrong.
    #[serde(default)]
    pub non_finite: usize,
    pub crops: usize,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub skipped: usize,
}

const CHECKPOINT: &str = "checkpoint.safetensors";

fn frozen_fn(kind: ModelKind, freeze: usize) -> impl Fn(&str) -> bool {
    move |key: &str| freeze > 0 && stage_of_key(kind, key).is_some_and(|s| s < freeze)
}

fn tensor_map_to_vecs(
    m: &HashMap<String, Tensor<1>>,
    prefix: &str,
    out: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) {
    for (k, t) in m {
        let v = t.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        out.insert(format!("{prefix}{k}"), (vec![v.len()], v));
    }
}

fn js<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The config a run in `dir` was started with (from its checkpoint), if there is one.
pub fn saved_config(dir: &Path) -> Result<Option<TrainConfig>> {
    let path = dir.join(CHECKPOINT);
    if !path.exists() {
        return Ok(None);
    }
    let cfg = weights::read_metadata_entry(&path, "train_config")?;
    cfg.map(|c| serde_json::from_str(&c).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))).transpose()
}

/// Restore a checkpoint: model on `device`, optimizer state, progress.
fn load_checkpoint(dir: &Path, device: &Device) -> Result<(TrainConfig, Model, OptimState, Progress)> {
    let path = dir.join(CHECKPOINT);
    let bytes = weights::read_file(&path)?;
    let st = weights::parse(&path, &bytes)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors { path: path.clone(), reason: e.to_string() })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| meta.get(k).ok_or_else(|| Error::Invalid(format!("{}: no '{k}' metadata", path.display())));
    let bad = |e: serde_json::Error| Error::Invalid(format!("{}: {e}", path.display()));
    let cfg: TrainConfig = serde_json::from_str(get("train_config")?).map_err(bad)?;
    let progress: Progress = serde_json::from_str(get("progress")?).map_err(bad)?;
    let mcfg: ModelConfig = serde_json::from_str(get("inception_config")?).map_err(bad)?;
    let model = Model::new(&mcfg, device);
    let expected = weights::param_shapes(&model);
    let mut missing = Vec::new();
    let mut source = |key: &str, _: &[usize]| {
        let t = weights::tensor_f32(&path, &st, &format!("model.{key}")).ok();
        if t.is_none() {
            missing.push(key.to_string());
        }
        t.map(|t| t.data)
    };
    let model = weights::fill_model(model, &mut source);
    if !missing.is_empty() || expected.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: checkpoint lacks {} tensors: {:?}",
            path.display(),
            missing.len(),
            missing
        )));
    }
    let mut state = OptimState { ema_updates: get("ema_updates")?.parse().unwrap_or(0), ..Default::default() };
    for name in st.names() {
        for (prefix, map) in [("ms.", &mut state.ms), ("mom.", &mut state.mom), ("ema.", &mut state.ema)] {
            if let Some(key) = name.strip_prefix(prefix) {
                let t = weights::tensor_f32(&path, &st, name)?;
                let n = t.data.len();
                // optimizer state lives on the non-autodiff device
                let t = Tensor::<1>::from_data(TensorData::new(t.data, [n]), device);
                map.insert(key.to_string(), if t.device().is_autodiff() { t.inner() } else { t });
            }
        }
    }
    Ok((cfg, model, state, progress))
}

/// Top-1 / top-5 hits of `[n, c]` scores against labels, and the rows with a non-finite score
/// (never hits). A tie with the true class is not a hit: it must beat every other class
/// strictly (top-1), or all but at most four (top-5).
pub fn hits(scores: &[f32], c: usize, labels: &[usize]) -> (u64, u64, u64) {
    let (mut t1, mut t5, mut bad) = (0, 0, 0);
    for (row, &y) in scores.chunks(c).zip(labels) {
        if row.iter().any(|v| !v.is_finite()) || y >= row.len() {
            bad += 1;
            continue;
        }
        let s = row[y];
        let rivals = row.iter().enumerate().filter(|&(j, &v)| j != y && v >= s).count();
        t1 += (rivals == 0) as u64;
        t5 += (rivals < 5) as u64;
    }
    (t1, t5, bad)
}

/// Evaluate `p` on `ds` with 1, 12 or 144 crops per image (probabilities averaged over crops).
pub fn evaluate(
    p: &Predictor,
    ds: &Dataset,
    pre: &Preprocess,
    crops: usize,
    limit: Option<usize>,
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> EvalReport {
    let size = pre.input_size;
    let n = limit.map_or(ds.len(), |l| l.min(ds.len()));
    let c = p.num_classes();
    let (mut t1, mut t5, mut loss, mut done, mut skipped, mut bad) = (0u64, 0u64, 0f64, 0usize, 0usize, 0u64);
    let idx: Vec<usize> = (0..n).collect();
    let per_batch = if crops <= 1 { batch.max(1) } else { 1 };
    for chunk in idx.chunks(per_batch) {
        use rayon::prelude::*;
        let views: Vec<Option<(Vec<Vec<f32>>, usize)>> = chunk
            .par_iter()
            .map(|&i| {
                let img = ds.image(i).ok()?;
                Some((multi_crops(&img, pre, crops), ds.labels[i]))
            })
            .collect();
        let ok: Vec<(Vec<Vec<f32>>, usize)> = views.into_iter().flatten().collect();
        skipped += chunk.len() - ok.len();
        if ok.is_empty() {
            continue;
        }
        let k = ok[0].0.len();
        let flat: Vec<f32> = ok.iter().flat_map(|(v, _)| v.iter().flatten().copied()).collect();
        let out = p.run(&flat, [ok.len() * k, 3, size, size], false);
        let labels: Vec<usize> = ok.iter().map(|(_, y)| *y).collect();
        // average probabilities over each image's crops
        let mut probs = vec![0f32; ok.len() * c];
        for (j, row) in out.logits.data.chunks(c).enumerate() {
            for (acc, v) in probs[(j / k) * c..][..c].iter_mut().zip(softmax(row)) {
                *acc += v / k as f32;
            }
        }
        let (a, b, nf) = hits(&probs, c, &labels);
        t1 += a;
        t5 += b;
        bad += nf;
        for (row, &y) in probs.chunks(c).zip(&labels) {
            if row.iter().all(|v| v.is_finite()) {
                loss += -(row[y].max(1e-12) as f64).ln();
            }
        }
        done += ok.len();
        on_batch(chunk.len());
    }
    let d = done.max(1) as f64;
    let scored = (done as u64 - bad).max(1) as f64;
    EvalReport {
        images: done,
        non_finite: bad as usize,
        crops: crops.max(1),
        top1: t1 as f64 / d,
        top5: t5 as f64 / d,
        loss: if bad as usize == done && done > 0 { f64::NAN } else { loss / scored },
        skipped,
    }
}

/// Fraction of exact zeros in the last feature map before global pooling (the tensor that
/// "dies" in the paper's Sec. 3.3), on the first batch of `ds`.
pub fn zero_fraction(model: &Model, ds: &Dataset, cfg: &TrainConfig, device: &Device) -> f64 {
    let idx: Vec<usize> = (0..cfg.batch.min(ds.len())).collect();
    let Some(b) = load_batch(ds, &idx, &Transform::Eval(cfg.preprocess()), 0, device) else {
        return 0.0;
    };
    let f = model.forward_features(b.images);
    let n = f.dims().iter().product::<usize>() as f64;
    let zeros = f.equal_elem(0.0).int().sum().into_scalar::<i64>() as f64;
    zeros / n
}

fn write_metrics(dir: &Path, cfg: &TrainConfig, history: &[EpochMetrics]) -> Result<()> {
    let mut csv = String::from(
        "epoch,lr,train_loss,train_top1,eval_loss,eval_top1,eval_top5,images_per_s,seconds,skipped,zero_fraction\n",
    );
    for m in history {
        csv += &format!(
            "{},{:.6},{:.5},{:.5},{:.5},{:.5},{:.5},{:.2},{:.1},{},{:.5}\n",
            m.epoch,
            m.lr,
            m.train_loss,
            m.train_top1,
            m.eval_loss,
            m.eval_top1,
            m.eval_top5,
            m.images_per_s,
            m.seconds,
            m.skipped,
            m.zero_fraction
        );
    }
    weights::write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    let js = serde_json::to_vec_pretty(history).map_err(|e| Error::Invalid(e.to_string()))?;
    weights::write_atomic(&dir.join("metrics.json"), &js)?;
    plot_curves(dir, cfg, history)
}

/// `curves.png` (+ `.svg`) of a run, titled with its model, width and data.
fn plot_curves(dir: &Path, cfg: &TrainConfig, history: &[EpochMetrics]) -> Result<()> {
    let title = format!("{} (width {}) on {}", cfg.model.model, cfg.model.width, cfg.data);
    plot::curves(&dir.join("curves.png"), &title, history)
}

/// Redraw `curves.png` (+ `.svg`) of a run folder from its `metrics.json` and `config.json`.
pub fn replot(dir: &Path) -> Result<()> {
    let read = |f: &str| weights::read_file(&dir.join(f));
    let history: Vec<EpochMetrics> = serde_json::from_slice(&read("metrics.json")?)
        .map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    let cfg: TrainConfig =
        serde_json::from_slice(&read("config.json")?).map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    plot_curves(dir, &cfg, &history)
}

/// What `train` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epochs: usize,
    pub final_eval_top1: f64,
    pub model_path: PathBuf,
    pub skipped: usize,
}

/// The executor of a run: burn's autodiff (any device), or the CPU training engine.
enum Trainer {
    /// `model` is `None` only while a step updates it.
    Burn { model: Option<Model>, state: OptimState, replicas: Vec<Device> },
    /// `template`: a model of the run's structure on the CPU, for evaluation and export.
    Fast { net: fast::Net, st: fast::OptState, template: Model },
}

/// What one step saw: mean loss, the scores and labels of the images it read.
struct Stepped {
    loss: f64,
    scores: Vec<f32>,
    labels: Vec<usize>,
}

impl Trainer {
    fn new(cfg: &TrainConfig, model: Model, state: OptimState, device: &Device) -> Self {
        match cfg.engine {
            EngineKind::Fast => {
                let net = fast::Net::from_model(&model);
                let st = fast::OptState::from_keyed(&net.slots, &state.ms, &state.mom, &state.ema, state.ema_updates);
                Trainer::Fast { net, st, template: model.valid() }
            }
            EngineKind::Burn => {
                // data-parallel replicas: the main device plus `devices - 1` more of the same kind
                let ad = device.clone().autodiff();
                let replicas = (0..cfg.devices.max(1))
                    .map(|i| if i == 0 { ad.clone() } else { replica_device(device, i).autodiff() })
                    .collect();
                Trainer::Burn { model: Some(model), state, replicas }
            }
        }
    }

    /// One step on `idx`: forward, backward and the optimizer update (or `None`, with the
    /// unreadable files counted in `skipped`, when no image could be read).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        cfg: &TrainConfig,
        ds: &Dataset,
        idx: &[usize],
        aug: &Transform,
        batch_seed: u64,
        step_seed: u64,
        lr: f64,
        frozen: &dyn Fn(&str) -> bool,
        skipped: &mut usize,
    ) -> Result<Option<Stepped>> {
        match self {
            Trainer::Fast { net, st, .. } => {
                let Some(b) = load_raw(ds, idx, aug, batch_seed) else {
                    *skipped += idx.len();
                    return Ok(None);
                };
                for (p, why) in &b.skipped {
                    eprintln!("skipped {p}: {why}");
                }
                *skipped += b.skipped.len();
                let x = crate::engine::Act::from_nchw(&b.data, [b.labels.len(), 3, b.size, b.size]);
                let out = net.step(x, &b.labels, cfg.label_smoothing as f32, cfg.bn_momentum as f32, step_seed);
                if !out.loss.is_finite() {
                    return Ok(Some(Stepped { loss: out.loss, scores: out.logits, labels: b.labels }));
                }
                fast::optimizer_step(&mut net.slots, st, &cfg.optim, lr, frozen);
                fast::update_ema(&net.slots, st, &cfg.optim);
                Ok(Some(Stepped { loss: out.loss, scores: out.logits, labels: b.labels }))
            }
            Trainer::Burn { model: slot, state, replicas } => {
                let model = slot.take().expect("the model between steps");
                let r = Self::burn_step(&model, cfg, ds, idx, aug, batch_seed, step_seed, replicas, skipped);
                let Some((grads, st)) = r else {
                    *slot = Some(model);
                    return Ok(None);
                };
                if !st.loss.is_finite() {
                    *slot = Some(model);
                    return Ok(Some(st));
                }
                let (model, _norm) = optim::step(model, grads, state, &cfg.optim, lr, frozen);
                optim::update_ema(&model, state, &cfg.optim);
                *slot = Some(model);
                Ok(Some(st))
            }
        }
    }

    /// burn's forward and backward over the replicas: the merged gradients and what the step saw.
    #[allow(clippy::too_many_arguments)]
    fn burn_step(
        model: &Model,
        cfg: &TrainConfig,
        ds: &Dataset,
        idx: &[usize],
        aug: &Transform,
        batch_seed: u64,
        step_seed: u64,
        replicas: &[Device],
        skipped: &mut usize,
    ) -> Option<(GradientsParams, Stepped)> {
        let ad = replicas[0].clone();
        let loss_fn = CrossEntropyLossConfig::new().with_smoothing(Some(cfg.label_smoothing as f32)).init(&ad);
        let shard_len = idx.len().div_ceil(replicas.len()).max(1);
        // dropout draws from the backend's RNG: seed it per step, so a resumed run draws
        // exactly what the uninterrupted run drew at this step
        for d in replicas.iter() {
            d.seed(step_seed);
        }
        let (mut grads, mut lv, mut scores, mut labels) = (Vec::new(), 0f64, Vec::new(), Vec::new());
        for (shard, dev) in idx.chunks(shard_len).zip(replicas.iter()) {
            let Some(b) = load_batch(ds, shard, aug, batch_seed, dev) else {
                *skipped += shard.len();
                continue;
            };
            for (p, why) in &b.skipped {
                eprintln!("skipped {p}: {why}");
            }
            *skipped += b.skipped.len();
            let share = b.label_vec.len() as f64 / idx.len() as f64;
            let replica = if *dev == ad { None } else { Some(model.clone().fork(dev)) };
            let m = replica.as_ref().unwrap_or(model);
            let logits = m.forward(b.images);
            let loss = loss_fn.forward(logits.clone(), b.labels.to_device(dev)).mul_scalar(share);
            lv += loss.clone().into_scalar::<f32>() as f64;
            scores.extend(logits.inner().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default());
            labels.extend(b.label_vec);
            grads.push(GradientsParams::from_grads(loss.backward(), m).to_device(&ad, model));
        }
        if labels.is_empty() {
            return None;
        }
        let lv = lv * idx.len() as f64 / labels.len() as f64;
        Some((optim::merge_grads(model, grads), Stepped { loss: lv, scores, labels }))
    }

    /// The checkpoint's tensors: the model under `model.`, optimizer and EMA state under `ms.`,
    /// `mom.`, `ema.` (flat, by key), and the EMA update count.
    fn checkpoint(&self) -> (weights::Tensors, u64, ModelConfig) {
        let mut t = BTreeMap::new();
        match self {
            Trainer::Burn { model, state, .. } => {
                let model = model.as_ref().expect("the model between steps");
                // `valid()` folds BatchNorm's pending running-statistics update into its value
                // (burn keeps the last update aside until the next one); exporting `model`
                // itself would save statistics one step behind and a resumed run would diverge
                for (k, v) in weights::export_tensors(&model.valid()) {
                    t.insert(format!("model.{k}"), v);
                }
                tensor_map_to_vecs(&state.ms, "ms.", &mut t);
                tensor_map_to_vecs(&state.mom, "mom.", &mut t);
                tensor_map_to_vecs(&state.ema, "ema.", &mut t);
                (t, state.ema_updates, model.config())
            }
            Trainer::Fast { net, st, template } => {
                let model = net.to_model(template.clone());
                for (k, v) in weights::export_tensors(&model) {
                    t.insert(format!("model.{k}"), v);
                }
                for (prefix, vals) in [("ms.", &st.ms), ("mom.", &st.mom), ("ema.", &st.ema)] {
                    for (s, v) in net.slots.iter().zip(vals) {
                        if !v.is_empty() {
                            t.insert(format!("{prefix}{}", s.key), (vec![v.len()], v.clone()));
                        }
                    }
                }
                (t, st.ema_updates, model.config())
            }
        }
    }

    /// An eval copy with the averaged weights (and, with `bn_recalibration`, BatchNorm
    /// statistics recomputed for them on training batches).
    fn eval_model(&self, cfg: &TrainConfig, ds: &Dataset, subset: &[usize], seed: u64) -> Model {
        match self {
            Trainer::Burn { model, state, .. } => {
                optim::ema_model(model.as_ref().expect("the model between steps"), state)
            }
            Trainer::Fast { net, st, template } => {
                if st.ema.is_empty() {
                    return net.to_model(template.clone());
                }
                let mut avg = net.with_values(|i, s| if st.ema[i].is_empty() { &s.value } else { &st.ema[i] });
                if cfg.bn_recalibration > 0 {
                    let aug = Transform::Train { pre: cfg.preprocess(), min_area: cfg.min_area };
                    let order = SplitMix::new(seed).permutation(subset.len());
                    let batches = order.chunks(cfg.batch).take(cfg.bn_recalibration).filter_map(|c| {
                        let idx: Vec<usize> = c.iter().map(|&i| subset[i]).collect();
                        let b = load_raw(ds, &idx, &aug, seed)?;
                        Some(crate::engine::Act::from_nchw(&b.data, [b.labels.len(), 3, b.size, b.size]))
                    });
                    avg.recalibrate_bn(batches);
                }
                avg.to_model(template.clone())
            }
        }
    }
}

/// Write the checkpoint atomically: weights, optimizer and EMA state, progress and config.
fn save_checkpoint(dir: &Path, cfg: &TrainConfig, trainer: &Trainer, p: &Progress) -> Result<()> {
    let (t, ema_updates, mcfg) = trainer.checkpoint();
    let meta = HashMap::from([
        ("train_config".to_string(), js(cfg)),
        ("progress".to_string(), js(p)),
        ("ema_updates".to_string(), ema_updates.to_string()),
        ("inception_config".to_string(), js(&mcfg)),
    ]);
    weights::save_tensors(&dir.join(CHECKPOINT), &t, Some(meta))
}

/// Train (or resume) a run in `dir`. `on_step(step, steps, loss)` reports progress after each
/// step; returning `false` stops the run there (as if killed: no extra checkpoint is written).
pub fn train(
    cfg: TrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
    on_step: &mut dyn FnMut(usize, usize, f64) -> bool,
) -> Result<TrainSummary> {
    let mut cfg = cfg;
    if *device != Device::flex() {
        // GPU devices train through burn
        cfg.engine = EngineKind::Burn;
    }
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.to_path_buf(), err })?;
    // temp files of killed writers are swept by `write_atomic` before each write
    let _lock = weights::DirLock::acquire(dir)?;
    let train_ds = Dataset::open(&cfg.data, true)?;
    let eval_ds = Dataset::open(&cfg.data, false)?;
    let distinct: std::collections::BTreeSet<usize> = train_ds.labels.iter().copied().collect();
    if distinct.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: {} class(es) with images; a classifier needs at least 2",
            train_ds.name,
            distinct.len()
        )));
    }
    let model_device = if cfg.engine == EngineKind::Fast { device.clone() } else { device.clone().autodiff() };
    let (cfg, model, state, mut progress) = if resume && dir.join(CHECKPOINT).exists() {
        let (saved, model, state, progress) = load_checkpoint(dir, &model_device)?;
        // either engine continues the other's checkpoints: the caller's engine wins
        (TrainConfig { epochs: cfg.epochs, engine: cfg.engine, ..saved }, model, state, progress)
    } else {
        let mut cfg = cfg;
        cfg.model.num_classes = train_ds.classes.len();
        let mut model = seeded_model(&cfg.model, cfg.seed, &model_device);
        if let Some(w) = &cfg.weights {
            model = weights::load(model, w, &LoadOptions { new_classifier: true })?;
        }
        (cfg, model, OptimState::default(), Progress::default())
    };
    cfg.validate()?;
    let js = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    weights::write_atomic(&dir.join("config.json"), &js)?;
    let mut trainer = Trainer::new(&cfg, model, state, device);
    let frozen = frozen_fn(cfg.model.model, cfg.freeze);
    let classes = train_ds.classes.len();
    // the training subset: a fixed draw (independent of the run's seed), or everything
    let subset: Vec<usize> = match cfg.train_limit {
        Some(n) if n < train_ds.len() => {
            let mut s = SplitMix::new(0x5EED).permutation(train_ds.len());
            s.truncate(n);
            s
        }
        _ => (0..train_ds.len()).collect(),
    };
    let per_epoch = subset.len().div_ceil(cfg.batch);
    let steps = cfg.max_steps.map_or(per_epoch, |m| m.min(per_epoch));
    while progress.epoch < cfg.epochs {
        let epoch = progress.epoch;
        let lr = cfg.lr_at(epoch);
        let order =
            SplitMix::new(cfg.seed ^ (epoch as u64 + 1).wrapping_mul(0xA24BAED4963EE407)).permutation(subset.len());
        let order: Vec<usize> = order.into_iter().map(|i| subset[i]).collect();
        let t0 = Instant::now();
        let start_seen = progress.seen;
        for s in progress.step_in_epoch..steps {
            let idx = &order[s * cfg.batch..((s + 1) * cfg.batch).min(order.len())];
            let aug = Transform::Train { pre: cfg.preprocess(), min_area: cfg.min_area };
            let batch_seed = cfg.seed ^ (epoch as u64).wrapping_mul(0x9E3779B97F4A7C15);
            let step_seed = cfg.seed ^ (progress.global_step + 1).wrapping_mul(0x2545F4914F6CDD1D);
            let Some(st) =
                trainer.step(&cfg, &train_ds, idx, &aug, batch_seed, step_seed, lr, &frozen, &mut progress.skipped)?
            else {
                progress.step_in_epoch = s + 1;
                continue;
            };
            let lv = st.loss;
            if !lv.is_finite() {
                let last = if dir.join(CHECKPOINT).exists() {
                    format!("the last good checkpoint is {}", dir.join(CHECKPOINT).display())
                } else {
                    "no checkpoint was written yet".to_string()
                };
                return Err(Error::Invalid(format!("loss is {lv} at epoch {epoch} step {s}: stopped; {last}")));
            }
            let (c1, _, _) = hits(&st.scores, classes, &st.labels);
            progress.loss_sum += lv * st.labels.len() as f64;
            progress.correct += c1;
            progress.seen += st.labels.len() as u64;
            progress.step_in_epoch = s + 1;
            progress.global_step += 1;
            if cfg.checkpoint_every.is_some_and(|n| n > 0 && progress.global_step % n as u64 == 0) {
                save_checkpoint(dir, &cfg, &trainer, &progress)?;
            }
            if !on_step(s + 1, steps, lv) {
                return Ok(TrainSummary {
                    epochs: progress.epoch,
                    final_eval_top1: progress.history.last().map_or(0.0, |m| m.eval_top1),
                    model_path: dir.join(CHECKPOINT),
                    skipped: progress.skipped,
                });
            }
        }
        if progress.seen == 0 && steps > 0 {
            return Err(Error::Invalid(format!(
                "no training image of {} could be read ({} skipped): nothing to train on",
                cfg.data, progress.skipped
            )));
        }
        let secs = t0.elapsed().as_secs_f64();
        let eval_model = trainer.eval_model(&cfg, &train_ds, &subset, cfg.seed ^ 0xBA7C);
        let zf = zero_fraction(&eval_model, &eval_ds, &cfg, device);
        if zf > 0.99 {
            eprintln!(
                "warning: {:.1}% of the last feature map is zero: the network may be dying (paper Sec. 3.3)",
                zf * 100.0
            );
        }
        let p = Predictor::new(eval_model, engine_for(device), device);
        let ev = evaluate(&p, &eval_ds, &cfg.preprocess(), 1, cfg.eval_limit, cfg.batch.max(16), &mut |_| {});
        let seen = (progress.seen - start_seen).max(1) as f64;
        progress.history.push(EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: progress.loss_sum / progress.seen.max(1) as f64,
            train_top1: progress.correct as f64 / progress.seen.max(1) as f64,
            eval_loss: ev.loss,
            eval_top1: ev.top1,
            eval_top5: ev.top5,
            images_per_s: seen / secs.max(1e-9),
            seconds: secs,
            skipped: progress.skipped + ev.skipped,
            zero_fraction: zf,
        });
        progress.epoch += 1;
        progress.step_in_epoch = 0;
        progress.loss_sum = 0.0;
        progress.correct = 0;
        progress.seen = 0;
        write_metrics(dir, &cfg, &progress.history)?;
        save_checkpoint(dir, &cfg, &trainer, &progress)?;
    }
    let final_model = trainer.eval_model(&cfg, &train_ds, &subset, cfg.seed ^ 0xBA7C);
    let model_path = dir.join("model.safetensors");
    weights::save_model(&final_model, &model_path, &cfg.preprocess(), &train_ds.classes)?;
    let labels = serde_json::to_vec_pretty(&train_ds.classes).map_err(|e| Error::Invalid(e.to_string()))?;
    weights::write_atomic(&dir.join("labels.json"), &labels)?;
    Ok(TrainSummary {
        epochs: progress.epoch,
        final_eval_top1: progress.history.last().map_or(0.0, |m| m.eval_top1),
        model_path,
        skipped: progress.skipped,
    })
}

/// A freshly initialised model whose weights depend only on `seed` (the backend's RNG is
/// global and lazily drawn, so we initialise ourselves): convolutions Kaiming-uniform for ReLU
/// (`U(-b, b)`, `b = sqrt(6 / fan_in)`), linears `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
/// biases 0, BatchNorm identity (weight 1, bias 0, mean 0, var 1).
pub fn seeded_model(cfg: &ModelConfig, seed: u64, device: &Device) -> Model {
    let mut src = |key: &str, shape: &[usize]| -> Option<Vec<f32>> {
        let n: usize = shape.iter().product();
        let leaf = key.rsplit('.').next().unwrap_or("");
        let fill = |v: f32| Some(vec![v; n]);
        match (leaf, shape.len()) {
            ("weight", 4) | ("weight", 2) => {
                let fan_in: usize = shape[1..].iter().product();
                let b = if shape.len() == 4 { (6.0 / fan_in as f64).sqrt() } else { 1.0 / (fan_in as f64).sqrt() };
                let mut rng = SplitMix::new(
                    seed ^ key.bytes().fold(0xcbf29ce484222325u64, |h, c| (h ^ c as u64).wrapping_mul(0x100000001b3)),
                );
                Some((0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32).collect())
            }
            ("weight", _) | ("running_var", _) => fill(1.0),
            _ => fill(0.0),
        }
    };
    weights::fill_model(Model::new(cfg, device), &mut src)
}

/// Replica `i` of the device kind of `device` (GPU index `i`; on the CPU another handle to it).
fn replica_device(device: &Device, i: usize) -> Device {
    #[cfg(feature = "vulkan")]
    if *device != Device::flex() {
        return Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(i));
    }
    let _ = i;
    device.clone()
}

/// The executor for evaluation on `device`: the fast engine on the CPU.
pub fn engine_for(device: &Device) -> EngineKind {
    if *device == Device::flex() { EngineKind::Fast } else { EngineKind::Burn }
}
