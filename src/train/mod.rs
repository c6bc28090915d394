//! `inception train` and `inception eval`: the paper's recipe (TF-RMSProp, lr 0.045 x 0.94
//! every two epochs, gradient clipping, weight decay, label smoothing, EMA of the weights for
//! evaluation and export), on Fashion-MNIST or an image folder, with atomic checkpoints that
//! resume exactly (model, optimizer, EMA, schedule, data order, epoch and step).

pub mod data;
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
use crate::weights::{self, LoadOptions};
use data::{Dataset, SplitMix, Transform, load_batch, multi_crops, to_chw};
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
}

fn one_device() -> usize {
    1
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
        }
    }

    /// Staircase schedule: `lr * lr_decay ^ floor(epoch / lr_decay_epochs)`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr * self.lr_decay.powf((epoch as f64 / self.lr_decay_epochs).floor())
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

/// Write the checkpoint atomically: weights, optimizer and EMA state, progress and config.
fn save_checkpoint(dir: &Path, cfg: &TrainConfig, model: &Model, st: &OptimState, p: &Progress) -> Result<()> {
    let mut t = BTreeMap::new();
    for (k, v) in weights::export_tensors(model) {
        t.insert(format!("model.{k}"), v);
    }
    tensor_map_to_vecs(&st.ms, "ms.", &mut t);
    tensor_map_to_vecs(&st.mom, "mom.", &mut t);
    tensor_map_to_vecs(&st.ema, "ema.", &mut t);
    let meta = HashMap::from([
        ("train_config".to_string(), js(cfg)),
        ("progress".to_string(), js(p)),
        ("ema_updates".to_string(), st.ema_updates.to_string()),
        ("inception_config".to_string(), js(&model.config())),
    ]);
    weights::save_tensors(&dir.join(CHECKPOINT), &t, Some(meta))
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

/// Top-1 / top-5 hits of `[n, c]` scores against labels.
fn hits(scores: &[f32], c: usize, labels: &[usize]) -> (u64, u64) {
    let (mut t1, mut t5) = (0, 0);
    for (row, &y) in scores.chunks(c).zip(labels) {
        let s = row[y];
        let better = row.iter().filter(|&&v| v > s).count();
        t1 += (better == 0) as u64;
        t5 += (better < 5) as u64;
    }
    (t1, t5)
}

/// Evaluate `p` on `ds` with 1, 12 or 144 crops per image (probabilities averaged over crops).
pub fn evaluate(
    p: &Predictor,
    ds: &Dataset,
    size: usize,
    crop_pct: f64,
    crops: usize,
    limit: Option<usize>,
    batch: usize,
) -> EvalReport {
    let n = limit.map_or(ds.len(), |l| l.min(ds.len()));
    let c = p.num_classes();
    let (mut t1, mut t5, mut loss, mut done, mut skipped) = (0u64, 0u64, 0f64, 0usize, 0usize);
    let idx: Vec<usize> = (0..n).collect();
    let per_batch = if crops <= 1 { batch.max(1) } else { 1 };
    for chunk in idx.chunks(per_batch) {
        use rayon::prelude::*;
        let views: Vec<Option<(Vec<Vec<f32>>, usize)>> = chunk
            .par_iter()
            .map(|&i| {
                let img = ds.image(i).ok()?;
                let v = if crops <= 1 {
                    vec![to_chw(&data::apply(&img, Transform::Eval { size, crop_pct }, &mut SplitMix::new(0)))]
                } else {
                    multi_crops(&img, size, crops).iter().map(to_chw).collect()
                };
                Some((v, ds.labels[i]))
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
        let (a, b) = hits(&probs, c, &labels);
        t1 += a;
        t5 += b;
        for (row, &y) in probs.chunks(c).zip(&labels) {
            loss += -(row[y].max(1e-12) as f64).ln();
        }
        done += ok.len();
    }
    let d = done.max(1) as f64;
    EvalReport { images: done, crops: crops.max(1), top1: t1 as f64 / d, top5: t5 as f64 / d, loss: loss / d, skipped }
}

/// Fraction of exact zeros in the last feature map before global pooling (the tensor that
/// "dies" in the paper's Sec. 3.3), on the first batch of `ds`.
pub fn zero_fraction(model: &Model, ds: &Dataset, cfg: &TrainConfig, device: &Device) -> f64 {
    let idx: Vec<usize> = (0..cfg.batch.min(ds.len())).collect();
    let Some(b) = load_batch(ds, &idx, Transform::Eval { size: cfg.size, crop_pct: cfg.crop_pct }, 0, device) else {
        return 0.0;
    };
    let f = model.forward_features(b.images);
    let n = f.dims().iter().product::<usize>() as f64;
    let zeros = f.equal_elem(0.0).int().sum().into_scalar::<i64>() as f64;
    zeros / n
}

fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
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
    plot::curves(&dir.join("curves.png"), history)
}

/// What `train` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epochs: usize,
    pub final_eval_top1: f64,
    pub model_path: PathBuf,
    pub skipped: usize,
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
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let ad = device.clone().autodiff();
    let train_ds = Dataset::open(&cfg.data, true)?;
    let eval_ds = Dataset::open(&cfg.data, false)?;
    let (cfg, mut model, mut state, mut progress) = if resume && dir.join(CHECKPOINT).exists() {
        let (saved, model, state, progress) = load_checkpoint(dir, &ad)?;
        (TrainConfig { epochs: cfg.epochs, ..saved }, model, state, progress)
    } else {
        let mut cfg = cfg;
        cfg.model.num_classes = train_ds.classes.len();
        if cfg.model.model == ModelKind::InceptionV4 && cfg.model.width != 1.0 {
            return Err(Error::Invalid("--width applies to the Inception-ResNet models only".into()));
        }
        let mut model = seeded_model(&cfg.model, cfg.seed, &ad);
        if let Some(w) = &cfg.weights {
            model = weights::load(model, w, &LoadOptions { new_classifier: true })?;
        }
        (cfg, model, OptimState::default(), Progress::default())
    };
    if cfg.size < crate::summary::MIN_INPUT {
        return Err(Error::InputTooSmall { size: cfg.size });
    }
    let js = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    weights::write_atomic(&dir.join("config.json"), &js)?;
    // data-parallel replicas: the main device plus `devices - 1` more of the same kind
    let replicas: Vec<Device> = (0..cfg.devices.max(1))
        .map(|i| if i == 0 { ad.clone() } else { replica_device(device, i).autodiff() })
        .collect();
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing(Some(cfg.label_smoothing as f32)).init(&ad);
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
            let aug = Transform::Train { size: cfg.size, min_area: cfg.min_area };
            let batch_seed = cfg.seed ^ (epoch as u64).wrapping_mul(0x9E3779B97F4A7C15);
            let shard_len = idx.len().div_ceil(replicas.len()).max(1);
            let (mut grads, mut lv, mut scores, mut labels) = (Vec::new(), 0f64, Vec::new(), Vec::new());
            for (shard, dev) in idx.chunks(shard_len).zip(&replicas) {
                let Some(b) = load_batch(&train_ds, shard, aug, batch_seed, dev) else {
                    progress.skipped += shard.len();
                    continue;
                };
                for (p, why) in &b.skipped {
                    eprintln!("skipped {p}: {why}");
                }
                progress.skipped += b.skipped.len();
                let share = b.label_vec.len() as f64 / idx.len() as f64;
                let replica = if dev == &ad { None } else { Some(model.clone().fork(dev)) };
                let m = replica.as_ref().unwrap_or(&model);
                let logits = m.forward(b.images);
                let loss = loss_fn.forward(logits.clone(), b.labels.to_device(dev)).mul_scalar(share);
                lv += loss.clone().into_scalar::<f32>() as f64;
                scores.extend(logits.inner().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default());
                labels.extend(b.label_vec);
                grads.push(GradientsParams::from_grads(loss.backward(), m).to_device(&ad, &model));
            }
            if labels.is_empty() {
                continue;
            }
            let lv = lv * idx.len() as f64 / labels.len() as f64;
            if !lv.is_finite() {
                return Err(Error::Invalid(format!(
                    "loss is {lv} at epoch {epoch} step {s}: stopped; the last good checkpoint is {}",
                    dir.join(CHECKPOINT).display()
                )));
            }
            let grads = optim::merge_grads(&model, grads);
            let (m, _norm) = optim::step(model, grads, &mut state, &cfg.optim, lr, &frozen);
            model = m;
            optim::update_ema(&model, &mut state, &cfg.optim);
            let (c1, _) = hits(&scores, classes, &labels);
            progress.loss_sum += lv * labels.len() as f64;
            progress.correct += c1;
            progress.seen += labels.len() as u64;
            progress.step_in_epoch = s + 1;
            progress.global_step += 1;
            if cfg.checkpoint_every.is_some_and(|n| n > 0 && progress.global_step % n as u64 == 0) {
                save_checkpoint(dir, &cfg, &model, &state, &progress)?;
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
        let secs = t0.elapsed().as_secs_f64();
        let eval_model = optim::ema_model(&model, &state);
        let zf = zero_fraction(&eval_model, &eval_ds, &cfg, device);
        if zf > 0.99 {
            eprintln!(
                "warning: {:.1}% of the last feature map is zero: the network may be dying (paper Sec. 3.3)",
                zf * 100.0
            );
        }
        let p = Predictor::new(eval_model, engine_for(device), device);
        let ev = evaluate(&p, &eval_ds, cfg.size, cfg.crop_pct, 1, cfg.eval_limit, cfg.batch.max(16));
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
        write_metrics(dir, &progress.history)?;
        save_checkpoint(dir, &cfg, &model, &state, &progress)?;
    }
    let final_model = optim::ema_model(&model, &state);
    let model_path = dir.join("model.safetensors");
    weights::save_model(&final_model, &model_path)?;
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
