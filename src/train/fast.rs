//! The CPU training engine (`--engine fast`, the default of `inception train` on the CPU): a
//! training step of any network we ship, forward in training mode and backward, on our own
//! `sgemm`, over the branch structure the fast inference engine is built from
//! (`crate::lower::part`: every network is still described once).
//!
//! - Tensors are flat buffers keyed by checkpoint key (`Slot`), read from and written back to
//!   a burn `Model`, so checkpoints and exported models are the burn path's.
//! - Convolution: forward and data gradient as implicit-im2col GEMMs (the data gradient of a
//!   stride-1 convolution is the convolution of the output gradient with the flipped,
//!   transposed kernel; of a strided one a GEMM into columns scattered back, `col2im`);
//!   weight gradient `dW^T = dZ^T . im2col(X)` over chunks of pixels.
//! - BatchNorm with batch statistics (biased variance to normalise, unbiased into the running
//!   statistics, as PyTorch), ReLU, 3x3/2 max pool (gradient to the first maximum), 3x3/1
//!   average pool (padding excluded), concatenation (branches write channel slices of one
//!   buffer), the residual `x + scale * up`, global pooling, facenet's bottleneck (linear +
//!   BatchNorm1d), dropout, the classifier and label-smoothed cross entropy.
//! - Optimizer on the flat buffers: clipping by global norm, L2 weight decay, TF-RMSProp and
//!   the weight EMA, as `train::optim` (same formulas, same state keys).
//!
//! Every reduction runs over fixed chunks combined in a fixed order, so a step gives the same
//! bits whatever the thread count or scheduling.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::engine::{Act, Branch, ConvShape, Op, Residual, avg_pool_into, max_pool_into};
use crate::layers::BN_EPS;
use crate::lower::{ConvSrc, part};
use crate::models::{Head, Model, ModelKind};
use crate::sgemm::{self, Epilogue, PackedB, Rows};
use crate::train::data::SplitMix;
use crate::train::optim::OptimConfig;
use crate::weights::{PathTracker, track_paths};

/// A training step frees and allocates the same few hundred large buffers every time. glibc
/// would hand most of them back to the kernel (one arena per rayon worker, each chunk over
/// the mmap threshold mapped apart), and the next step would fault every page in again
/// (measured: 11% of an IR-v2 step in `clear_page`). One arena, the largest mmap threshold
/// glibc takes, and no trimming keep them in the heap for reuse (IR-v2 b8: 3.7 -> 3.4 s a step,
/// peak RSS 3.6 -> 2.4 GB). Called when a training engine is built.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// `INCEPTION_PROFILE_TRAIN=1`: time spent per phase of the steps, printed by `profile_report`.
mod prof {
    use std::sync::atomic::{AtomicU64, Ordering};
    pub const NAMES: [&str; 8] = [
        "conv forward gemm",
        "bn forward",
        "bn backward",
        "weight grad",
        "data grad",
        "pools",
        "residual/head",
        "optimizer",
    ];
    static NS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    pub fn on() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("INCEPTION_PROFILE_TRAIN").is_some())
    }
    pub fn time<T>(i: usize, f: impl FnOnce() -> T) -> T {
        if !on() {
            return f();
        }
        let t = std::time::Instant::now();
        let r = f();
        NS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
    pub fn add(i: usize, t: std::time::Instant) {
        NS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    pub fn report() -> String {
        NAMES
            .iter()
            .zip(&NS)
            .map(|(n, v)| format!("{n}: {:.0} ms", v.swap(0, Ordering::Relaxed) as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Time per phase since the last call (`INCEPTION_PROFILE_TRAIN=1`; empty otherwise).
pub fn profile_report() -> String {
    if prof::on() { prof::report() } else { String::new() }
}

/// What a tensor is to the optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Convolution and linear weights (L2 weight decay).
    Weight,
    /// Biases, BatchNorm scale and shift.
    Affine,
    /// BatchNorm running statistics (no gradient).
    Buffer,
}

/// One tensor of the model under its checkpoint key, in burn's layout (linear weights
/// `[in, out]`).
#[derive(Clone, Debug)]
pub struct Slot {
    pub key: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    pub kind: SlotKind,
}

struct Collect<'a> {
    kind: ModelKind,
    tracker: PathTracker,
    slots: &'a mut Vec<Slot>,
    ids: &'a mut HashMap<ParamId, usize>,
}

impl ModuleVisitor for Collect<'_> {
    track_paths!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.tracker.leaf(self.kind);
        let t = param.val();
        let shape = t.dims().to_vec();
        let value = t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let kind = if key.ends_with("running_mean") || key.ends_with("running_var") {
            SlotKind::Buffer
        } else if D >= 2 && key.ends_with(".weight") {
            SlotKind::Weight
        } else {
            SlotKind::Affine
        };
        let grad = if kind == SlotKind::Buffer { Vec::new() } else { vec![0.0; value.len()] };
        self.ids.insert(param.id, self.slots.len());
        self.slots.push(Slot { key, shape, value, grad, kind });
    }
}

struct Ids(Vec<ParamId>);

impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.id);
    }
}

/// The slots of a module's tensors by key suffix (`weight`, `bias`, `running_mean`, ...).
fn slots_of<M: Module>(m: &M, ids: &HashMap<ParamId, usize>, slots: &[Slot]) -> HashMap<&'static str, usize> {
    let mut v = Ids(Vec::new());
    m.visit(&mut v);
    let mut out = HashMap::new();
    for id in v.0 {
        let Some(&i) = ids.get(&id) else { continue };
        for suffix in ["running_mean", "running_var", "weight", "bias"] {
            if slots[i].key.ends_with(suffix) {
                out.insert(suffix, i);
                break;
            }
        }
    }
    out
}

/// A BatchNorm's slots.
#[derive(Clone, Copy, Debug)]
struct Bn {
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
}

fn bn_of(s: &HashMap<&'static str, usize>) -> Bn {
    Bn { gamma: s["weight"], beta: s["bias"], mean: s["running_mean"], var: s["running_var"] }
}

/// A trainable convolution (+ BatchNorm) (+ ReLU); weights `[cout, cin, kh, kw]`.
#[derive(Clone, Debug)]
pub struct TConv {
    cin: usize,
    cout: usize,
    kernel: [usize; 2],
    stride: usize,
    pad: [usize; 2],
    relu: bool,
    w: usize,
    bias: Option<usize>,
    bn: Option<Bn>,
}

impl ConvShape for TConv {
    fn kernel(&self) -> [usize; 2] {
        self.kernel
    }
    fn stride(&self) -> usize {
        self.stride
    }
    fn pad(&self) -> [usize; 2] {
        self.pad
    }
    fn cout(&self) -> usize {
        self.cout
    }
}

/// Channels `[off, off + c)` of a row-major buffer with `ld` channels a row.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    ld: usize,
    off: usize,
}

impl<'a> View<'a> {
    fn whole(a: &'a Act) -> Self {
        Self { data: &a.data, ld: a.c, off: 0 }
    }
    fn shift(self, by: usize) -> Self {
        Self { off: self.off + by, ..self }
    }
    fn row(&self, r: usize, c: usize) -> &'a [f32] {
        &self.data[r * self.ld + self.off..][..c]
    }
}

/// Rows per chunk of the fixed-order reductions.
const CHUNK: usize = 256;
/// Rows per task of the elementwise passes.
const ROWS: usize = 64;

/// Per-channel sums over the rows of `[m, c]` values produced by `f(row, out)`: chunk sums in
/// f64, combined in chunk order (deterministic).
fn channel_sums(m: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = (0..m.div_ceil(CHUNK))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0.0f64; c];
            for r in k * CHUNK..((k + 1) * CHUNK).min(m) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f64; c];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// `[rows, cols]` -> `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    // tasks of 16 output rows (input columns), walked in 64-row blocks of the input
    const B: usize = 16;
    let mut t = vec![0.0f32; a.len()];
    if rows == 0 || cols == 0 {
        return t;
    }
    t.par_chunks_mut(rows * B).enumerate().for_each(|(bi, dst)| {
        let (c0, cn) = (bi * B, dst.len() / rows);
        for r0 in (0..rows).step_by(64) {
            for r in r0..(r0 + 64).min(rows) {
                let src = &a[r * cols + c0..][..cn];
                for (j, v) in src.iter().enumerate() {
                    dst[j * rows + r] = *v;
                }
            }
        }
    });
    t
}

/// What a convolution's backward needs: its input, and with BatchNorm the normalised output
/// and `1 / sqrt(var + eps)`.
struct ConvTape {
    x: Arc<Act>,
    xhat: Vec<f32>,
    invstd: Vec<f32>,
}

impl TConv {
    fn from_src(src: ConvSrc<'_>, ids: &HashMap<ParamId, usize>, slots: &[Slot]) -> Self {
        let [cout, cin, kh, kw] = src.conv.weight.dims();
        let pad = match src.conv.padding {
            PaddingConfig2d::Explicit(t, l, _, _) => [t, l],
            _ => [0, 0],
        };
        let cs = slots_of(src.conv, ids, slots);
        Self {
            cin,
            cout,
            kernel: [kh, kw],
            stride: src.conv.stride[0],
            pad,
            relu: src.relu,
            w: cs["weight"],
            bias: cs.get("bias").copied(),
            bn: src.bn.map(|bn| bn_of(&slots_of(bn, ids, slots))),
        }
    }

    fn k(&self) -> usize {
        self.kernel[0] * self.kernel[1] * self.cin
    }

    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == 1 && self.pad == [0, 0]
    }

    /// The weights packed as the forward GEMM's `[kh * kw * cin, cout]`, tap order
    /// `(ky, kx, ci)`.
    fn packed(&self, slots: &[Slot]) -> PackedB {
        let ([kh, kw], cin, cout) = (self.kernel, self.cin, self.cout);
        // [cout, (ci, tap)] transposed in cache blocks, then its rows in (tap, ci) order
        let t = transpose(&slots[self.w].value, cout, cin * kh * kw);
        PackedB::from_rows(self.k(), cout, |r, out| {
            let (tap, ci) = (r / cin, r % cin);
            out.copy_from_slice(&t[(ci * kh * kw + tap) * cout..][..cout]);
        })
    }

    fn rows<'a>(&self, data: &'a [f32], x: &Act) -> Rows<'a> {
        if self.pointwise() {
            Rows::Dense { data, ld: x.c }
        } else {
            Rows::Conv {
                data,
                ld: x.c,
                c0: 0,
                cin: x.c,
                hw: [x.h, x.w],
                k: self.kernel,
                stride: self.stride,
                pad: self.pad,
                out: self.out_hw(x.h, x.w).into(),
            }
        }
    }

    /// Training forward: `y = act(bn(conv(x)))` with batch statistics into channels
    /// `[off, off + cout)` of `dst` (`ld` a row); updates the running statistics.
    fn forward(
        &self,
        slots: &mut [Slot],
        x: Arc<Act>,
        dst: &mut [f32],
        ld: usize,
        off: usize,
        momentum: f32,
    ) -> ConvTape {
        let (oh, ow) = self.out_hw(x.h, x.w);
        let (m, cout) = (x.n * oh * ow, self.cout);
        let mut z = prof::time(0, || {
            let w = self.packed(slots);
            let mut z = vec![0.0f32; m * cout];
            let bias = self.bias.map(|b| slots[b].value.clone());
            let epi = Epilogue { bias: bias.as_deref(), alpha: 1.0, load: false, relu: false };
            sgemm::gemm(m, self.rows(&x.data, &x), &w, &mut z, cout, 0, epi);
            z
        });
        let _t = prof::on().then(std::time::Instant::now);
        let Some(bn) = self.bn else {
            let relu = self.relu;
            dst.par_chunks_mut(ld * ROWS).zip(z.par_chunks(cout * ROWS)).for_each(|(db, zb)| {
                for (d, s) in db.chunks_mut(ld).zip(zb.chunks_exact(cout)) {
                    for (o, v) in d[off..off + cout].iter_mut().zip(s) {
                        *o = if relu { v.max(0.0) } else { *v };
                    }
                }
            });
            return ConvTape { x, xhat: Vec::new(), invstd: Vec::new() };
        };
        // one pass: sums of `z - z0` and its square in f64, shifted by the first row (a value
        // of the batch) so that the variance does not cancel
        let shift: Vec<f64> = z[..cout].iter().map(|v| *v as f64).collect();
        let sums = channel_sums(m, 2 * cout, |r, acc| {
            let (s1, s2) = acc.split_at_mut(cout);
            for (((a, q), v), z0) in s1.iter_mut().zip(s2.iter_mut()).zip(&z[r * cout..(r + 1) * cout]).zip(&shift) {
                let d = *v as f64 - z0;
                *a += d;
                *q += d * d;
            }
        });
        let mean: Vec<f64> = (0..cout).map(|c| shift[c] + sums[c] / m as f64).collect();
        let var: Vec<f64> =
            (0..cout).map(|c| (sums[cout + c] / m as f64 - (sums[c] / m as f64).powi(2)).max(0.0)).collect();
        let invstd: Vec<f32> = var.iter().map(|v| (1.0 / (v + BN_EPS).sqrt()) as f32).collect();
        let meanf: Vec<f32> = mean.iter().map(|v| *v as f32).collect();
        let (g, b) = (slots[bn.gamma].value.clone(), slots[bn.beta].value.clone());
        let relu = self.relu;
        z.par_chunks_mut(cout * ROWS).zip(dst.par_chunks_mut(ld * ROWS)).for_each(|(zb, db)| {
            for (zr, d) in zb.chunks_exact_mut(cout).zip(db.chunks_mut(ld)) {
                for c in 0..cout {
                    let xh = (zr[c] - meanf[c]) * invstd[c];
                    zr[c] = xh;
                    let y = g[c] * xh + b[c];
                    d[off + c] = if relu { y.max(0.0) } else { y };
                }
            }
        });
        update_running(slots, bn, &mean, &var, m, momentum);
        if let Some(t) = _t {
            prof::add(1, t);
        }
        ConvTape { x, xhat: z, invstd }
    }

    /// Backward from `dy` (the gradient of this convolution's output): accumulates the
    /// parameter gradients, and the input gradient into `dx` when given.
    fn backward(&self, slots: &mut [Slot], tape: &ConvTape, dy: View<'_>, dx: Option<&mut Act>) {
        let x = &tape.x;
        let (oh, ow) = self.out_hw(x.h, x.w);
        let (m, cout) = (x.n * oh * ow, self.cout);
        let t0 = prof::on().then(std::time::Instant::now);
        let mut dz = vec![0.0f32; m * cout];
        match self.bn {
            Some(bn) => {
                let (g, b) = (&slots[bn.gamma].value, &slots[bn.beta].value);
                let relu = self.relu;
                let xhat = &tape.xhat;
                // one pass: the ReLU-masked gradient into dz, and its sums (dbeta) and its
                // sums against xhat (dgamma), per fixed chunk of rows
                let parts: Vec<Vec<f64>> = dz
                    .par_chunks_mut(cout * CHUNK)
                    .enumerate()
                    .map(|(k, ob)| {
                        let mut acc = vec![0.0f64; 2 * cout];
                        for (i, o) in ob.chunks_exact_mut(cout).enumerate() {
                            let r = k * CHUNK + i;
                            let (src, xh) = (dy.row(r, cout), &xhat[r * cout..(r + 1) * cout]);
                            for c in 0..cout {
                                let live = !relu || g[c] * xh[c] + b[c] > 0.0;
                                let v = if live { src[c] } else { 0.0 };
                                o[c] = v;
                                acc[c] += v as f64;
                                acc[cout + c] += v as f64 * xh[c] as f64;
                            }
                        }
                        acc
                    })
                    .collect();
                let mut sums = vec![0.0f64; 2 * cout];
                for p in parts {
                    sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
                }
                let (dbeta, dgamma) = sums.split_at(cout);
                // dz = g * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), in f64: the
                // subtraction cancels most of dy where the batch is small
                let k: Vec<f64> = (0..cout).map(|c| g[c] as f64 * tape.invstd[c] as f64).collect();
                let (mdb, mdg): (Vec<f64>, Vec<f64>) =
                    (dbeta.iter().map(|v| v / m as f64).collect(), dgamma.iter().map(|v| v / m as f64).collect());
                dz.par_chunks_mut(cout * ROWS).zip(xhat.par_chunks(cout * ROWS)).for_each(|(ob, xb)| {
                    for (o, xh) in ob.chunks_exact_mut(cout).zip(xb.chunks_exact(cout)) {
                        for c in 0..cout {
                            o[c] = (k[c] * (o[c] as f64 - mdb[c] - xh[c] as f64 * mdg[c])) as f32;
                        }
                    }
                });
                let (db, dg): (Vec<f32>, Vec<f32>) =
                    (dbeta.iter().map(|v| *v as f32).collect(), dgamma.iter().map(|v| *v as f32).collect());
                add(&mut slots[bn.gamma].grad, &dg);
                add(&mut slots[bn.beta].grad, &db);
            }
            None => {
                debug_assert!(!self.relu, "a ReLU without BatchNorm keeps no mask");
                dz.par_chunks_mut(cout * ROWS).enumerate().for_each(|(k, ob)| {
                    for (i, o) in ob.chunks_exact_mut(cout).enumerate() {
                        o.copy_from_slice(dy.row(k * ROWS + i, cout));
                    }
                });
                if let Some(bias) = self.bias {
                    let s = channel_sums(m, cout, |r, acc| {
                        acc.iter_mut().zip(&dz[r * cout..(r + 1) * cout]).for_each(|(a, v)| *a += *v as f64)
                    });
                    add(&mut slots[bias].grad, &s.iter().map(|v| *v as f32).collect::<Vec<_>>());
                }
            }
        }
        if let Some(t) = t0 {
            prof::add(2, t);
        }
        prof::time(3, || self.weight_grad(slots, x, &dz, m));
        if let Some(dx) = dx {
            prof::time(4, || self.data_grad(slots, &dz, dx));
        }
    }

    /// `dW += im2col(x)^T . dz`, as `dW^T = dz^T . im2col(x)` over chunks of pixels.
    fn weight_grad(&self, slots: &mut [Slot], x: &Act, dz: &[f32], m: usize) {
        let (k, cout) = (self.k(), self.cout);
        let dzt = transpose(dz, m, cout);
        let mut dwt = vec![0.0f32; cout * k];
        let rows = self.rows(&x.data, x);
        let im2col = sgemm::im2col(&rows, m, k);
        let chunk = ((1usize << 22) / k).clamp(256, 16384);
        for (i, r0) in (0..m).step_by(chunk).enumerate() {
            let r1 = (r0 + chunk).min(m);
            let b = if self.pointwise() {
                PackedB::new(&x.data[r0 * k..r1 * k], r1 - r0, k)
            } else {
                PackedB::from_rows(r1 - r0, k, |r, out| im2col(r0 + r, out))
            };
            let epi = Epilogue { bias: None, alpha: 1.0, load: i > 0, relu: false };
            sgemm::gemm(cout, Rows::Dense { data: &dzt[r0..], ld: m }, &b, &mut dwt, k, 0, epi);
        }
        let ([kh, kw], cin) = (self.kernel, self.cin);
        let g = &mut slots[self.w].grad;
        g.par_chunks_mut(cin * kh * kw).enumerate().for_each(|(co, gco)| {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        gco[(ci * kh + ky) * kw + kx] += dwt[co * k + (ky * kw + kx) * cin + ci];
                    }
                }
            }
        });
    }

    /// `dx += ` the gradient of the input.
    fn data_grad(&self, slots: &[Slot], dz: &[f32], dx: &mut Act) {
        let ([kh, kw], cin, cout, s) = (self.kernel, self.cin, self.cout, self.stride);
        let w = &slots[self.w].value;
        let (oh, ow) = self.out_hw(dx.h, dx.w);
        let m = dx.n * oh * ow;
        let acc = Epilogue { bias: None, alpha: 1.0, load: true, relu: false };
        if self.pointwise() {
            // [cout, cin, 1, 1] is W^T of the forward GEMM already
            let b = PackedB::new(w, cout, cin);
            sgemm::gemm(m, Rows::Dense { data: dz, ld: cout }, &b, &mut dx.data, cin, 0, acc);
        } else if s == 1 && self.pad[0] < kh && self.pad[1] < kw {
            // the convolution of dz with the flipped, transposed kernel: row (tap, co) of it is
            // tap (kh - 1 - ky, kw - 1 - kx) of output channel co, over the input channels
            let b = PackedB::from_rows(kh * kw * cout, cin, |r, out| {
                let (tap, co) = (r / cout, r % cout);
                let (ky, kx) = (kh - 1 - tap / kw, kw - 1 - tap % kw);
                out.iter_mut().enumerate().for_each(|(ci, o)| *o = w[((co * cin + ci) * kh + ky) * kw + kx]);
            });
            let rows = Rows::Conv {
                data: dz,
                ld: cout,
                c0: 0,
                cin: cout,
                hw: [oh, ow],
                k: self.kernel,
                stride: 1,
                pad: [kh - 1 - self.pad[0], kw - 1 - self.pad[1]],
                out: [dx.h, dx.w],
            };
            sgemm::gemm(dx.n * dx.h * dx.w, rows, &b, &mut dx.data, cin, 0, acc);
        } else {
            // columns, then scattered back onto the input
            let k = self.k();
            // row co: output channel co's weights in tap order (ky, kx, ci)
            let b = PackedB::from_rows(cout, k, |co, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    let (tap, ci) = (j / cin, j % cin);
                    *o = w[(co * cin + ci) * kh * kw + tap];
                }
            });
            let mut col = vec![0.0f32; m * k];
            let epi = Epilogue { load: false, ..acc };
            sgemm::gemm(m, Rows::Dense { data: dz, ld: cout }, &b, &mut col, k, 0, epi);
            col2im(&col, self, dx, [oh, ow]);
        }
    }
}

/// `dx += col2im(col)` for `conv`'s geometry: per image and 64-channel slice (no two tasks
/// touch the same value; each sums in pixel order).
fn col2im(col: &[f32], conv: &TConv, dx: &mut Act, [oh, ow]: [usize; 2]) {
    let ([kh, kw], cin, s, [ph, pw]) = (conv.kernel, conv.cin, conv.stride, conv.pad);
    let (h, w) = (dx.h, dx.w);
    let k = conv.k();
    let slices = cin.div_ceil(64);
    let img = h * w * cin;
    let out = dx.data.as_mut_ptr() as usize;
    (0..dx.n * slices).into_par_iter().for_each(|t| {
        let (b, c0) = (t / slices, (t % slices) * 64);
        let c1 = (c0 + 64).min(cin);
        for oy in 0..oh {
            for ox in 0..ow {
                let r = (b * oh + oy) * ow + ox;
                for ky in 0..kh {
                    let iy = (oy * s + ky) as isize - ph as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw {
                        let ix = (ox * s + kx) as isize - pw as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let src = &col[r * k + (ky * kw + kx) * cin..][..cin];
                        let at = b * img + (iy as usize * w + ix as usize) * cin;
                        for (c, v) in src.iter().enumerate().take(c1).skip(c0) {
                            // SAFETY: task (b, slice) is the only writer of channels c0..c1 of
                            // image b; `at + c` is inside dx (iy, ix in bounds).
                            unsafe { *(out as *mut f32).add(at + c) += v };
                        }
                    }
                }
            }
        }
    });
}

fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// Running statistics after one batch (`momentum` as PyTorch's: the weight of the new value;
/// the variance unbiased).
fn update_running(slots: &mut [Slot], bn: Bn, mean: &[f64], var: &[f64], m: usize, momentum: f32) {
    let unbias = m as f64 / (m.max(2) - 1) as f64;
    for (r, v) in slots[bn.mean].value.iter_mut().zip(mean) {
        *r = (1.0 - momentum) * *r + momentum * *v as f32;
    }
    for (r, v) in slots[bn.var].value.iter_mut().zip(var) {
        *r = (1.0 - momentum) * *r + momentum * (*v * unbias) as f32;
    }
}

/// 3x3/2 max pool (VALID) with the window index of each output's (first) maximum.
fn max_pool_fwd(x: &Act, dst: &mut [f32], ld: usize, off: usize) -> Vec<u8> {
    max_pool_into(x, dst, ld, off);
    let (oh, ow, c) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1, x.c);
    let mut arg = vec![0u8; x.n * oh * ow * c];
    arg.par_chunks_mut(c).enumerate().for_each(|(r, a)| {
        let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
        let out = &dst[r * ld + off..][..c];
        for (ch, slot) in a.iter_mut().enumerate() {
            for t in 0..9u8 {
                let (dy, dx) = ((t / 3) as usize, (t % 3) as usize);
                if x.data[((b * x.h + oy * 2 + dy) * x.w + ox * 2 + dx) * c + ch] == out[ch] {
                    *slot = t;
                    break;
                }
            }
        }
    });
    arg
}

/// `dx += ` the max pool's gradient: each output's gradient to its maximum.
fn max_pool_bwd(dy: View<'_>, arg: &[u8], dx: &mut Act) {
    let (oh, ow, c) = ((dx.h - 3) / 2 + 1, (dx.w - 3) / 2 + 1, dx.c);
    let slices = c.div_ceil(64);
    let (h, w) = (dx.h, dx.w);
    let out = dx.data.as_mut_ptr() as usize;
    (0..dx.n * slices).into_par_iter().for_each(|t| {
        let (b, c0) = (t / slices, (t % slices) * 64);
        let c1 = (c0 + 64).min(c);
        for oy in 0..oh {
            for ox in 0..ow {
                let r = (b * oh + oy) * ow + ox;
                let g = dy.row(r, c);
                for ch in c0..c1 {
                    let tap = arg[r * c + ch] as usize;
                    let at = ((b * h + oy * 2 + tap / 3) * w + ox * 2 + tap % 3) * c + ch;
                    // SAFETY: task (b, slice) is the only writer of these channels of image b.
                    unsafe { *(out as *mut f32).add(at) += g[ch] };
                }
            }
        }
    });
}

/// `dx += ` the 3x3/1 average pool's gradient (padding excluded from each mean).
fn avg_pool_bwd(dy: View<'_>, dx: &mut Act) {
    let (h, w, c) = (dx.h, dx.w, dx.c);
    let count = |y: usize, x: usize| {
        let ny = (y + 1).min(h - 1) - y.saturating_sub(1) + 1;
        let nx = (x + 1).min(w - 1) - x.saturating_sub(1) + 1;
        (ny * nx) as f32
    };
    dx.data.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let (b, iy, ix) = (r / (h * w), (r / w) % h, r % w);
        for oy in iy.saturating_sub(1)..=(iy + 1).min(h - 1) {
            for ox in ix.saturating_sub(1)..=(ix + 1).min(w - 1) {
                let inv = 1.0 / count(oy, ox);
                let g = dy.row((b * h + oy) * w + ox, c);
                o.iter_mut().zip(g).for_each(|(d, v)| *d += v * inv);
            }
        }
    });
}

enum OpTape {
    Conv(ConvTape),
    Max(Vec<u8>),
    Avg,
}

/// A branch's tapes: one per op (and its input), one per tail.
struct BranchTape {
    ops: Vec<(Arc<Act>, OpTape)>,
    tails: Vec<ConvTape>,
    /// Output of the op chain (the tails' input).
    chain_out: Option<Arc<Act>>,
}

fn op_forward(
    op: &Op<TConv>,
    slots: &mut [Slot],
    x: Arc<Act>,
    dst: Option<(&mut [f32], usize, usize)>,
    momentum: f32,
) -> (Option<Act>, OpTape) {
    let (oh, ow, c) = op.out_shape(x.h, x.w, x.c);
    let mut own = None;
    let (buf, ld, off) = match dst {
        Some(d) => d,
        None => {
            own = Some(Act::zeros(x.n, oh, ow, c));
            let a = own.as_mut().expect("just set");
            (&mut a.data[..], c, 0)
        }
    };
    let tape = match op {
        Op::Conv(conv) => OpTape::Conv(conv.forward(slots, x, buf, ld, off, momentum)),
        Op::MaxPool => OpTape::Max(max_pool_fwd(&x, buf, ld, off)),
        Op::AvgPool => {
            avg_pool_into(&*x, buf, ld, off, false);
            OpTape::Avg
        }
    };
    (own, tape)
}

fn op_backward(op: &Op<TConv>, slots: &mut [Slot], tape: &OpTape, dy: View<'_>, dx: Option<&mut Act>) {
    match (op, tape) {
        (Op::Conv(conv), OpTape::Conv(t)) => conv.backward(slots, t, dy, dx),
        (Op::MaxPool, OpTape::Max(arg)) => {
            if let Some(dx) = dx {
                max_pool_bwd(dy, arg, dx);
            }
        }
        (Op::AvgPool, OpTape::Avg) => {
            if let Some(dx) = dx {
                avg_pool_bwd(dy, dx);
            }
        }
        _ => unreachable!("tape of another op"),
    }
}

fn branch_forward(
    br: &Branch<TConv>,
    slots: &mut [Slot],
    x: Arc<Act>,
    dst: &mut [f32],
    ld: usize,
    off: usize,
    momentum: f32,
) -> BranchTape {
    let last = if br.tails.is_empty() { br.ops.len() - 1 } else { br.ops.len() };
    let mut ops = Vec::with_capacity(br.ops.len());
    let mut cur = x;
    for op in &br.ops[..last] {
        let (y, t) = op_forward(op, slots, cur.clone(), None, momentum);
        ops.push((cur, t));
        cur = Arc::new(y.expect("an owned output"));
    }
    if br.tails.is_empty() {
        let (_, t) = op_forward(&br.ops[last], slots, cur.clone(), Some((dst, ld, off)), momentum);
        ops.push((cur, t));
        BranchTape { ops, tails: Vec::new(), chain_out: None }
    } else {
        let mut o = off;
        let mut tails = Vec::new();
        for t in &br.tails {
            tails.push(t.forward(slots, cur.clone(), dst, ld, o, momentum));
            o += t.cout;
        }
        BranchTape { ops, tails, chain_out: Some(cur) }
    }
}

fn branch_backward(br: &Branch<TConv>, slots: &mut [Slot], tape: BranchTape, dy: View<'_>, mut dx: Option<&mut Act>) {
    // the gradient of the output of the op about to be processed, when it is not `dy` itself
    let mut g: Option<Act> = None;
    if let Some(out) = &tape.chain_out {
        let mut gc = Act::zeros(out.n, out.h, out.w, out.c);
        let mut o = 0;
        for (t, tt) in br.tails.iter().zip(&tape.tails) {
            t.backward(slots, tt, dy.shift(o), Some(&mut gc));
            o += t.cout;
        }
        g = Some(gc);
    }
    for (i, (x, t)) in tape.ops.iter().enumerate().rev() {
        let dout = match &g {
            Some(a) => View::whole(a),
            None => dy,
        };
        let mut gin = (i > 0).then(|| Act::zeros(x.n, x.h, x.w, x.c));
        let target = if i == 0 { dx.as_deref_mut() } else { gin.as_mut() };
        op_backward(&br.ops[i], slots, t, dout, target);
        g = gin;
    }
}

/// A trunk block: branches concatenated, optionally in a residual.
#[derive(Clone)]
pub struct TBlock {
    branches: Vec<Branch<TConv>>,
    residual: Option<Residual<TConv>>,
}

struct BlockTape {
    branches: Vec<BranchTape>,
    /// Residual blocks: the concatenation, the up-projection's tape, the block output.
    res: Option<(Arc<Act>, ConvTape, Arc<Act>)>,
}

impl TBlock {
    fn forward(&self, slots: &mut [Slot], x: Arc<Act>, momentum: f32) -> (Arc<Act>, BlockTape) {
        let shapes: Vec<_> = self.branches.iter().map(|b| b.out_shape(x.h, x.w, x.c)).collect();
        let (oh, ow) = (shapes[0].0, shapes[0].1);
        let ctot: usize = shapes.iter().map(|s| s.2).sum();
        let mut cat = Act::zeros(x.n, oh, ow, ctot);
        let mut tapes = Vec::with_capacity(self.branches.len());
        let mut off = 0;
        for (b, s) in self.branches.iter().zip(&shapes) {
            tapes.push(branch_forward(b, slots, x.clone(), &mut cat.data, ctot, off, momentum));
            off += s.2;
        }
        let Some(r) = &self.residual else {
            return (Arc::new(cat), BlockTape { branches: tapes, res: None });
        };
        let cat = Arc::new(cat);
        let cout = r.up.cout;
        let mut out = Act::zeros(x.n, oh, ow, cout);
        let up = r.up.forward(slots, cat.clone(), &mut out.data, cout, 0, momentum);
        let (scale, relu, shortcut) = (r.scale, r.relu, r.shortcut);
        out.data.par_chunks_mut(cout).zip(x.data.par_chunks(x.c)).for_each(|(o, xr)| {
            for (v, xv) in o.iter_mut().zip(xr) {
                let pre = if shortcut { xv + scale * *v } else { *v };
                *v = if relu { pre.max(0.0) } else { pre };
            }
        });
        let out = Arc::new(out);
        (out.clone(), BlockTape { branches: tapes, res: Some((cat, up, out)) })
    }

    fn backward(&self, slots: &mut [Slot], tape: BlockTape, dout: &Act, mut dx: Option<&mut Act>) {
        let BlockTape { branches, res } = tape;
        let dcat = match (&self.residual, res) {
            (None, _) => None,
            (Some(r), Some((cat, up, out))) => {
                let mut dpre = dout.data.clone();
                if r.relu {
                    dpre.par_iter_mut().zip(out.data.par_iter()).for_each(|(d, o)| {
                        if *o <= 0.0 {
                            *d = 0.0
                        }
                    });
                }
                if r.shortcut
                    && let Some(dx) = dx.as_deref_mut()
                {
                    add_par(&mut dx.data, &dpre);
                }
                if r.shortcut {
                    dpre.par_iter_mut().for_each(|d| *d *= r.scale);
                }
                let mut dcat = Act::zeros(cat.n, cat.h, cat.w, cat.c);
                let dup = View { data: &dpre, ld: r.up.cout, off: 0 };
                r.up.backward(slots, &up, dup, Some(&mut dcat));
                Some(dcat)
            }
            (Some(_), None) => unreachable!("a residual block's tape has its residual"),
        };
        let dcat_view = match &dcat {
            Some(a) => View::whole(a),
            None => View::whole(dout),
        };
        let mut off = 0;
        for (b, t) in self.branches.iter().zip(branches) {
            let c = t_out_channels(b, &t);
            branch_backward(b, slots, t, dcat_view.shift(off), dx.as_deref_mut());
            off += c;
        }
    }
}

fn part_blocks(p: crate::models::Part, mk: &mut dyn FnMut(ConvSrc<'_>) -> TConv) -> Vec<TBlock> {
    part(p, mk).into_iter().map(|(branches, residual)| TBlock { branches, residual }).collect()
}

/// Output channels of a branch, from what its tape holds.
fn t_out_channels(b: &Branch<TConv>, t: &BranchTape) -> usize {
    let (x, _) = &t.ops[0];
    b.out_shape(x.h, x.w, x.c).2
}

fn add_par(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(d, s)| add(d, s));
}

/// The head: global average pool, facenet's bottleneck (linear without bias + BatchNorm1d),
/// dropout (paper layouts) and the classifier; weights `[in, out]`.
#[derive(Clone)]
struct THead {
    bottleneck: Option<(usize, Option<Bn>)>,
    classifier: Option<(usize, usize)>,
    dropout: f32,
}

/// The result of one training step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// Mean label-smoothed cross entropy of the batch.
    pub loss: f64,
    /// `[n, classes]`.
    pub logits: Vec<f32>,
}

/// A network ready to train on the CPU: its tensors and the blocks over them.
pub struct Net {
    pub kind: ModelKind,
    pub slots: Vec<Slot>,
    blocks: Vec<TBlock>,
    head: THead,
    classes: usize,
}

/// Global average pool of `[n, hw, c]`.
fn global_pool(f: &[f32], n: usize, hw: usize, c: usize) -> Vec<f32> {
    let mut pooled = vec![0.0f32; n * c];
    for (b, out) in pooled.chunks_mut(c).enumerate() {
        for p in 0..hw {
            add(out, &f[(b * hw + p) * c..][..c]);
        }
        out.iter_mut().for_each(|v| *v /= hw as f32);
    }
    pooled
}

/// `y[n, o] = x[n, i] . w[i, o]` (+ bias).
fn linear(x: &[f32], n: usize, w: &[f32], din: usize, dout: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0f32; n * dout];
    let b = PackedB::new(w, din, dout);
    sgemm::gemm(
        n,
        Rows::Dense { data: x, ld: din },
        &b,
        &mut y,
        dout,
        0,
        Epilogue { bias, alpha: 1.0, load: false, relu: false },
    );
    y
}

/// `dw[i, o] += x^T dy`, and `dy . w^T` (the input gradient).
fn linear_backward(x: &[f32], dy: &[f32], n: usize, w: &[f32], dw: &mut [f32], din: usize, dout: usize) -> Vec<f32> {
    dw.par_chunks_mut(dout).enumerate().for_each(|(i, row)| {
        for b in 0..n {
            let xv = x[b * din + i];
            row.iter_mut().zip(&dy[b * dout..(b + 1) * dout]).for_each(|(g, d)| *g += xv * d);
        }
    });
    let mut dx = vec![0.0f32; n * din];
    dx.par_chunks_mut(din).enumerate().for_each(|(b, row)| {
        let d = &dy[b * dout..(b + 1) * dout];
        for (i, v) in row.iter_mut().enumerate() {
            *v = w[i * dout..(i + 1) * dout].iter().zip(d).map(|(a, c)| a * c).sum();
        }
    });
    dx
}

impl Net {
    /// The network of `model` (its weights and BatchNorm statistics copied).
    pub fn from_model(model: &Model) -> Self {
        reuse_freed_memory();
        let kind = model.kind();
        let mut slots = Vec::new();
        let mut ids = HashMap::new();
        model.visit(&mut Collect { kind, tracker: PathTracker::default(), slots: &mut slots, ids: &mut ids });
        let dropout = match model {
            Model::Ir(m) => m.dropout.as_ref().map_or(0.0, |d| d.prob as f32),
            Model::V4(_) => 0.0,
        };
        let (parts, Head { bottleneck, classifier }) = model.clone().into_parts();
        let mut blocks = Vec::new();
        for (_, p) in parts {
            let mut mk = |c: ConvSrc<'_>| TConv::from_src(c, &ids, &slots);
            blocks.extend(part_blocks(p, &mut mk));
        }
        let linear_slots = |l: &burn::nn::Linear| slots_of(l, &ids, &slots);
        let bottleneck =
            bottleneck.map(|(l, bn)| (linear_slots(&l)["weight"], bn.map(|b| bn_of(&slots_of(&b, &ids, &slots)))));
        let classifier = classifier.map(|l| {
            let s = linear_slots(&l);
            (s["weight"], s["bias"])
        });
        let classes = model.num_classes();
        Self { kind, slots, blocks, head: THead { bottleneck, classifier, dropout }, classes }
    }

    /// `model` with this network's tensors (the model must have the same structure).
    pub fn to_model(&self, model: Model) -> Model {
        self.to_model_with(model, |s| &s.value)
    }

    /// `model` with `values(slot)` for every tensor (e.g. the EMA weights with the current
    /// BatchNorm statistics).
    pub fn to_model_with<'a>(&'a self, model: Model, values: impl Fn(&'a Slot) -> &'a [f32]) -> Model {
        let by_key: HashMap<&str, &Slot> = self.slots.iter().map(|s| (s.key.as_str(), s)).collect();
        let mut src = |key: &str, _shape: &[usize]| -> Option<Vec<f32>> {
            let s = by_key.get(key)?;
            let v = values(s);
            if s.shape.len() == 2 && key.ends_with(".weight") {
                // a linear weight: burn's [in, out] to the checkpoint's [out, in]
                Some(transpose(v, s.shape[0], s.shape[1]))
            } else {
                Some(v.to_vec())
            }
        };
        crate::weights::fill_model(model, &mut src)
    }

    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// A copy whose tensors are `value(index, slot)` (e.g. the EMA weights).
    pub fn with_values<'a>(&'a self, value: impl Fn(usize, &'a Slot) -> &'a [f32]) -> Net {
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| Slot { value: value(i, s).to_vec(), grad: Vec::new(), ..s.clone() })
            .collect();
        Net { kind: self.kind, slots, blocks: self.blocks.clone(), head: self.head.clone(), classes: self.classes }
    }

    /// Replace every BatchNorm's running statistics by their average over `batches` (NHWC)
    /// run in training mode: the population statistics of these weights ("precise BN").
    pub fn recalibrate_bn(&mut self, batches: impl Iterator<Item = Act>) {
        for (k, x) in batches.enumerate() {
            // momentum 1 / (k + 1): a cumulative average over the batches
            let momentum = 1.0 / (k + 1) as f32;
            rayon::scope(|_| {
                let (f, _) = Self::trunk_forward(&self.blocks, &mut self.slots, x, momentum);
                if let Some((w, Some(bn))) = self.head.bottleneck {
                    let (n, hw, c) = (f.n, f.h * f.w, f.c);
                    let pooled = global_pool(&f.data, n, hw, c);
                    let dout = self.slots[w].shape[1];
                    let h1 = linear(&pooled, n, &self.slots[w].value, c, dout, None);
                    bn1d_forward(&mut self.slots, bn, &h1, n, dout, momentum);
                }
            });
        }
    }

    /// `[h, w, c]` of the trunk's output on an `h x w x c` input.
    pub fn out_shape(&self, h: usize, w: usize, c: usize) -> [usize; 3] {
        self.blocks.iter().fold([h, w, c], |[h, w, c], b| {
            let shapes: Vec<_> = b.branches.iter().map(|br| br.out_shape(h, w, c)).collect();
            let cat: usize = shapes.iter().map(|s| s.2).sum();
            [shapes[0].0, shapes[0].1, b.residual.as_ref().map_or(cat, |r| r.up.cout)]
        })
    }

    /// One training step on `x` (NHWC) against `labels`: forward in training mode (running
    /// statistics updated), label-smoothed cross entropy, backward; the gradients are left in
    /// the slots (zeroed first). `seed` draws the dropout masks.
    pub fn step(&mut self, x: Act, labels: &[usize], smoothing: f32, momentum: f32, seed: u64) -> StepOutput {
        for s in &mut self.slots {
            s.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        rayon::scope(|_| self.step_inner(x, labels, smoothing, momentum, seed))
    }

    /// The trunk in training mode: its output and each block's input and tape.
    fn trunk_forward(
        blocks: &[TBlock],
        slots: &mut [Slot],
        x: Act,
        momentum: f32,
    ) -> (Arc<Act>, Vec<(Arc<Act>, BlockTape)>) {
        let mut tapes = Vec::with_capacity(blocks.len());
        let mut cur = Arc::new(x);
        for b in blocks {
            let (out, t) = b.forward(slots, cur.clone(), momentum);
            tapes.push((cur, t));
            cur = out;
        }
        (cur, tapes)
    }

    /// The trunk's backward from the gradient of its output, freeing each block's tape as it
    /// goes; the input's gradient when `input_grad`.
    fn trunk_backward(
        blocks: &[TBlock],
        slots: &mut [Slot],
        mut tapes: Vec<(Arc<Act>, BlockTape)>,
        mut df: Act,
        input_grad: bool,
    ) -> Option<Act> {
        for (i, b) in blocks.iter().enumerate().rev() {
            let (x, t) = tapes.pop().expect("one tape per block");
            let mut dx = (i > 0 || input_grad).then(|| Act::zeros(x.n, x.h, x.w, x.c));
            drop(x);
            b.backward(slots, t, &df, dx.as_mut());
            match dx {
                Some(dx) => df = dx,
                None => return None,
            }
        }
        Some(df)
    }

    /// A net of one trunk part, `part` lowered from `module` (the part's own module, whose
    /// tensors get module-relative keys): for testing blocks on their own.
    pub fn block<M: Module>(module: &M, part: crate::models::Part) -> Self {
        let kind = ModelKind::InceptionV4;
        let mut slots = Vec::new();
        let mut ids = HashMap::new();
        module.visit(&mut Collect { kind, tracker: PathTracker::default(), slots: &mut slots, ids: &mut ids });
        let mut mk = |c: ConvSrc<'_>| TConv::from_src(c, &ids, &slots);
        let blocks = part_blocks(part, &mut mk);
        Self { kind, slots, blocks, head: THead { bottleneck: None, classifier: None, dropout: 0.0 }, classes: 0 }
    }

    /// The trunk alone in training mode on NHWC `x`, backward from `dout` (the gradient of the
    /// output, NHWC): the output and the input's gradient; parameter gradients in the slots.
    pub fn trunk_step(&mut self, x: Act, dout: &[f32], momentum: f32) -> (Act, Act) {
        for s in &mut self.slots {
            s.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        rayon::scope(|_| {
            let (y, tapes) = Self::trunk_forward(&self.blocks, &mut self.slots, x, momentum);
            let out = (*y).clone();
            let df = Act { data: dout.to_vec(), ..out.clone() };
            drop(y);
            let dx = Self::trunk_backward(&self.blocks, &mut self.slots, tapes, df, true).expect("input gradient");
            (out, dx)
        })
    }

    fn step_inner(&mut self, x: Act, labels: &[usize], smoothing: f32, momentum: f32, seed: u64) -> StepOutput {
        let (f, tapes) = Self::trunk_forward(&self.blocks, &mut self.slots, x, momentum);
        let slots = &mut self.slots;
        let (n, hw, c) = (f.n, f.h * f.w, f.c);
        let pooled = global_pool(&f.data, n, hw, c);
        // bottleneck
        let mut pre = pooled.clone();
        let mut bott_tape = None;
        if let Some((w, bn)) = self.head.bottleneck {
            let dout = slots[w].shape[1];
            let h1 = linear(&pooled, n, &slots[w].value, c, dout, None);
            let (y, t) = match bn {
                Some(bn) => bn1d_forward(slots, bn, &h1, n, dout, momentum),
                None => (h1.clone(), None),
            };
            pre = y;
            bott_tape = Some(t);
        }
        let d = pre.len() / n;
        // dropout
        let p = self.head.dropout;
        let mask: Option<Vec<f32>> = (p > 0.0).then(|| {
            let mut rng = SplitMix::new(seed);
            (0..n * d).map(|_| if rng.uniform() >= p as f64 { 1.0 / (1.0 - p) } else { 0.0 }).collect()
        });
        let dropped: Vec<f32> = match &mask {
            Some(m) => pre.iter().zip(m).map(|(a, b)| a * b).collect(),
            None => pre.clone(),
        };
        let (wc, bc) = self.head.classifier.expect("training needs a classifier");
        let classes = slots[bc].value.len();
        let logits = linear(&dropped, n, &slots[wc].value, d, classes, Some(&slots[bc].value.clone()));
        // label-smoothed cross entropy and its gradient
        let mut loss = 0.0f64;
        let mut dlogits = vec![0.0f32; n * classes];
        for (b, row) in logits.chunks(classes).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max as f64 + row.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln();
            for (j, v) in row.iter().enumerate() {
                let q = smoothing as f64 / classes as f64 + if j == labels[b] { 1.0 - smoothing as f64 } else { 0.0 };
                let logp = *v as f64 - lse;
                loss -= q * logp;
                dlogits[b * classes + j] = ((logp.exp() - q) / n as f64) as f32;
            }
        }
        loss /= n as f64;
        // head backward
        let mut dw = std::mem::take(&mut slots[wc].grad);
        let ddropped = linear_backward(&dropped, &dlogits, n, &slots[wc].value, &mut dw, d, classes);
        slots[wc].grad = dw;
        let db: Vec<f32> = (0..classes).map(|j| (0..n).map(|b| dlogits[b * classes + j]).sum()).collect();
        add(&mut slots[bc].grad, &db);
        let mut dpre = ddropped;
        if let Some(m) = &mask {
            dpre.iter_mut().zip(m).for_each(|(g, k)| *g *= k);
        }
        let dpooled = match (self.head.bottleneck, bott_tape) {
            (Some((w, bn)), Some(t)) => {
                let dout = slots[w].shape[1];
                let dh1 = match (bn, t) {
                    (Some(bn), Some(t)) => bn1d_backward(slots, bn, &t, &dpre, n, dout),
                    _ => dpre,
                };
                let mut dw = std::mem::take(&mut slots[w].grad);
                let dp = linear_backward(&pooled, &dh1, n, &slots[w].value, &mut dw, c, dout);
                slots[w].grad = dw;
                dp
            }
            _ => dpre,
        };
        let mut df = Act::zeros(f.n, f.h, f.w, f.c);
        df.data.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let b = r / hw;
            o.iter_mut().zip(&dpooled[b * c..(b + 1) * c]).for_each(|(g, v)| *g = v / hw as f32);
        });
        drop(f);
        Self::trunk_backward(&self.blocks, &mut self.slots, tapes, df, false);
        StepOutput { loss, logits }
    }
}

/// BatchNorm1d tape: normalised values and `1 / sqrt(var + eps)`.
struct Bn1dTape {
    xhat: Vec<f32>,
    invstd: Vec<f32>,
}

fn bn1d_forward(
    slots: &mut [Slot],
    bn: Bn,
    h: &[f32],
    n: usize,
    c: usize,
    momentum: f32,
) -> (Vec<f32>, Option<Bn1dTape>) {
    let mean: Vec<f64> = (0..c).map(|j| (0..n).map(|b| h[b * c + j] as f64).sum::<f64>() / n as f64).collect();
    let var: Vec<f64> =
        (0..c).map(|j| (0..n).map(|b| (h[b * c + j] as f64 - mean[j]).powi(2)).sum::<f64>() / n as f64).collect();
    let invstd: Vec<f32> = var.iter().map(|v| (1.0 / (v + BN_EPS).sqrt()) as f32).collect();
    let (g, beta) = (&slots[bn.gamma].value, &slots[bn.beta].value);
    let mut xhat = vec![0.0f32; n * c];
    let mut y = vec![0.0f32; n * c];
    for b in 0..n {
        for j in 0..c {
            let xh = (h[b * c + j] - mean[j] as f32) * invstd[j];
            xhat[b * c + j] = xh;
            y[b * c + j] = g[j] * xh + beta[j];
        }
    }
    update_running(slots, bn, &mean, &var, n, momentum);
    (y, Some(Bn1dTape { xhat, invstd }))
}

fn bn1d_backward(slots: &mut [Slot], bn: Bn, t: &Bn1dTape, dy: &[f32], n: usize, c: usize) -> Vec<f32> {
    let g = slots[bn.gamma].value.clone();
    let mut db = vec![0.0f64; c];
    let mut dg = vec![0.0f64; c];
    for j in 0..c {
        for b in 0..n {
            db[j] += dy[b * c + j] as f64;
            dg[j] += dy[b * c + j] as f64 * t.xhat[b * c + j] as f64;
        }
    }
    // in f64, as the 2-D case: with a batch of 2 the bracket is `eps / (var + eps)` of dy
    let mut dx = vec![0.0f32; n * c];
    for b in 0..n {
        for j in 0..c {
            let k = g[j] as f64 * t.invstd[j] as f64;
            let (mdb, mdg) = (db[j] / n as f64, dg[j] / n as f64);
            dx[b * c + j] = (k * (dy[b * c + j] as f64 - mdb - t.xhat[b * c + j] as f64 * mdg)) as f32;
        }
    }
    add(&mut slots[bn.gamma].grad, &dg.iter().map(|v| *v as f32).collect::<Vec<_>>());
    add(&mut slots[bn.beta].grad, &db.iter().map(|v| *v as f32).collect::<Vec<_>>());
    dx
}

/// Optimizer state on the flat tensors (indexed like `Net::slots`; empty for buffers).
#[derive(Clone, Debug, Default)]
pub struct OptState {
    pub ms: Vec<Vec<f32>>,
    pub mom: Vec<Vec<f32>>,
    pub ema: Vec<Vec<f32>>,
    pub ema_updates: u64,
}

impl OptState {
    /// From the burn path's state (flat tensors by key; absent keys start fresh: `ms` at 1,
    /// `mom` at 0, no EMA).
    pub fn from_keyed(
        slots: &[Slot],
        ms: &HashMap<String, Tensor<1>>,
        mom: &HashMap<String, Tensor<1>>,
        ema: &HashMap<String, Tensor<1>>,
        ema_updates: u64,
    ) -> Self {
        let vals = |t: &Tensor<1>| t.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let mut st = Self::new(slots);
        for (i, s) in slots.iter().enumerate() {
            if s.kind == SlotKind::Buffer {
                continue;
            }
            let n = s.value.len();
            if let Some(v) = ms.get(&s.key).map(vals).filter(|v| v.len() == n) {
                st.ms[i] = v;
            }
            if let Some(v) = mom.get(&s.key).map(vals).filter(|v| v.len() == n) {
                st.mom[i] = v;
            }
        }
        if !ema.is_empty() {
            st.ema = slots
                .iter()
                .map(|s| match s.kind {
                    SlotKind::Buffer => Vec::new(),
                    _ => ema
                        .get(&s.key)
                        .map(vals)
                        .filter(|v| v.len() == s.value.len())
                        .unwrap_or_else(|| s.value.clone()),
                })
                .collect();
        }
        st.ema_updates = ema_updates;
        st
    }

    pub fn new(slots: &[Slot]) -> Self {
        let trainable = |s: &Slot, v: f32| if s.kind == SlotKind::Buffer { Vec::new() } else { vec![v; s.value.len()] };
        Self {
            ms: slots.iter().map(|s| trainable(s, 1.0)).collect(),
            mom: slots.iter().map(|s| trainable(s, 0.0)).collect(),
            ema: Vec::new(),
            ema_updates: 0,
        }
    }
}

/// Global L2 norm of the gradients (f64, slot order).
pub fn grad_norm(slots: &[Slot]) -> f64 {
    slots.iter().map(|s| s.grad.iter().map(|g| (*g as f64) * (*g as f64)).sum::<f64>()).sum::<f64>().sqrt()
}

/// One optimizer step (`train::optim::step` on flat buffers): clip by global norm, L2 decay
/// of the weights, TF-RMSProp; frozen keys keep their values. Returns the norm before
/// clipping.
pub fn optimizer_step(
    slots: &mut [Slot],
    st: &mut OptState,
    cfg: &OptimConfig,
    lr: f64,
    frozen: &dyn Fn(&str) -> bool,
) -> f64 {
    let norm = grad_norm(slots);
    let clip = match cfg.clip_norm {
        Some(c) if norm > c => (c / norm) as f32,
        _ => 1.0,
    };
    let (rho, mu, eps, wd, lr) =
        (cfg.rho as f32, cfg.momentum as f32, cfg.epsilon as f32, cfg.weight_decay as f32, lr as f32);
    for (i, s) in slots.iter_mut().enumerate() {
        if s.kind == SlotKind::Buffer || frozen(&s.key) {
            continue;
        }
        let decay = if s.kind == SlotKind::Weight { wd } else { 0.0 };
        let (ms, mom) = (&mut st.ms[i], &mut st.mom[i]);
        s.value.par_iter_mut().zip(s.grad.par_iter()).zip(ms.par_iter_mut()).zip(mom.par_iter_mut()).for_each(
            |(((w, g), ms), mom)| {
                let g = g * clip + decay * *w;
                *ms = *ms * rho + g * g * (1.0 - rho);
                *mom = *mom * mu + g * lr / (*ms + eps).sqrt();
                *w -= *mom;
            },
        );
    }
    norm
}

/// The EMA after a step: decay `min(ema_decay, (1 + t) / (10 + t))`.
pub fn update_ema(slots: &[Slot], st: &mut OptState, cfg: &OptimConfig) {
    let t = st.ema_updates as f64;
    let decay = cfg.ema_decay.min((1.0 + t) / (10.0 + t)) as f32;
    if st.ema.is_empty() {
        st.ema = slots.iter().map(|s| if s.kind == SlotKind::Buffer { Vec::new() } else { s.value.clone() }).collect();
    } else {
        for (e, s) in st.ema.iter_mut().zip(slots) {
            e.par_iter_mut().zip(s.value.par_iter()).for_each(|(a, w)| *a = *a * decay + w * (1.0 - decay));
        }
    }
    st.ema_updates += 1;
}

struct GradCollect<'a> {
    kind: ModelKind,
    tracker: PathTracker,
    grads: &'a burn::optim::GradientsParams,
    out: HashMap<String, Vec<f32>>,
}

impl ModuleVisitor for GradCollect<'_> {
    track_paths!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let v = g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            self.out.insert(self.tracker.leaf(self.kind), v);
        }
    }
}

/// The burn path's loss and gradients (burn's layout, by checkpoint key) of one training step
/// of `model` (on an autodiff device) on NCHW `x`: the reference the tests hold this engine to.
pub fn burn_gradients(
    model: &Model,
    x: &[f32],
    shape: [usize; 4],
    labels: &[usize],
    smoothing: f32,
) -> (f64, HashMap<String, Vec<f32>>) {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::tensor::{Int, TensorData};
    let device = model.devices().into_iter().next().unwrap_or_else(|| burn::tensor::Device::flex().autodiff());
    let xt = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &device);
    let l: Vec<i64> = labels.iter().map(|&v| v as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(l, [labels.len()]), &device);
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing((smoothing > 0.0).then_some(smoothing)).init(&device);
    let loss = loss_fn.forward(model.forward(xt), y);
    let lv = loss.clone().into_scalar::<f32>() as f64;
    let grads = burn::optim::GradientsParams::from_grads(loss.backward(), model);
    let mut v = GradCollect { kind: model.kind(), tracker: PathTracker::default(), grads: &grads, out: HashMap::new() };
    model.visit(&mut v);
    (lv, v.out)
}
