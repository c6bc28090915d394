//! `inception bench`: warm-up, then median / min / max of N timed runs of inference or one
//! training step (forward, cross-entropy, backward, our TF-RMSProp update and EMA), images/s
//! and peak RSS.
//! Weights are random (Kaiming init, identity BatchNorm statistics); the RMS of the final
//! feature map (of the first image) is recorded so denormal-range activations would be visible.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{Model, ModelConfig, ModelKind};
use crate::predict::{EngineKind, Predictor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    Infer,
    Train,
}

/// Arithmetic of the timed inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    /// The fast engine quantized (`crate::quant`), calibrated on 16 synthetic images.
    Int8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchConfig {
    pub model: ModelKind,
    pub mode: BenchMode,
    pub batch: usize,
    pub size: usize,
    pub warmup: usize,
    pub runs: usize,
    pub device: String,
    pub engine: EngineKind,
    pub threads: Option<usize>,
    #[serde(default = "f32_precision")]
    pub precision: Precision,
    /// Channel multiplier (1.0: the published network).
    #[serde(default = "unit_width")]
    pub width: f64,
}

fn unit_width() -> f64 {
    1.0
}

fn f32_precision() -> Precision {
    Precision::F32
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub images_per_s: f64,
    pub peak_rss_mb: f64,
    pub weight_mb: f64,
    pub feature_rms: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// This machine's measured f32 FMA peak of one core (GFLOP/s), for the distance to the floor.
    pub fma_peak_gflops_per_core: f64,
    /// Fast engine, f32: convolutions run as Winograd, and all convolutions.
    #[serde(default)]
    pub winograd_convs: Option<(usize, usize)>,
}

/// `/proc/loadavg`'s first three fields ("" where unavailable).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Peak resident set size of this process in MiB (`VmHWM`), 0 where unavailable.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn time_runs(cfg: &BenchConfig, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..cfg.warmup {
        f();
    }
    (0..cfg.runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn rms(t: Tensor<4>) -> f64 {
    t.powi_scalar(2).mean().sqrt().into_scalar::<f32>() as f64
}

/// Bytes available to this process (`MemAvailable`), `None` where unknown.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Refuse a forward (or training step) whose activations would not fit in memory: a generous
/// estimate per input pixel (measured: ~0.6 KB inference on the fast engine, ~4.5 KB a
/// training step, IR-v2 at 299 px) plus the weights, against `MemAvailable`.
pub fn check_memory(kind: ModelKind, batch: usize, size: usize, train: bool) -> Result<()> {
    let per_px = if train { 6144.0 } else { 1536.0 };
    let weight_bytes = match kind {
        ModelKind::InceptionResnetV2 => 56e6,
        ModelKind::InceptionV4 => 43e6,
        _ => 33e6,
    } * 4.0
        * if train { 5.0 } else { 1.0 };
    let need = batch as f64 * (size * size) as f64 * per_px + weight_bytes;
    match mem_available() {
        Some(avail) if need > avail as f64 * 0.9 => Err(Error::Invalid(format!(
            "batch {batch} at {size} px needs about {:.1} GiB, more than the {:.1} GiB available: \
             use a smaller --batch or --size",
            need / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        ))),
        _ => Ok(()),
    }
}

pub fn run(cfg: &BenchConfig, device: &Device) -> Result<BenchReport> {
    crate::preprocess::check_size(cfg.size)?;
    if cfg.batch == 0 || cfg.runs == 0 {
        return Err(Error::Invalid("--batch and --runs must be >= 1".into()));
    }
    check_memory(cfg.model, cfg.batch, cfg.size, cfg.mode == BenchMode::Train)?;
    let before = loadavg();
    let mcfg = ModelConfig { width: cfg.width, ..ModelConfig::new(cfg.model, 1000) };
    let shape = [cfg.batch, 3, cfg.size, cfg.size];
    let mut winograd = None;
    let (times, feature_rms, weight_mb) = match cfg.mode {
        BenchMode::Infer => {
            let model = Model::new(&mcfg, device);
            let weight_mb = model.num_params() as f64 * 4.0 / (1 << 20) as f64;
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
            let mut p = match cfg.precision {
                Precision::F32 => Predictor::new(model, cfg.engine, device),
                Precision::Int8 => {
                    if cfg.engine != EngineKind::Fast {
                        return Err(Error::Invalid("--precision int8 runs on the fast engine".into()));
                    }
                    let mut e = crate::lower::lower(model);
                    let per = 3 * cfg.size * cfg.size;
                    let mut calib = (0..4usize).map(|b| {
                        let imgs: Vec<f32> =
                            (0..4 * per).map(|i| (((i + b * per) * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
                        crate::engine::Act::from_nchw(&imgs, [4, 3, cfg.size, cfg.size])
                    });
                    crate::quant::quantize_engine(&mut e, &mut calib, 99.99, &mut || {})?;
                    Predictor::Fast(Box::new(e))
                }
            };
            // the RMS on the first image alone: a whole batch's stage maps (kept and converted
            // to NCHW, ~35 MiB an image for IR-v2 at 299 px) would be most of the peak RSS
            let one = [1, 3, cfg.size, cfg.size];
            let last = p.run(&x[..3 * cfg.size * cfg.size], one, true).stages.pop().map(|o| o.data).unwrap_or_default();
            let feature_rms = (last.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / last.len().max(1) as f64).sqrt();
            let times = time_runs(cfg, || {
                let _ = p.run(&x, shape, false);
            });
            if let Predictor::Fast(e) = &mut p {
                winograd = Some(e.winograd_count());
            }
            (times, feature_rms, weight_mb)
        }
        BenchMode::Train if cfg.engine == EngineKind::Fast => {
            // our CPU training engine: a step, TF-RMSProp and the EMA on flat buffers
            let model = Model::new(&mcfg, device);
            let weight_mb = model.num_params() as f64 * 4.0 / (1 << 20) as f64;
            let mut net = crate::train::fast::Net::from_model(&model);
            drop(model);
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
            let labels: Vec<usize> = (0..cfg.batch).map(|i| (i * 37) % 1000).collect();
            let ocfg = crate::train::optim::OptimConfig::default();
            let mut st = crate::train::fast::OptState::new(&net.slots);
            let mut step = || {
                net.step(crate::engine::Act::from_nchw(&x, shape), &labels, 0.1, 0.1, 0);
                crate::train::fast::optimizer_step(&mut net.slots, &mut st, &ocfg, 0.045, &|_| false);
                crate::train::fast::update_ema(&net.slots, &mut st, &ocfg);
            };
            let times = time_runs(cfg, &mut step);
            let prof = crate::train::fast::profile_report();
            if !prof.is_empty() {
                eprintln!("{} steps: {prof}", cfg.warmup + cfg.runs);
            }
            (times, 0.0, weight_mb)
        }
        BenchMode::Train => {
            let device = device.clone().autodiff();
            let mut model = Some(Model::new(&mcfg, &device));
            let weight_mb = model.as_ref().map_or(0, |m| m.num_params()) as f64 * 4.0 / (1 << 20) as f64;
            let x = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
            let labels: Vec<i64> = (0..cfg.batch as i64).map(|i| (i * 37) % 1000).collect();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [cfg.batch]), &device);
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            let ocfg = crate::train::optim::OptimConfig::default();
            let mut state = crate::train::optim::OptimState::default();
            let feature_rms = model.as_ref().map_or(0.0, |m| rms(m.forward_features(x.clone())));
            let mut step = || {
                let Some(m) = model.take() else { return };
                let loss = loss_fn.forward(m.forward(x.clone()), y.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                let (m, _) = crate::train::optim::step(m, grads, &mut state, &ocfg, 0.045, &|_| false);
                crate::train::optim::update_ema(&m, &mut state, &ocfg);
                model = Some(m);
            };
            let times = time_runs(cfg, &mut step);
            (times, feature_rms, weight_mb)
        }
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    Ok(BenchReport {
        config: cfg.clone(),
        median_ms,
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        images_per_s: cfg.batch as f64 / (median_ms / 1e3),
        peak_rss_mb: peak_rss_mb(),
        weight_mb,
        feature_rms,
        loadavg_before: before,
        loadavg_after: loadavg(),
        fma_peak_gflops_per_core: crate::sgemm::fma_peak_gflops(),
        winograd_convs: winograd,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(
            f,
            "{} {:?} {:?} b{} {}px on {} ({:?}): median {:.1} ms (min {:.1}, max {:.1}), {:.2} img/s, peak RSS {:.0} MiB \
             (weights {:.0} MiB), load {} -> {}",
            c.model,
            c.mode,
            c.precision,
            c.batch,
            c.size,
            c.device,
            c.engine,
            self.median_ms,
            self.min_ms,
            self.max_ms,
            self.images_per_s,
            self.peak_rss_mb,
            self.weight_mb,
            self.loadavg_before,
            self.loadavg_after
        )?;
        if let Some((w, n)) = self.winograd_convs {
            write!(f, ", {w} of {n} convolutions as Winograd")?;
        }
        Ok(())
    }
}
