//! int8 inference: post-training static quantization of the fast engine.
//!
//! Scheme (BatchNorm already folded into the convolutions by `crate::lower`):
//! - weights: per output channel, symmetric, int8 in `[-127, 127]`
//!   (`w_scale[co] = max |w[., co]| / 127`, round half to even);
//! - activations: per tensor, uint8 `[0, 255]`, one grid per convolution input, from the
//!   `percentile` of the values seen on the calibration images (100: the maximum): zero point 0
//!   for inputs that never went negative (after a ReLU); for signed inputs (the RGB stem, the
//!   IR-v2 head 1x1 after the last block, which has no ReLU) both tails' percentiles and the
//!   zero point that puts 0.0 on the grid, which only unpadded convolutions can take (a padded
//!   one whose input is signed stays f32);
//! - the sums are i32 (exact), dequantized in the GEMM's epilogue (`acc * x_scale * w_scale +
//!   bias`), so bias, ReLU, the residual `x + scale * up` and the concatenations stay f32
//!   exactly as in the f32 engine. An int8 convolution followed only by int8 convolutions
//!   hands them u8 on their grid, quantized as its tiles leave the GEMM (along the stem, inside
//!   branches, from the merged 1x1 to its branches, from the branches to a residual
//!   up-projection); the others quantize their f32 input right before their GEMM, with the same
//!   result bit for bit. Pools, the classifier and the facenet bottleneck stay f32.
//!
//! Files: `save` writes a self-describing safetensors file: the model's description, the
//! quantization config, and per engine convolution `conv.{i}.weight_int8` `[kh*kw*cin4, cout]`,
//! `weight_scale`, `input_scale`, `input_zero` and `bias` (or `conv.{i}.weight` f32 where it
//! stayed f32).
//! `load_into` fills an engine lowered from the same model config.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

use crate::engine::{Act, Dense, Engine, Int8Tables, View};
use crate::error::{Error, Result};
use crate::sgemm::Grid;

/// Metadata key of a quantized file.
pub const META_QUANT: &str = "quantization";

/// How a model was quantized; written into the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantConfig {
    /// Percentile of the calibration activations mapped to 255 (100 = the maximum).
    pub percentile: f64,
    /// Calibration images used.
    pub images: usize,
    /// Where they came from.
    pub calibration: String,
    /// Convolutions in the engine, and how many of them run int8.
    pub convs: usize,
    pub int8_convs: usize,
    pub scheme: String,
    /// Which engine dataflow the input grids were calibrated on ([`LAYOUT`]; files without
    /// one are layout 1).
    #[serde(default = "first_layout")]
    pub layout: u32,
}

/// The engine dataflow the calibration sees. 2: a pool branch's 1x1 runs before its mean, so
/// its input grid is the block input's (layout 1: the mean's output).
pub const LAYOUT: u32 = 2;

fn first_layout() -> u32 {
    1
}

pub const SCHEME: &str = "int8 per-output-channel symmetric weights, uint8 per-tensor activations, i32 sums";

/// Histogram bins of `Hist`.
const BINS: usize = 2048;

/// A histogram of non-negative values over `[0, hi)` whose range doubles (neighbouring bins
/// merged) when a larger value arrives.
#[derive(Clone, Debug, Default)]
struct Hist {
    bins: Vec<u64>,
    hi: f32,
    count: u64,
}

impl Hist {
    /// Add `f(v)` (clamped at 0) of every value; `max` is the largest of them.
    fn observe(&mut self, v: &[f32], max: f32, f: impl Fn(f32) -> f32 + Sync) {
        if self.bins.is_empty() {
            self.bins = vec![0; BINS];
        }
        if max >= self.hi {
            let mut hi = if self.hi > 0.0 { self.hi } else { max.max(f32::MIN_POSITIVE).next_up() };
            while hi <= max {
                hi *= 2.0;
            }
            let k = (hi / self.hi.max(f32::MIN_POSITIVE)).round() as usize;
            if self.hi > 0.0 && k > 1 {
                let mut merged = vec![0u64; BINS];
                for (j, c) in self.bins.iter().enumerate() {
                    merged[j / k] += c;
                }
                self.bins = merged;
            }
            self.hi = hi;
        }
        let inv = BINS as f32 / self.hi;
        let add = v
            .par_chunks(1 << 14)
            .map(|c| {
                let mut h = vec![0u64; BINS];
                for &x in c {
                    h[((f(x).max(0.0) * inv) as usize).min(BINS - 1)] += 1;
                }
                h
            })
            .reduce(
                || vec![0u64; BINS],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        self.bins.iter_mut().zip(add).for_each(|(x, y)| *x += y);
        self.count += v.len() as u64;
    }

    /// The value below which `p` percent of the observations lie (upper edge of its bin).
    fn percentile(&self, p: f64) -> f32 {
        let want = (self.count as f64 * p / 100.0).ceil() as u64;
        let mut acc = 0;
        for (j, c) in self.bins.iter().enumerate() {
            acc += c;
            if acc >= want {
                return (j + 1) as f32 * self.hi / BINS as f32;
            }
        }
        self.hi
    }
}

/// What a convolution saw during calibration: histograms of its inputs' positive and negative
/// parts.
#[derive(Clone, Debug, Default)]
pub struct ActStats {
    pos: Hist,
    neg: Hist,
    min: f32,
}

impl ActStats {
    pub fn observe(&mut self, v: &[f32]) {
        if v.is_empty() {
            return;
        }
        let (lo, max) = v
            .par_chunks(1 << 14)
            .map(|c| c.iter().fold((f32::INFINITY, 0.0f32), |(a, b), &x| (a.min(x), b.max(x))))
            .reduce(|| (f32::INFINITY, 0.0f32), |(a, b), (c, d)| (a.min(c), b.max(d)));
        if !(lo.is_finite() && max.is_finite()) {
            // NaN / inf activations: nothing sensible to learn from them
            return;
        }
        self.min = if self.pos.count == 0 { lo } else { self.min.min(lo) };
        self.pos.observe(v, max, |x| x);
        self.neg.observe(v, (-lo).max(0.0), |x| -x);
    }

    /// Did every observed value lie at or above zero?
    pub fn non_negative(&self) -> bool {
        self.pos.count > 0 && self.min >= 0.0
    }

    /// `(scale, zero point)` of the uint8 grid for these values: `[0, percentile]` with zero
    /// point 0 when non-negative, else `[-percentile of the negatives, percentile]` and the
    /// zero point that puts 0.0 on the grid.
    pub fn grid(&self, p: f64) -> (f32, u8) {
        let hi = self.pos.percentile(p);
        if self.non_negative() {
            return (if hi > 0.0 { hi / 255.0 } else { 1.0 }, 0);
        }
        let lo = -self.neg.percentile(p);
        let s = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        (s, (-lo / s).round_ties_even().clamp(0.0, 255.0) as u8)
    }
}

/// The viewed channels of `x` (`c` a pixel) as `[pixels, c4]` u8: `clamp(round(x / scale) +
/// zero, 0, 255)` (round half to even), channels `c..c4` zero (their weights are zero).
pub(crate) fn quantize_u8(x: &View, c4: usize, scale: f32, zero: u8) -> Vec<u8> {
    let (inv, z, c, ld) = (1.0 / scale, zero as f32, x.c, x.ld);
    let pixels = x.n * x.h * x.w;
    // every byte is written below (a kept buffer holds old values)
    let mut q = crate::buffers::take(pixels * c4);
    let rows = (1usize << 15).div_ceil(c4);
    q.par_chunks_mut(c4 * rows).zip(x.data.par_chunks(ld * rows)).for_each(|(dst, src)| {
        if c == c4 && ld == c {
            crate::sgemm::quantize_u8(src, dst, Grid::One(inv, z));
        } else {
            for (d, s) in dst.chunks_exact_mut(c4).zip(src.chunks_exact(ld)) {
                crate::sgemm::quantize_u8(&s[x.c0..x.c0 + c], &mut d[..c], Grid::One(inv, z));
                d[c..].fill(0);
            }
        }
    });
    q
}

/// Per output channel symmetric int8 weights of `[k, cout]` f32 (taps x `cin` channels), with
/// the channels of each tap padded to `cin4`.
pub fn quantize_weights(w: &[f32], taps: usize, cin: usize, cout: usize, (x_scale, x_zero): (f32, u8)) -> Int8Tables {
    let cin4 = cin.next_multiple_of(4);
    let mut w_scale = vec![0.0f32; cout];
    for row in w.chunks_exact(cout) {
        for (s, v) in w_scale.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    for s in w_scale.iter_mut() {
        *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
    }
    let mut weight = vec![0i8; taps * cin4 * cout];
    for t in 0..taps {
        for ci in 0..cin {
            let src = &w[(t * cin + ci) * cout..][..cout];
            let dst = &mut weight[(t * cin4 + ci) * cout..][..cout];
            for ((d, v), s) in dst.iter_mut().zip(src).zip(&w_scale) {
                *d = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        }
    }
    Int8Tables { weight, w_scale, x_scale, x_zero }
}

/// Calibrate and quantize `engine` in place: run it on `batches` (NHWC inputs) recording every
/// convolution's inputs, then give each convolution whose inputs stayed non-negative int8
/// weights and the scale `percentile(inputs) / 255`. Returns the int8 tables (`None` where a
/// convolution stays f32), in `Engine::convs_mut` order.
pub fn quantize_engine(
    engine: &mut Engine,
    batches: &mut dyn Iterator<Item = Act>,
    percentile: f64,
    on_batch: &mut dyn FnMut(),
) -> Result<Vec<Option<Int8Tables>>> {
    if !(percentile > 50.0 && percentile <= 100.0) {
        return Err(Error::Invalid(format!("percentile {percentile} is outside (50, 100]")));
    }
    let probes: Vec<Arc<Mutex<ActStats>>> = engine
        .convs_mut()
        .into_iter()
        .map(|c| {
            let p = Arc::new(Mutex::new(ActStats::default()));
            c.set_probe(Some(p.clone()));
            p
        })
        .collect();
    let mut seen = 0;
    for x in batches {
        // one image at a time, in order: a batch's images run in parallel passes, and the
        // statistics (a histogram whose range grows) depend on the order they are seen in
        for i in 0..x.n {
            engine.forward_features(x.image(i));
        }
        seen += 1;
        on_batch();
    }
    let mut convs = engine.convs_mut();
    convs.iter_mut().for_each(|c| c.set_probe(None));
    if seen == 0 {
        return Err(Error::Invalid("no calibration images could be read".into()));
    }
    let mut tables = Vec::with_capacity(convs.len());
    for (c, p) in convs.into_iter().zip(&probes) {
        let stats = p.lock().unwrap_or_else(|e| e.into_inner());
        // a signed input takes a zero point, which padding (read as 0) would contradict
        let t = match (stats.non_negative() || c.pad == [0, 0], c.weights_f32()) {
            (true, Some(w)) if stats.pos.count > 0 => {
                let t = quantize_weights(&w, c.kernel[0] * c.kernel[1], c.cin, c.cout, stats.grid(percentile));
                c.set_int8(&t);
                Some(t)
            }
            _ => None,
        };
        tables.push(t);
    }
    Ok(tables)
}

/// Write the quantized engine: its int8 tables and the f32 rest, with `meta` (the model's
/// description) and the quantization config.
pub fn save(
    path: &Path,
    engine: &mut Engine,
    tables: &[Option<Int8Tables>],
    cfg: &QuantConfig,
    mut meta: HashMap<String, String>,
) -> Result<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (i, (c, t)) in engine.convs_mut().into_iter().zip(tables).enumerate() {
        let p = format!("conv.{i}");
        match t {
            Some(t) => {
                let k = t.weight.len() / c.cout;
                owned.push((
                    format!("{p}.weight_int8"),
                    Dtype::I8,
                    vec![k, c.cout],
                    t.weight.iter().map(|v| *v as u8).collect(),
                ));
                owned.push((format!("{p}.weight_scale"), Dtype::F32, vec![c.cout], f32s(&t.w_scale)));
                owned.push((format!("{p}.input_scale"), Dtype::F32, vec![1], f32s(&[t.x_scale])));
                owned.push((format!("{p}.input_zero"), Dtype::U8, vec![1], vec![t.x_zero]));
            }
            None => {
                let w = c.weights_f32().ok_or_else(|| Error::Invalid(format!("{p}: int8 without tables")))?;
                owned.push((format!("{p}.weight"), Dtype::F32, vec![w.len() / c.cout, c.cout], f32s(&w)));
            }
        }
        owned.push((format!("{p}.bias"), Dtype::F32, vec![c.cout], f32s(&c.b)));
    }
    for (name, d) in engine.dense_layers() {
        let (w, b) = d.matrix();
        owned.push((format!("{name}.weight"), Dtype::F32, vec![d.din(), d.dout()], f32s(&w)));
        owned.push((format!("{name}.bias"), Dtype::F32, vec![d.dout()], f32s(&b)));
    }
    let views = owned
        .iter()
        .map(|(k, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    meta.insert(META_QUANT.to_string(), serde_json::to_string(cfg).unwrap_or_default());
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    crate::weights::write_atomic(path, &bytes)
}

/// The quantization config of a file's header, if it is a quantized file.
pub fn config_of(path: &Path, header: &serde_json::Map<String, serde_json::Value>) -> Result<Option<QuantConfig>> {
    let Some(v) = header.get("__metadata__").and_then(|m| m.get(META_QUANT)).and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    let cfg: QuantConfig = serde_json::from_str(v)
        .map_err(|e| Error::Invalid(format!("{}: bad '{META_QUANT}' metadata: {e}", path.display())))?;
    if cfg.layout != LAYOUT {
        return Err(Error::Invalid(format!(
            "{}: quantized for engine layout {} (this build runs layout {LAYOUT}): run `inception quantize` on the f32 weights again",
            path.display(),
            cfg.layout
        )));
    }
    Ok(Some(cfg))
}

/// Fill `engine` (lowered from the file's model config) with a quantized file's tables,
/// checking every tensor's presence, shape, dtype and values.
pub fn load_into(engine: &mut Engine, path: &Path, bytes: &[u8]) -> Result<()> {
    let st = crate::weights::parse(path, bytes)?;
    let shape_err = |key: &str, expected: Vec<usize>, found: &[usize]| Error::Shape {
        path: path.to_path_buf(),
        key: key.to_string(),
        expected,
        found: found.to_vec(),
    };
    let get = |key: &str, dtype: Dtype, shape: Vec<usize>| -> Result<Vec<u8>> {
        let v = st.tensor(key).map_err(|_| Error::MissingTensor { path: path.to_path_buf(), key: key.to_string() })?;
        if v.dtype() != dtype {
            return Err(Error::Invalid(format!(
                "{}: tensor '{key}' has dtype {:?}, expected {dtype:?}",
                path.display(),
                v.dtype()
            )));
        }
        if v.shape() != shape.as_slice() {
            return Err(shape_err(key, shape, v.shape()));
        }
        Ok(v.data().to_vec())
    };
    let floats = |key: &str, shape: Vec<usize>| -> Result<Vec<f32>> {
        let b = get(key, Dtype::F32, shape)?;
        let v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        match crate::weights::value_problem(key, &v) {
            Some(p) => Err(Error::Invalid(format!("{}: {p}", path.display()))),
            None => Ok(v),
        }
    };
    let convs = engine.convs_mut();
    let n = convs.len();
    if st.names().iter().any(|k| {
        k.strip_prefix("conv.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= n)
    }) {
        return Err(Error::Invalid(format!("{}: holds more convolutions than the {n} of its model", path.display())));
    }
    for (i, c) in convs.into_iter().enumerate() {
        let p = format!("conv.{i}");
        let taps = c.kernel[0] * c.kernel[1];
        let bias = floats(&format!("{p}.bias"), vec![c.cout])?;
        if st.tensor(&format!("{p}.weight_int8")).is_ok() {
            let k4 = taps * c.cin.next_multiple_of(4);
            let weight =
                get(&format!("{p}.weight_int8"), Dtype::I8, vec![k4, c.cout])?.into_iter().map(|v| v as i8).collect();
            let w_scale = floats(&format!("{p}.weight_scale"), vec![c.cout])?;
            let x_scale = floats(&format!("{p}.input_scale"), vec![1])?[0];
            let x_zero = get(&format!("{p}.input_zero"), Dtype::U8, vec![1])?[0];
            if x_zero != 0 && c.pad != [0, 0] {
                return Err(Error::Invalid(format!(
                    "{}: {p}: a padded convolution needs input zero point 0",
                    path.display()
                )));
            }
            let positive = |v: f32| v.is_finite() && v > 0.0;
            if !positive(x_scale) || !w_scale.iter().all(|s| positive(*s)) {
                return Err(Error::Invalid(format!("{}: {p}: scales must be positive", path.display())));
            }
            c.set_f32(None, bias);
            c.set_int8(&Int8Tables { weight, w_scale, x_scale, x_zero });
        } else {
            let w = floats(&format!("{p}.weight"), vec![taps * c.cin, c.cout])?;
            c.set_f32(Some(&w), bias);
        }
    }
    for (name, d) in engine.dense_layers_mut() {
        let (din, dout) = (d.din(), d.dout());
        let w = floats(&format!("{name}.weight"), vec![din, dout])?;
        let b = floats(&format!("{name}.bias"), vec![dout])?;
        *d = Dense::new(&w, din, dout, b);
    }
    Ok(())
}
