//! GEMMs of the frozen engine, `C = act(load·C + alpha·(A·B·scale + bias))` with `C` f32, the
//! weights `B` packed once at load time, and two element types: f32 (`gemm`) and
//! uint8 activations x int8 weights with i32 accumulation (`qgemm`, the int8 engine; `qgemm_u8`
//! stores its result as the next convolution's u8 input instead, quantized in the VNNI
//! kernel's store or, elsewhere, as each tile leaves the kernel).
//!
//! `B` (`[k, n]`, the convolution weights) is stored as panels of `NR` = 16 columns. A k-step
//! of a panel is one 64-byte line: 16 floats (f32), or 16 columns x 4 consecutive k of int8
//! (the operand of `vpdpbusd` / `vpmaddubsw`). Panels are cut into k-blocks of `KC` steps
//! (kept in L1 while a task's rows run over them). `A` (activations) is not packed: the
//! micro-kernel reads its 6 rows through pointers, one set per run of contiguous columns
//! ("indirect" convolution: for a k x k convolution a run is one tap's input channels of six
//! output pixels, or zeros for padding), so im2col never exists. Taps of fewer than 16 k-steps
//! (the RGB stem; for u8 the 32- and 48-channel convolutions) are gathered into a row-major
//! scratch tile first, except in strips whose kernel rows lie inside a dense input, which read
//! each kernel row (its taps are contiguous there) as one run. Scale,
//! bias, the residual scale-add and ReLU are applied as the accumulators are stored.
//!
//! Micro-kernels implement [`Kernel`], one file per instruction set, chosen at run time
//! ([`Isa::detect`]): `avx512` (f32 6 x 64, and int8 6 x 64 with AVX512-VNNI), `avx2` (f32 6 x
//! 16 with FMA, int8 6 x 16 with `vpmaddubsw`) and `portable`; all compute the same tile and
//! are tested against each other where the CPU has them.

use rayon::prelude::*;
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

/// Rows of a micro-kernel tile (a strip).
pub const MR: usize = 6;
const NR: usize = 16;
/// k-steps per block: a panel's slice is `KC` lines (16 KiB), kept in L1 while a task's strips
/// run over it; the AVX-512 kernels read four panels at once, so they take half (and every
/// int8 kernel the same, so that int8 results do not depend on the CPU).
const KC: usize = 256;
const KC_WIDE: usize = 512;
const MC: usize = 72;
/// Up to this many column panels per task, loop strips outside panels.
const FEW_PANELS: usize = 4;

/// 64-byte lines (a k-step of a `B` panel is one cache line; unaligned ones straddle two).
#[derive(Clone, Debug, Default)]
struct Aligned(Vec<Line>);

#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Aligned {
    fn zeros(lines: usize) -> Self {
        Self(vec![Line::default(); lines])
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: Line is 64 plain bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 64) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; every byte pattern is a valid f32.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 64) }
    }
    fn floats(&self) -> &[f32] {
        // SAFETY: Line is 16 f32 with no padding (size 64 = 16 * 4).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 16) }
    }
    fn floats_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
    }
}

/// Panels of 64-byte k-steps, stored k-block by k-block: block `[s0, s0 + kc)` holds every
/// panel's `kc`-line slice in turn, so a task sweeping the panels of one k-block reads one
/// contiguous stream.
#[derive(Clone, Debug)]
struct Panels {
    /// k-steps (f32: k; int8: k / 4).
    steps: usize,
    n: usize,
    /// Steps per k-block (the last block may be shorter).
    kc: usize,
    data: Aligned,
}

impl Panels {
    fn zeros(steps: usize, n: usize, kc_target: usize) -> Self {
        let kc = steps.div_ceil(steps.div_ceil(kc_target).max(1)).max(1);
        Self { steps, n, kc, data: Aligned::zeros(n.div_ceil(NR) * steps) }
    }

    /// Every (step, panel): `f(step, first column, columns, line index)`.
    fn layout(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let panels = self.n.div_ceil(NR);
        for s0 in (0..self.steps).step_by(self.kc) {
            let kcb = self.kc.min(self.steps - s0);
            for p in 0..panels {
                let (c0, cols) = (p * NR, NR.min(self.n - p * NR));
                for kk in 0..kcb {
                    f(s0 + kk, c0, cols, s0 * panels + p * kcb + kk);
                }
            }
        }
    }

    /// Line index of panel `p`'s slice of the k-block starting at step `s0` (`kcb` steps).
    fn slice(&self, s0: usize, kcb: usize, p: usize) -> usize {
        s0 * self.n.div_ceil(NR) + p * kcb
    }
}

/// f32 `B` (`[k, n]` row-major) packed into 16-column panels (the last one zero-padded).
#[derive(Clone, Debug)]
pub struct PackedB(Panels);

impl PackedB {
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight matrix is not k x n");
        Self::from_rows(k, n, |r, out| out.copy_from_slice(&w[r * n..(r + 1) * n]))
    }

    /// `[k, n]` from its rows: `fill(r, out)` writes row `r`'s `n` values (k-blocks packed in
    /// parallel; rows of a block in order).
    pub fn from_rows(k: usize, n: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let mut p = Panels::zeros(k, n, Isa::detect().f32_kc());
        let panels = n.div_ceil(NR);
        let (kc, steps) = (p.kc, p.steps);
        p.data.floats_mut().par_chunks_mut(kc * panels * NR).enumerate().for_each(|(b, block)| {
            let s0 = b * kc;
            let kcb = kc.min(steps - s0);
            let mut row = vec![0.0f32; n];
            for kk in 0..kcb {
                fill(s0 + kk, &mut row);
                for q in 0..panels {
                    let (c0, cols) = (q * NR, NR.min(n - q * NR));
                    block[(q * kcb + kk) * NR..][..cols].copy_from_slice(&row[c0..c0 + cols]);
                }
            }
        });
        Self(p)
    }

    /// Back to `[k, n]` row-major (used at load time to merge convolutions).
    pub fn unpack(&self) -> Vec<f32> {
        let (n, mut w, packed) = (self.0.n, vec![0.0f32; self.0.steps * self.0.n], self.0.data.floats());
        self.0.layout(|r, c0, cols, line| w[r * n + c0..][..cols].copy_from_slice(&packed[line * 16..][..cols]));
        w
    }

    pub fn k(&self) -> usize {
        self.0.steps
    }

    pub fn n(&self) -> usize {
        self.0.n
    }
}

/// int8 `B` (`[k, n]` row-major, `k` a multiple of 4) packed for the u8 x i8 kernels: a line
/// holds 16 columns x 4 consecutive k. For the AVX2 kernel, which sums products in 16 bits
/// (see [`narrow`]), each column's weights are divided at packing by the smallest factor that
/// keeps those sums from overflowing, and its scale multiplied by it, so every kernel computes
/// exact integer sums of the weights it holds.
#[derive(Clone, Debug)]
pub struct PackedQ {
    p: Panels,
    /// Per-column scale of the packed integers (the given scales, x2 where halved).
    scale: Vec<f32>,
    sums: Vec<i32>,
    isa: QIsa,
    /// The AVX2 kernel pairs k-quads ([`narrow`]).
    pairs: bool,
}

impl PackedQ {
    /// `w` `[k, n]` int8 with per-column scales `scale` (`w_real = w * scale`), for the
    /// detected int8 kernel.
    pub fn new(w: &[i8], k: usize, n: usize, scale: &[f32]) -> Self {
        Self::new_for(QIsa::detect(), w, k, n, scale)
    }

    fn new_for(isa: QIsa, w: &[i8], k: usize, n: usize, scale: &[f32]) -> Self {
        assert!(w.len() == k * n && k.is_multiple_of(4) && scale.len() == n, "bad int8 weight matrix");
        let (w, div, pairs) = narrow(isa, w, k, n);
        let mut p = Panels::zeros(k / 4, n, KC_WIDE);
        let mut data = std::mem::take(&mut p.data);
        let bytes = data.bytes_mut();
        let mut sums = vec![0i32; n];
        p.layout(|s, c0, cols, line| {
            for j in 0..cols {
                for t in 0..4 {
                    let v = w[(4 * s + t) * n + c0 + j];
                    bytes[line * 64 + 4 * j + t] = v as u8;
                    sums[c0 + j] += v as i32;
                }
            }
        });
        p.data = data;
        let scale = scale.iter().zip(&div).map(|(s, d)| s * d).collect();
        Self { p, scale, sums, isa, pairs }
    }

    /// Per-column scale of the integers as packed.
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Per-column sums of the integers as packed (for an input zero point: `sum (q - z) w =
    /// sum q w - z sum w`).
    pub fn col_sums(&self) -> &[i32] {
        &self.sums
    }

    pub fn k(&self) -> usize {
        self.p.steps * 4
    }

    pub fn n(&self) -> usize {
        self.p.n
    }
}

/// The weights `[k, n]` as `isa`'s kernel holds them, each column's divisor (the weights held
/// are `round(w / d)`, half to even), and whether the AVX2 kernel may pair k-quads.
///
/// The AVX2 kernel's 16-bit lanes hold `x0 w0 + x1 w1` (`vpmaddubsw`, saturating): with u8
/// inputs exact while `|w0| + |w1| <= 128` (`255 * 128 < 2^15`). Paired, two such lanes are
/// added in 16 bits before widening, so four weights share a lane: exact while their `sum |w|
/// <= 128`, for taps `(t, t+1)` of step `s` with `(t, t+1)` of step `s + 1` (`t` = 0 or 2),
/// for every `s`, whichever steps the kernel pairs. Each column takes the smallest divisor
/// (>= 1) that its worst group needs. Pairing saves a quarter of the multiplies but needs
/// ~2.5-3.5 on trained weights; the layer pairs only where no column needs more than 2, the
/// divisor of 7-bit weights, so int8 never holds fewer bits than that (logits of the demo
/// were 3-10% off with pairing everywhere, 1-2% with 8-bit weights). The other kernels take
/// the weights as they are.
fn narrow(isa: QIsa, w: &[i8], k: usize, n: usize) -> (Vec<i8>, Vec<f32>, bool) {
    if isa != QIsa::Avx2 {
        return (w.to_vec(), vec![1.0; n], false);
    }
    let steps = k / 4;
    let held =
        |c: usize, d: f32| -> Vec<i32> { (0..k).map(|i| (w[i * n + c] as f32 / d).round_ties_even() as i32).collect() };
    let pair = |col: &[i32], s: usize, t: usize| col[4 * s + t].abs() + col[4 * s + t + 1].abs();
    let worst_pair = |col: &[i32]| (0..steps).flat_map(|s| [0, 2].map(|t| pair(col, s, t))).max().unwrap_or(0);
    let worst_group = |col: &[i32]| {
        (0..steps)
            .flat_map(|s| [0, 2].map(|t| pair(col, s, t) + if s + 1 < steps { pair(col, s + 1, t) } else { 0 }))
            .max()
            .unwrap_or(0)
    };
    // the smallest divisor whose held weights keep `worst` within 128
    let divisor = |c: usize, worst: &dyn Fn(&[i32]) -> i32| {
        let mut d = (worst(&held(c, 1.0)) as f32 / 128.0).max(1.0);
        let mut col = held(c, d);
        while worst(&col) > 128 {
            d *= 1.01;
            col = held(c, d);
        }
        (d, col)
    };
    let paired: Vec<(f32, Vec<i32>)> = (0..n).map(|c| divisor(c, &worst_group)).collect();
    let pairs = paired.iter().all(|(d, _)| *d <= 2.0);
    let cols = if pairs { paired } else { (0..n).map(|c| divisor(c, &worst_pair)).collect() };
    let mut out = vec![0i8; k * n];
    for (c, (_, col)) in cols.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + c] = *v as i8;
        }
    }
    (out, cols.iter().map(|(d, _)| *d).collect(), pairs)
}

/// The instruction set a GEMM's micro-kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Isa {
    /// The best kernel this CPU runs; `INCEPTION_ISA=portable|avx2|avx512` picks a lower one
    /// (for A/B measurements; a set that the CPU lacks is ignored).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = *Isa::available().last().unwrap_or(&Isa::Portable);
            let asked = std::env::var("INCEPTION_ISA").ok().and_then(|v| match v.as_str() {
                "portable" => Some(Isa::Portable),
                "avx2" => Some(Isa::Avx2),
                "avx512" => Some(Isa::Avx512),
                _ => None,
            });
            asked.filter(|a| *a <= best).unwrap_or(best)
        })
    }

    /// Every kernel this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    fn f32_kc(self) -> usize {
        if self == Isa::Avx512 { KC_WIDE } else { KC }
    }
}

/// The int8 kernel: AMX (`tdpbusd` on 16 x 16 tiles), AVX512-VNNI (`vpdpbusd`), AVX2
/// (`vpmaddubsw`, weights narrowed by [`narrow`]) or portable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QIsa {
    Portable,
    Avx2,
    Avx512Vnni,
    Amx,
}

impl QIsa {
    /// The best int8 kernel of this CPU within [`Isa::detect`]'s choice (`INCEPTION_ISA=avx512`
    /// stops at VNNI, below AMX).
    pub fn detect() -> QIsa {
        static ISA: std::sync::OnceLock<QIsa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let avail = QIsa::available();
            let asked = std::env::var("INCEPTION_ISA").ok();
            let best = match Isa::detect() {
                Isa::Portable => QIsa::Portable,
                Isa::Avx2 => QIsa::Avx2,
                Isa::Avx512 if asked.as_deref() == Some("avx512") => QIsa::Avx512Vnni,
                Isa::Avx512 => QIsa::Amx,
            };
            *avail.iter().rev().find(|q| **q <= best).unwrap_or(&QIsa::Portable)
        })
    }

    /// Every int8 kernel this CPU can run, portable first.
    pub fn available() -> Vec<QIsa> {
        let mut v = vec![QIsa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(QIsa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                v.push(QIsa::Avx512Vnni);
            }
            if amx::available() {
                v.push(QIsa::Amx);
            }
        }
        v
    }
}

/// An element of `A`: f32, or u8 (quantized activations, read 4 at a time).
pub trait Elem: Copy + Default + Send + Sync + 'static {
    /// Elements per k-step.
    const STEP: usize;
    /// At least `KC` steps of zeros (the padding taps).
    fn zeros() -> &'static [Self];
    /// This type's gathered-rows buffer in the thread's scratch.
    fn rows(s: &mut Scratch) -> &mut Vec<Self>;
}

static ZEROS_F32: [f32; 512] = [0.0; 512];
static ZEROS_U8: [u8; 4 * 512] = [0; 4 * 512];

impl Elem for f32 {
    const STEP: usize = 1;
    fn zeros() -> &'static [f32] {
        &ZEROS_F32
    }
    fn rows(s: &mut Scratch) -> &mut Vec<f32> {
        &mut s.rows
    }
}

impl Elem for u8 {
    const STEP: usize = 4;
    fn zeros() -> &'static [u8] {
        &ZEROS_U8
    }
    fn rows(s: &mut Scratch) -> &mut Vec<u8> {
        &mut s.rows_u8
    }
}

/// Where the rows of `A` come from (columns and channels in elements; for u8 every run must
/// be whole k-steps: `cin`, `c0` and `ld` multiples of 4).
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a, T = f32> {
    /// Row `r` is `data[r * ld .. r * ld + k]`.
    Dense { data: &'a [T], ld: usize },
    /// Implicit im2col of an NHWC input (`n, h, w`, channel `c0 + ci` at row stride `ld`) for a
    /// `kh x kw` convolution with `stride` and top/left `pad`: row `r` is output pixel `r` of an
    /// `oh x ow` map, column `(ky * kw + kx) * cin + ci`.
    Conv {
        data: &'a [T],
        ld: usize,
        c0: usize,
        cin: usize,
        hw: [usize; 2],
        k: [usize; 2],
        stride: usize,
        pad: [usize; 2],
        out: [usize; 2],
    },
}

/// Six row pointers (of the kernel's element type), each valid for `run` k-steps: columns
/// `[k, k + run)` of a 6-row strip; all null where every row is zero there (padding), which
/// the kernels skip.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    p: [*const u8; MR],
    run: usize,
}

/// A convolution row's image and the input position of its tap (0, 0).
type Origin = (usize, isize, isize);

impl<'a, T: Elem> Rows<'a, T> {
    /// Columns `[k, k + run)` of row `r` (`run` stops at the end of a convolution tap).
    fn segment(&self, r: usize, k: usize, max_run: usize) -> (&'a [T], usize) {
        match *self {
            Rows::Dense { data, ld } => (&data[r * ld + k..r * ld + k + max_run], max_run),
            Rows::Conv { .. } => {
                let (tap, run) = self.tap(k, max_run);
                (self.at(self.origin(r), tap, run), run)
            }
        }
    }

    /// The origins of the strip's rows `ra..ra + MR` (rows at or past `r1` repeat row `ra`).
    fn strip_origins(&self, ra: usize, r1: usize) -> [Origin; MR] {
        std::array::from_fn(|i| self.origin(if ra + i < r1 { ra + i } else { ra }))
    }

    /// Convolution row `r`'s origin.
    fn origin(&self, r: usize) -> Origin {
        let Rows::Conv { stride, pad, out: [oh, ow], .. } = *self else { unreachable!("origin of a dense row") };
        let (oy, ox) = ((r / ow) % oh, r % ow);
        (r / (oh * ow), (oy * stride) as isize - pad[0] as isize, (ox * stride) as isize - pad[1] as isize)
    }

    /// Column `k` of a convolution row as `(ky, kx, ci, run)`: its tap, its first channel, and
    /// how many columns (at most `max_run`) stay within that tap.
    fn tap(&self, k: usize, max_run: usize) -> ([usize; 3], usize) {
        let Rows::Conv { cin, k: [_, kw], .. } = *self else { unreachable!("tap of a dense row") };
        let (tap, ci) = (k / cin, k % cin);
        ([tap / kw, tap % kw, ci], (cin - ci).min(max_run))
    }

    /// `run` input values of a tap for the row at `origin` (zeros where the tap is padding).
    fn at(&self, (b, y0, x0): Origin, [ky, kx, ci]: [usize; 3], run: usize) -> &'a [T] {
        let Rows::Conv { data, ld, c0, hw: [h, w], .. } = *self else { unreachable!("tap of a dense row") };
        let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
            &T::zeros()[..run]
        } else {
            let src = ((b * h + iy as usize) * w + ix as usize) * ld + c0 + ci;
            &data[src..src + run]
        }
    }

    /// Segments covering columns `[k0, k0 + kc)` of the strip starting at row `ra` (rows at or
    /// past `r1` repeat row `ra`; their results are never stored).
    fn segments(&self, ra: usize, r1: usize, k0: usize, kc: usize, out: &mut Vec<Seg>) {
        let row = |i: usize| if ra + i < r1 { ra + i } else { ra };
        match *self {
            Rows::Dense { data, ld } => {
                let p = std::array::from_fn(|i| data[row(i) * ld + k0..row(i) * ld + k0 + kc].as_ptr().cast());
                out.push(Seg { p, run: kc / T::STEP });
            }
            Rows::Conv { .. } => {
                let origins = self.strip_origins(ra, r1);
                let zeros = T::zeros().as_ptr().cast::<u8>();
                let mut kk = 0;
                while kk < kc {
                    let (tap, run) = self.tap(k0 + kk, kc - kk);
                    let p = origins.map(|o| self.at(o, tap, run).as_ptr().cast::<u8>());
                    // a tap that is padding for all six rows adds nothing: the kernel skips it
                    let p = if p.iter().all(|&q| q == zeros) { [std::ptr::null(); MR] } else { p };
                    out.push(Seg { p, run: run / T::STEP });
                    kk += run;
                }
            }
        }
    }

    /// The origins of the strip at row `ra` where it can read whole kernel rows in place
    /// (`segments_wide`): dense input channels, a kernel row of at least 16 k-steps, and every
    /// row's taps inside the input horizontally (a kernel row above or below it reads zeros).
    fn wide(&self, ra: usize, r1: usize) -> Option<[Origin; MR]> {
        let Rows::Conv { ld, c0: 0, cin, hw: [_, w], k: [_, kw], .. } = *self else { return None };
        let run = kw * cin;
        if ld != cin || run < 16 * T::STEP || run > T::zeros().len() {
            return None;
        }
        let origins = self.strip_origins(ra, r1);
        origins.iter().all(|&(_, _, x0)| x0 >= 0 && x0 as usize + kw <= w).then_some(origins)
    }

    /// `segments` of a `wide` strip (its rows' `origins`): one run per kernel row (its `kw`
    /// taps are contiguous in the input row) instead of one per tap, so short taps need no
    /// gathering.
    fn segments_wide(&self, origins: &[Origin; MR], k0: usize, kc: usize, out: &mut Vec<Seg>) {
        let Rows::Conv { data, cin, hw: [h, w], k: [_, kw], .. } = *self else {
            unreachable!("wide rows are a convolution's")
        };
        let zeros = T::zeros().as_ptr().cast::<u8>();
        let krow = kw * cin;
        let mut kk = 0;
        while kk < kc {
            let (ky, j) = ((k0 + kk) / krow, (k0 + kk) % krow);
            let run = (krow - j).min(kc - kk);
            let mut p = [zeros; MR];
            for (q, &(b, y0, x0)) in p.iter_mut().zip(origins) {
                let iy = y0 + ky as isize;
                if iy >= 0 && iy < h as isize {
                    *q = data[((b * h + iy as usize) * w + x0 as usize) * cin + j..][..run].as_ptr().cast::<u8>();
                }
            }
            let p = if p.iter().all(|&q| q == zeros) { [std::ptr::null(); MR] } else { p };
            out.push(Seg { p, run: run / T::STEP });
            kk += run;
        }
    }

    /// Rows `[r0, r1)`, columns `[k0, k0 + kc)` copied row-major into `out` (row stride `ldo`
    /// >= `kc`; the columns past `kc` are left as they are).
    fn gather(&self, r0: usize, r1: usize, k0: usize, kc: usize, out: &mut [T], ldo: usize) {
        if let Rows::Conv { data, ld, c0: 0, cin, hw: [h, w], k: [_, kw], .. } = *self
            && ld == cin
        {
            // the input's channels are dense, so the taps `kx..kw` of one kernel row are one
            // contiguous run of the input row: copy runs, not taps
            for (r, row) in (r0..r1).zip(out.chunks_mut(ldo)) {
                let (b, y0, x0) = self.origin(r);
                let mut kk = 0;
                while kk < kc {
                    let k = k0 + kk;
                    let (ky, kx, ci) = (k / cin / kw, (k / cin) % kw, k % cin);
                    let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
                    let run = if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                        let run = (cin - ci).min(kc - kk); // one padded tap
                        row[kk..kk + run].fill(T::default());
                        run
                    } else {
                        // taps up to the kernel row's end or the input's right edge
                        let taps = (kw - kx).min(w - ix as usize);
                        let run = (taps * cin - ci).min(kc - kk);
                        let src = ((b * h + iy as usize) * w + ix as usize) * cin + ci;
                        row[kk..kk + run].copy_from_slice(&data[src..src + run]);
                        run
                    };
                    kk += run;
                }
            }
            return;
        }
        for (r, row) in (r0..r1).zip(out.chunks_mut(ldo)) {
            let mut kk = 0;
            while kk < kc {
                let (src, run) = self.segment(r, k0 + kk, kc - kk);
                row[kk..kk + run].copy_from_slice(src);
                kk += run;
            }
        }
    }

    /// Inputs whose taps are too short to stream directly (fewer than 16 k-steps: the RGB
    /// stem, and for u8 the 32- and 48-channel 3x3 convolutions), as the kernel restarts its
    /// loop for every segment.
    fn needs_gather(&self) -> bool {
        matches!(self, Rows::Conv { cin, .. } if *cin < 16 * T::STEP)
    }

    /// Panics unless `m` rows of `k` columns are inside the data.
    fn check(&self, m: usize, k: usize) {
        match *self {
            Rows::Dense { data, ld } => assert!(k <= ld && data.len() >= (m - 1) * ld + k, "A too small"),
            Rows::Conv { data, ld, c0, cin, hw: [h, w], k: [kh, kw], out: [oh, ow], .. } => {
                assert!(k == kh * kw * cin && c0 + cin <= ld && m.is_multiple_of(oh * ow), "bad convolution geometry");
                assert!(data.len() >= (m / (oh * ow)) * h * w * ld, "input too small");
                assert!([cin, c0, ld].iter().all(|v| v.is_multiple_of(T::STEP)), "runs of partial k-steps");
            }
        }
    }
}

/// What happens to `C`: `C = act(load·C + alpha·(A·B + bias))`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub alpha: f32,
    pub load: bool,
    pub relu: bool,
}

/// One tile's epilogue: `C = act(load·C + alpha·(acc·scale + bias))` (`scale`: int8 only), with
/// `bias` and `scale` sliced to the tile's columns; with `u8` (kernels with
/// [`Kernel::STORES_U8`] only), the result goes to u8 instead of C.
#[derive(Clone, Copy, Debug)]
pub struct TileEpi<'a> {
    pub bias: Option<&'a [f32]>,
    pub scale: Option<&'a [f32]>,
    pub alpha: f32,
    pub load: bool,
    pub relu: bool,
    pub u8: Option<TileU8>,
    /// Lines of B to prefetch into L2 while this tile computes (about one per k-step): a
    /// share of the weight slice the task reads next, which otherwise arrives cold.
    pub ahead: Ahead,
}

/// `lines` 64-byte lines from `p` (a hint: never dereferenced by the kernel).
#[derive(Clone, Copy, Debug)]
pub struct Ahead {
    pub p: *const u8,
    pub lines: usize,
}

impl Ahead {
    pub const NONE: Ahead = Ahead { p: std::ptr::null(), lines: 0 };
}

/// A tile's u8 destination: per 16-column panel `q` of the tile, row 0 at `dst[q]`, rows
/// `ld[q]` apart; the grids of the tile's columns at `inv` and `zero`. With `keep`, the f32
/// values are stored to C as well.
#[derive(Clone, Copy, Debug)]
pub struct TileU8 {
    pub dst: [*mut u8; 4],
    pub ld: [usize; 4],
    pub inv: *const f32,
    pub zero: *const f32,
    pub keep: bool,
}

/// A micro-kernel: one `rows x cols` (<= 6 x 16·PANELS) tile of C.
pub trait Kernel: Copy + Send + Sync {
    type A: Elem;
    /// 16-column panels one call covers.
    const PANELS: usize;
    /// Whether the kernel stores u8 itself ([`TileEpi::u8`]).
    const STORES_U8: bool = false;

    /// # Safety
    /// The CPU has the kernel's instruction set; every segment's pointers are valid for `run`
    /// k-steps and the runs add up to the k-block's steps; panel `q` of B starts at line
    /// `b + q * bstride` and holds one line per step; `c` points at a `rows x cols` region
    /// with row stride `ldc` that nobody else touches; `e.bias` / `e.scale` hold `cols` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        self,
        segs: &[Seg],
        b: *const u8,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        e: &TileEpi<'_>,
    );
}

/// `C = act(load·C + alpha·acc)` for a `rows x cols` tile from the kernel's accumulators
/// (`acc`, row stride 16·panels, scale and bias already applied).
///
/// # Safety
/// `c` points at a `rows x cols` region with row stride `ldc`.
unsafe fn store_tile(acc: &[f32], lda: usize, c: *mut f32, ldc: usize, rows: usize, cols: usize, e: &TileEpi<'_>) {
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: (i, j) is inside the caller's region.
            unsafe {
                let dst = c.add(i * ldc + j);
                let mut v = e.alpha * acc[i * lda + j];
                if e.load {
                    v += *dst;
                }
                *dst = if e.relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// A raw pointer to the output, shared by tasks that write disjoint tiles.
struct Out<T>(*mut T);
// SAFETY: every task writes a disjoint set of (row, column) cells.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}

impl<T> Out<T> {
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Where an int8 GEMM's results go as u8, on the grid of the convolutions that read them
/// (see [`qgemm_u8`]): column `j` of row `r`, in the part whose first column is the last at or
/// below `j`, to `dst[base + r * ld + j - col]`, quantized on `(inv[j], zero[j])`. One part
/// is a channel slice of an NHWC map; one per group of columns lays each group out as its own
/// dense map (the merged 1x1's slots, each then read as a dense input).
pub struct U8Out<'a> {
    pub dst: &'a mut [u8],
    pub parts: &'a [U8Part],
    pub inv: &'a [f32],
    pub zero: &'a [f32],
}

/// A part of a [`U8Out`]: its first column, row stride and where its row 0 starts.
#[derive(Clone, Copy, Debug)]
pub struct U8Part {
    pub col: usize,
    pub ld: usize,
    pub base: usize,
}

/// [`quantize_u8`] of a `rows x cols` f32 tile (row stride `lds`) into u8 (row stride `ldd`) on
/// per-column grids, row by row (the tiles the kernel did not store as u8 itself).
///
/// # Safety
/// Every pointer valid for the tile (`cols` grid values).
#[allow(clippy::too_many_arguments)]
unsafe fn quantize_tile(
    src: *const f32,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: *mut u8,
    ldd: usize,
    inv: *const f32,
    zero: *const f32,
) {
    // SAFETY: the caller's pointers are valid for the tile and its columns' grids.
    unsafe {
        let g = Grid::Cols(std::slice::from_raw_parts(inv, cols), std::slice::from_raw_parts(zero, cols));
        for i in 0..rows {
            let v = std::slice::from_raw_parts(src.add(i * lds), cols);
            quantize_u8(v, std::slice::from_raw_parts_mut(dst.add(i * ldd), cols), g);
        }
    }
}

/// [`U8Out`] as the tasks share it.
#[derive(Clone, Copy)]
struct Sink<'a> {
    dst: Out<u8>,
    parts: &'a [U8Part],
    inv: &'a [f32],
    zero: &'a [f32],
    /// C is an output too ([`qgemm_dual`]): the kernel stores f32 there as well as the u8
    /// (or the u8 are quantized from C after it).
    keep: bool,
}

impl Sink<'_> {
    /// The u8 destination of the tile at rows `r0..`, columns `j0..j0 + cols`, for a kernel that
    /// stores it: where each of its 16-column panels lies inside one part.
    fn tile(&self, r0: usize, j0: usize, cols: usize) -> Option<TileU8> {
        let mut t = TileU8 {
            dst: [std::ptr::null_mut(); 4],
            ld: [0; 4],
            inv: self.inv[j0..].as_ptr(),
            zero: self.zero[j0..].as_ptr(),
            keep: self.keep,
        };
        // the part holding each panel's first column, walked forward from the tile's
        let mut i = if self.parts.len() == 1 { 0 } else { self.parts.partition_point(|p| p.col <= j0) - 1 };
        for q in 0..cols.div_ceil(NR) {
            let (a, b) = (j0 + q * NR, (j0 + cols).min(j0 + q * NR + NR));
            while self.parts.get(i + 1).is_some_and(|next| next.col <= a) {
                i += 1;
            }
            if self.parts.get(i + 1).is_some_and(|next| next.col < b) {
                return None;
            }
            let p = self.parts[i];
            (t.dst[q], t.ld[q]) = (self.dst.at(p.base + r0 * p.ld + a - p.col), p.ld);
        }
        Some(t)
    }

    /// Quantize the f32 tile at `t` (row stride `ldt`), rows `r0..r0 + rows` and columns `j0..j0
    /// + cols` of the GEMM, into the parts.
    ///
    /// # Safety
    /// `t` holds the tile; the cells are inside the output (checked by `qgemm_u8`) and the
    /// caller's alone.
    unsafe fn store(&self, t: *const f32, ldt: usize, r0: usize, rows: usize, j0: usize, cols: usize) {
        for (i, p) in self.parts.iter().enumerate() {
            let end = self.parts.get(i + 1).map_or(usize::MAX, |q| q.col);
            let (a, b) = (j0.max(p.col), (j0 + cols).min(end));
            if a < b {
                // SAFETY: as the caller promises; `a..b` lies inside the tile and the part.
                unsafe {
                    let d = self.dst.at(p.base + r0 * p.ld + a - p.col);
                    quantize_tile(
                        t.add(a - j0),
                        ldt,
                        rows,
                        b - a,
                        d,
                        p.ld,
                        self.inv.as_ptr().add(a),
                        self.zero.as_ptr().add(a),
                    );
                }
            }
        }
    }
}

/// Per-thread scratch: segments of the current tile, and the gathered rows of narrow inputs.
#[derive(Default)]
pub struct Scratch {
    segs: Vec<Seg>,
    /// Start of each strip's segments in `segs`.
    starts: Vec<usize>,
    rows: Vec<f32>,
    rows_u8: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every GEMM it calls on the calling thread only (for callers that are already
/// one of many parallel tasks, like the Winograd tile chunks).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let was = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(was));
    r
}

/// `C[r, c0 + j]` (row stride `ldc`) for `r < m`, `j < b.n()`.
pub fn gemm(m: usize, a: Rows<'_>, b: &PackedB, c: &mut [f32], ldc: usize, c0: usize, epi: Epilogue<'_>) {
    gemm_on(Isa::detect(), m, a, b, c, ldc, c0, epi, None)
}

/// [`gemm`] followed on this thread by a GEMM with `next`'s weights: its first weight slice is
/// prefetched during this one's last (one-task GEMMs: a Winograd chunk's products).
#[allow(clippy::too_many_arguments)]
pub fn gemm_before(
    m: usize,
    a: Rows<'_>,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    c0: usize,
    epi: Epilogue<'_>,
    next: &PackedB,
) {
    gemm_on(Isa::detect(), m, a, b, c, ldc, c0, epi, Some(&next.0))
}

/// [`gemm`] with the kernel chosen by the caller (one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    isa: Isa,
    m: usize,
    a: Rows<'_>,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    c0: usize,
    epi: Epilogue<'_>,
    next: Option<&Panels>,
) {
    match isa {
        Isa::Portable => drive(portable::F32, m, a, &b.0, None, c, ldc, c0, epi, None, next),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => drive(avx2::F32, m, a, &b.0, None, c, ldc, c0, epi, None, next),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => drive(avx512::F32, m, a, &b.0, None, c, ldc, c0, epi, None, next),
        #[cfg(not(target_arch = "x86_64"))]
        _ => drive(portable::F32, m, a, &b.0, None, c, ldc, c0, epi, None, next),
    }
}

/// Explicit im2col of `a`, which has `m` rows of `k` columns (checked once here): `row(r, out)`
/// copies row `r` into `out` (`k` floats). The `B` of a weight-gradient GEMM.
pub fn im2col<'a>(a: &'a Rows<'a>, m: usize, k: usize) -> impl Fn(usize, &mut [f32]) + Sync + 'a {
    a.check(m, k);
    move |r, out| {
        assert!(r < m && out.len() == k, "im2col: row {r} of {m}");
        a.gather(r, r + 1, 0, k, out, k);
    }
}

/// The int8 GEMM: `C[r, c0 + j] = act(load·C + alpha·(A·B·(x_scale·b.scale()[j]) + bias))`
/// for u8 rows `A` (quantized with `x_scale`; `k` a multiple of 4).
#[allow(clippy::too_many_arguments)]
pub fn qgemm(
    m: usize,
    a: Rows<'_, u8>,
    b: &PackedQ,
    col_scale: &[f32],
    c: &mut [f32],
    ldc: usize,
    c0: usize,
    epi: Epilogue<'_>,
) {
    assert!(col_scale.len() >= b.n(), "column scales shorter than n");
    let s = Some(col_scale);
    match b.isa {
        QIsa::Portable => drive(portable::Q8, m, a, &b.p, s, c, ldc, c0, epi, None, None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 if b.pairs => drive(avx2::Q8::<true>, m, a, &b.p, s, c, ldc, c0, epi, None, None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => drive(avx2::Q8::<false>, m, a, &b.p, s, c, ldc, c0, epi, None, None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => drive(avx512::Q8, m, a, &b.p, s, c, ldc, c0, epi, None, None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Amx => {
            if checked(m, &a, &b.p, Some(c), ldc, c0, &epi) {
                let t0 = profiling().then(std::time::Instant::now);
                // SAFETY: the kernel is one of the CPU's (`b.isa` came from
                // `QIsa::available`); the shapes are checked above.
                unsafe { amx::qgemm(m, a, &b.p, col_scale, c, ldc, c0, epi) };
                report(t0, m, b.k(), b.n(), &a, true);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => drive(portable::Q8, m, a, &b.p, s, c, ldc, c0, epi, None, None),
    }
}

/// [`qgemm`] with its results stored as u8 (`quantize_u8` of what `qgemm` would store, bit for
/// bit) into `out` instead of f32: the input of the next int8 convolutions, which then read it
/// as it is. Each tile is quantized as it leaves the kernel: in the VNNI kernel's own store
/// (panels inside one part), otherwise from an L1 tile; a sum over several k-blocks keeps its
/// partial sums in an f32 scratch `C`. The f32 output never reaches the activation buffers.
/// `epi.load` must be false.
pub fn qgemm_u8(m: usize, a: Rows<'_, u8>, b: &PackedQ, col_scale: &[f32], out: U8Out<'_>, epi: Epilogue<'_>) {
    assert!(!epi.load, "a u8 output cannot be accumulated into");
    qgemm_sink(m, a, b, col_scale, None, out, epi);
}

/// [`qgemm`] into the dense `m x n` `c` (`epi.load` allowed: the residual sum) and, bit for bit
/// as `quantize_u8` of it, into `out` as well: a residual block's output, f32 for the next
/// shortcut and u8 for the next block's int8 1x1. The VNNI kernel stores both from the same
/// registers; the others quantize each tile from C right after storing it, while it is in L1.
pub fn qgemm_dual(
    m: usize,
    a: Rows<'_, u8>,
    b: &PackedQ,
    scale: &[f32],
    c: &mut [f32],
    out: U8Out<'_>,
    epi: Epilogue<'_>,
) {
    qgemm_sink(m, a, b, scale, Some(c), out, epi);
}

/// The u8 outputs of [`qgemm_u8`] and [`qgemm_dual`]: with `kept`, C is that (dense) f32
/// output, else a scratch (or none).
fn qgemm_sink(
    m: usize,
    a: Rows<'_, u8>,
    b: &PackedQ,
    col_scale: &[f32],
    kept: Option<&mut [f32]>,
    out: U8Out<'_>,
    epi: Epilogue<'_>,
) {
    assert!(col_scale.len() >= b.n(), "column scales shorter than n");
    let n = b.n();
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.inv.len() >= n && out.zero.len() >= n, "grids shorter than n");
    assert!(out.parts.first().is_some_and(|p| p.col == 0), "the first part starts at column 0");
    for (i, p) in out.parts.iter().enumerate() {
        let end = out.parts.get(i + 1).map_or(n, |q| q.col);
        assert!(p.col <= end && end <= n && end - p.col <= p.ld, "u8 parts out of order or overlapping");
        assert!(out.dst.len() >= p.base + (m - 1) * p.ld + end - p.col, "u8 output too small for the GEMM");
    }
    let keep = kept.is_some();
    let sink = Sink { dst: Out(out.dst.as_mut_ptr()), parts: out.parts, inv: out.inv, zero: out.zero, keep };
    let one_block = b.p.steps <= b.p.kc;
    let s = Some(col_scale);
    let mut scratch: Vec<f32> =
        if keep || (one_block && b.isa != QIsa::Amx) { Vec::new() } else { crate::buffers::take(m * n) };
    let c = kept.unwrap_or(&mut scratch[..]);
    match b.isa {
        QIsa::Portable => drive(portable::Q8, m, a, &b.p, s, c, n, 0, epi, Some(sink), None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 if b.pairs => drive(avx2::Q8::<true>, m, a, &b.p, s, c, n, 0, epi, Some(sink), None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => drive(avx2::Q8::<false>, m, a, &b.p, s, c, n, 0, epi, Some(sink), None),
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => drive(avx512::Q8, m, a, &b.p, s, c, n, 0, epi, Some(sink), None),
        // the AMX path stores f32 tiles of its own: quantize its output after it
        #[cfg(target_arch = "x86_64")]
        QIsa::Amx => {
            qgemm(m, a, b, col_scale, c, n, 0, epi);
            let src = Out(c.as_mut_ptr());
            (0..m.div_ceil(MC)).into_par_iter().for_each(|t| {
                let (r0, rows) = (t * MC, MC.min(m - t * MC));
                // SAFETY: `c` holds `m x n` floats; the tasks' rows are disjoint.
                unsafe { sink.store(src.at(r0 * n), n, r0, rows, 0, n) };
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => drive(portable::Q8, m, a, &b.p, s, c, n, 0, epi, Some(sink), None),
    }
    crate::buffers::give(scratch);
}

/// The GEMM driver: row tiles x column chunks as tasks, each sweeping the k-blocks.
#[allow(clippy::too_many_arguments)]
fn drive<K: Kernel>(
    kern: K,
    m: usize,
    a: Rows<'_, K::A>,
    b: &Panels,
    scale: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    c0: usize,
    epi: Epilogue<'_>,
    sink: Option<Sink<'_>>,
    next: Option<&Panels>,
) {
    let step = K::A::STEP;
    let (k, n) = (b.steps * step, b.n);
    let kc = b.kc;
    let nkb = b.steps.div_ceil(kc);
    // a u8 result of one k-block leaves the kernel through an L1 tile, without C
    let direct = sink.is_some_and(|s| !s.keep) && nkb == 1;
    if !checked(m, &a, b, (!direct).then_some(&*c), ldc, c0, &epi) {
        return;
    }
    let t0 = profiling().then(std::time::Instant::now);
    let plan = Plan::new(m, n.div_ceil(NR), MR, MC);
    let out = Out(c.as_mut_ptr());
    let lines = b.data.bytes();
    let (following, single) = (next, plan.tasks() == 1);
    let task = |t: usize| {
        let ((r0, r1), (p0, p1)) = plan.task(t);
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let strips = (r1 - r0).div_ceil(MR);
            let mut tile = [0.0f32; MR * 4 * NR];
            for kb in 0..nkb {
                let s0 = kb * kc;
                let kcb = kc.min(b.steps - s0);
                let (k0, kce) = (s0 * step, kcb * step);
                scratch.segs.clear();
                scratch.starts.clear();
                if a.needs_gather() {
                    // strips whose kernel rows lie inside the input read them in place; the
                    // others (at the left and right edges) are gathered
                    let mut rows = std::mem::take(K::A::rows(scratch));
                    rows.resize((r1 - r0) * kce, K::A::default());
                    let mut wide = [None; MC / MR];
                    assert!(strips <= wide.len(), "a task holds at most MC rows");
                    for (st, o) in wide.iter_mut().enumerate().take(strips) {
                        let ra = r0 + st * MR;
                        *o = a.wide(ra, r1);
                        if o.is_none() {
                            a.gather(ra, (ra + MR).min(r1), k0, kce, &mut rows[st * MR * kce..], kce);
                        }
                    }
                    let tile_rows: Rows<K::A> = Rows::Dense { data: &rows, ld: kce };
                    for (st, o) in wide.iter().enumerate().take(strips) {
                        scratch.starts.push(scratch.segs.len());
                        match o {
                            Some(origins) => a.segments_wide(origins, k0, kce, &mut scratch.segs),
                            None => tile_rows.segments(st * MR, r1 - r0, 0, kce, &mut scratch.segs),
                        }
                    }
                    *K::A::rows(scratch) = rows;
                } else {
                    for st in 0..strips {
                        scratch.starts.push(scratch.segs.len());
                        a.segments(r0 + st * MR, r1, k0, kce, &mut scratch.segs);
                    }
                }
                scratch.starts.push(scratch.segs.len());
                // panels [p, p + np) for strip st
                let mut run = |(p, np): (usize, usize), st: usize, ahead: Ahead| {
                    let line = b.slice(s0, kcb, p);
                    let bp = &lines[line * 64..][..np * kcb * 64];
                    let (j0, cols) = (p * NR, (np * NR).min(n - p * NR));
                    let mut e = TileEpi::of_block(&epi, scale, j0, cols, kb, nkb);
                    e.ahead = ahead;
                    let rows = MR.min(r1 - r0 - st * MR);
                    let ra = r0 + st * MR;
                    // the kernel stores the u8 result itself where it can; else it leaves the
                    // kernel as f32 and is quantized below
                    let last = sink.filter(|_| kb == nkb - 1);
                    e.u8 = last.filter(|_| K::STORES_U8).and_then(|s| s.tile(ra, j0, cols));
                    let quantize_after = last.filter(|_| e.u8.is_none());
                    let segs = &scratch.segs[scratch.starts[st]..scratch.starts[st + 1]];
                    let (cp, ldt) =
                        if direct { (tile.as_mut_ptr(), 4 * NR) } else { (out.at(ra * ldc + c0 + j0), ldc) };
                    // SAFETY: the kernel was chosen among the CPU's; the segments' pointers are
                    // valid for their runs (they point into `a`'s data, the gathered rows or the
                    // zeros, all alive for this call); rows/cols of this tile are inside C
                    // (asserted above) or the task's own L1 tile, and no other task writes them.
                    unsafe { kern.tile(segs, bp.as_ptr(), kcb * 64, cp, ldt, rows, cols, &e) };
                    if let Some(s) = quantize_after {
                        // SAFETY: the kernel just stored this tile at `cp`; its u8 cells are
                        // inside the sink (checked by `qgemm_u8`) and this task's alone.
                        unsafe { s.store(cp, ldt, ra, rows, j0, cols) };
                    }
                };
                let group = K::PANELS;
                let groups = || (p0..p1).step_by(group).map(|p| (p, group.min(p1 - p)));
                if p1 - p0 <= FEW_PANELS {
                    // narrow output: keep each strip's rows in L1 across the few panels
                    (0..strips).for_each(|st| groups().for_each(|g| run(g, st, Ahead::NONE)));
                } else {
                    // keep each panel's weight slice in L1 across the strips; while a group
                    // runs, its strips prefetch the next group's slice (or the next k-block's
                    // first), a share each
                    for (p, np) in groups() {
                        let next = if p + np < p1 {
                            Some((s0, kcb, p + np, group.min(p1 - p - np)))
                        } else if kb + 1 < nkb {
                            let s1 = s0 + kc;
                            let kn = kc.min(b.steps - s1);
                            Some((s1, kn, p0, group.min(p1 - p0)))
                        } else {
                            None
                        };
                        let mut region = next.map(|(s, kn, q, nq)| (b.slice(s, kn, q), nq * kn));
                        let mut from = lines;
                        if let (None, Some(nb)) = (region, following.filter(|_| single)) {
                            // the last group: the next GEMM's first slice
                            from = nb.data.bytes();
                            region = Some((0, group.min(nb.n.div_ceil(NR)) * nb.kc.min(nb.steps)));
                        }
                        let region = region.filter(|_| prefetching());
                        for st in 0..strips {
                            let ahead = region.map_or(Ahead::NONE, |(line, len)| {
                                let (l0, l1) = (st * len / strips, (st + 1) * len / strips);
                                Ahead { p: from[(line + l0) * 64..].as_ptr(), lines: l1 - l0 }
                            });
                            run((p, np), st, ahead);
                        }
                    }
                }
            }
        });
    };
    plan.run(task);
    report(t0, m, k, n, &a, scale.is_some());
}

/// Whether the kernels prefetch the next weight slice: 0 not yet read from
/// `INCEPTION_PREFETCH` (`0`: off), 1 off, 2 on.
static PREFETCH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn prefetching() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match PREFETCH.load(Relaxed) {
        0 => {
            let on = std::env::var("INCEPTION_PREFETCH").map_or(true, |v| v != "0");
            set_prefetch(on);
            on
        }
        v => v == 2,
    }
}

/// Turn the weight prefetch on or off (A/B runs in one process).
pub fn set_prefetch(on: bool) {
    PREFETCH.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// Panics unless A, C and the bias fit the GEMM; false where it has nothing to compute.
fn checked<T: Elem>(
    m: usize,
    a: &Rows<'_, T>,
    b: &Panels,
    c: Option<&[f32]>,
    ldc: usize,
    c0: usize,
    epi: &Epilogue<'_>,
) -> bool {
    let (k, n) = (b.steps * T::STEP, b.n);
    if m == 0 || n == 0 {
        return false;
    }
    if let Some(c) = c {
        assert!(c0 + n <= ldc && c.len() >= (m - 1) * ldc + c0 + n, "output too small for the GEMM");
    }
    if let Some(bias) = epi.bias {
        assert!(bias.len() >= n, "bias shorter than n");
    }
    a.check(m, k);
    true
}

/// The `INCEPTION_PROFILE_GEMM` line of a GEMM started at `t0`.
fn report<T>(t0: Option<std::time::Instant>, m: usize, k: usize, n: usize, a: &Rows<'_, T>, int8: bool) {
    if let Some(t0) = t0 {
        let conv = matches!(a, Rows::Conv { .. }) as u8;
        eprintln!("gemm m={m} k={k} n={n} conv={conv} int8={} ms={:.4}", int8 as u8, t0.elapsed().as_secs_f64() * 1e3);
    }
}

/// A GEMM's tasks: row tiles of `mc` rows (equal, a multiple of the kernel's rows, at most
/// `mc_max`), each cut into `nchunks` chunks of `per_chunk` column panels where there are too
/// few row tiles to keep every thread busy.
struct Plan {
    m: usize,
    panels: usize,
    mc: usize,
    per_chunk: usize,
    nchunks: usize,
    threads: usize,
}

impl Plan {
    fn new(m: usize, panels: usize, mr: usize, mc_max: usize) -> Self {
        let mc = m.div_ceil(m.div_ceil(mc_max)).next_multiple_of(mr);
        let mtiles = m.div_ceil(mc);
        let threads = if SERIAL.with(|s| s.get()) { 1 } else { rayon::current_num_threads().max(1) };
        // with few row tiles, split the columns too, into a task count that spreads evenly
        let nchunks = if mtiles >= 3 * threads {
            1
        } else {
            let mut c = threads.div_ceil(mtiles);
            while !(mtiles * c).is_multiple_of(threads) {
                c += 1;
            }
            c.min(panels)
        };
        let per_chunk = panels.div_ceil(nchunks);
        Self { m, panels, mc, per_chunk, nchunks: panels.div_ceil(per_chunk), threads }
    }

    /// Task `t`'s rows `[r0, r1)` and panels `[p0, p1)`.
    fn task(&self, t: usize) -> ((usize, usize), (usize, usize)) {
        let (mt, nc) = (t / self.nchunks, t % self.nchunks);
        let (r0, p0) = (mt * self.mc, nc * self.per_chunk);
        ((r0, (r0 + self.mc).min(self.m)), (p0, (p0 + self.per_chunk).min(self.panels)))
    }

    fn tasks(&self) -> usize {
        self.m.div_ceil(self.mc) * self.nchunks
    }

    /// Every task, in parallel unless there is one task or one thread.
    fn run(&self, task: impl Fn(usize) + Sync + Send) {
        let tasks = self.tasks();
        if tasks == 1 || self.threads == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }
}

impl<'a> TileEpi<'a> {
    /// The epilogue of columns `[j0, j0 + cols)` in k-block `kb` of `nkb`: bias with the first
    /// block, the blocks after it added to C, the activation after the last.
    fn of_block(epi: &Epilogue<'a>, scale: Option<&'a [f32]>, j0: usize, cols: usize, kb: usize, nkb: usize) -> Self {
        TileEpi {
            bias: if kb == 0 { epi.bias.map(|v| &v[j0..j0 + cols]) } else { None },
            scale: scale.map(|v| &v[j0..j0 + cols]),
            alpha: epi.alpha,
            load: epi.load || kb > 0,
            relu: epi.relu && kb == nkb - 1,
            u8: None,
            ahead: Ahead::NONE,
        }
    }
}

/// The u8 grid of [`quantize_u8`]: one `(1 / scale, zero)` for every value, or one per column
/// (`inv[j]`, `zero[j]`: a merged GEMM's columns feed convolutions on different grids).
#[derive(Clone, Copy, Debug)]
pub enum Grid<'a> {
    One(f32, f32),
    Cols(&'a [f32], &'a [f32]),
}

impl<'a> Grid<'a> {
    /// The grid of columns `j0..` (the same for `One`).
    fn skip(self, j0: usize) -> Self {
        match self {
            Grid::One(..) => self,
            Grid::Cols(inv, zero) => Grid::Cols(&inv[j0..], &zero[j0..]),
        }
    }
}

/// `dst[i] = clamp(round(src[i] * inv + zero), 0, 255)`, round half to even (the activations
/// of the int8 GEMM; `zero` a whole number); `inv` and `zero` per value `i` for `Grid::Cols`.
pub fn quantize_u8(src: &[f32], dst: &mut [u8], g: Grid<'_>) {
    assert_eq!(src.len(), dst.len(), "quantize: lengths differ");
    if let Grid::Cols(inv, zero) = g {
        assert!(inv.len() >= src.len() && zero.len() >= src.len(), "quantize: grid shorter than the values");
    }
    match Isa::detect() {
        // SAFETY: AVX-512F present; the grid's columns cover `src` (asserted).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::quantize_u8(src, dst, g) },
        // SAFETY: AVX2 present; as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantize_u8(src, dst, g) },
        _ => portable::quantize_u8(src, dst, g),
    }
}

/// `INCEPTION_PROFILE_GEMM=1`: print every GEMM's shape and time to stderr (see BENCHMARKS.md).
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("INCEPTION_PROFILE_GEMM").is_some())
}

pub(crate) fn has_avx2_fma() -> bool {
    Isa::available().contains(&Isa::Avx2)
}

/// Measured f32 multiply-add peak of one core, GFLOP/s (12 independent FMA chains for ~0.2 s,
/// with the widest vectors the GEMM uses, [`Isa::detect`]).
pub fn fma_peak_gflops() -> f64 {
    let iters = 20_000_000usize;
    let t = std::time::Instant::now();
    #[cfg(target_arch = "x86_64")]
    let flops = match Isa::detect() {
        Isa::Avx512 => {
            // SAFETY: AVX-512F present.
            std::hint::black_box(unsafe { avx512::fma_loop(iters / 2) });
            iters / 2 * 12 * 32
        }
        Isa::Avx2 => {
            // SAFETY: AVX2 + FMA present.
            std::hint::black_box(unsafe { avx2::fma_loop(iters) });
            iters * 12 * 16
        }
        Isa::Portable => portable::fma_loop(iters),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let flops = portable::fma_loop(iters);
    flops as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], w: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| a[i * k + t] as f64 * w[t * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn dense_matches_naive_with_epilogues() {
        for (isa, &(m, k, n)) in Isa::available().into_iter().flat_map(|v| {
            [(1, 1, 1), (7, 300, 17), (150, 600, 40), (64, 2080, 33), (13, 5, 130), (20, 70, 100)]
                .iter()
                .map(move |s| (v, s))
        }) {
            let (a, w, bias) = (data(m * k, 1), data(k * n, 2), data(n, 3));
            let want = naive(m, k, n, &a, &w);
            let pb = PackedB::new(&w, k, n);
            assert_eq!(pb.unpack(), w);
            // stored into a wider output at column offset 3, with bias and ReLU
            let ldc = n + 5;
            let mut c = vec![7.0f32; m * ldc];
            let epi = Epilogue { bias: Some(&bias), alpha: 1.0, load: false, relu: true };
            gemm_on(isa, m, Rows::Dense { data: &a, ld: k }, &pb, &mut c, ldc, 3, epi, None);
            // residual: C = C + 0.2 (AB + bias)
            let mut r = vec![1.5f32; m * n];
            let epi = Epilogue { bias: Some(&bias), alpha: 0.2, load: true, relu: false };
            gemm_on(isa, m, Rows::Dense { data: &a, ld: k }, &pb, &mut r, n, 0, epi, None);
            for i in 0..m {
                assert_eq!(c[i * ldc..i * ldc + 3], [7.0; 3]);
                assert_eq!(c[i * ldc + 3 + n..(i + 1) * ldc], [7.0; 2]);
                for j in 0..n {
                    let y = want[i * n + j] + bias[j];
                    assert!((c[i * ldc + 3 + j] - y.max(0.0)).abs() < 1e-4, "{isa:?} {m}x{k}x{n} ({i},{j})");
                    assert!((r[i * n + j] - (1.5 + 0.2 * y)).abs() < 1e-4);
                }
            }
        }
    }

    fn bytes(len: usize, seed: u32, lo: i32, hi: i32) -> Vec<i32> {
        (0..len)
            .map(|i| lo + ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 7) as i32 % (hi - lo + 1))
            .collect()
    }

    /// A strip of six pixels inside a row reads each kernel row as one run (the row above the
    /// input skipped); one touching the left edge is gathered instead.
    #[test]
    fn inner_strips_read_whole_kernel_rows() {
        let x = vec![1u8; 12 * 20 * 32];
        let (h, w) = (12, 20);
        let r =
            Rows::Conv { data: &x, ld: 32, c0: 0, cin: 32, hw: [h, w], k: [3, 3], stride: 1, pad: [1, 1], out: [h, w] };
        // pixels 0-5 touch the left edge, 14-19 the right one, 21-26 (row 1) neither
        assert!(r.needs_gather() && r.wide(0, h * w).is_none() && r.wide(14, h * w).is_none());
        assert!(r.wide(21, h * w).is_some());
        let mut segs = Vec::new();
        r.segments_wide(&r.wide(1, h * w).expect("pixels 1-6 of row 0 are inside"), 0, 288, &mut segs);
        assert_eq!(segs.iter().map(|s| s.run).collect::<Vec<_>>(), [24, 24, 24]);
        assert!(segs[0].p.iter().all(|p| p.is_null()), "the kernel row above the input is skipped");
        assert!(segs[1].p.iter().all(|p| !p.is_null()));
        // 32 channels of a wider input (a slice) are not dense: gathered
        let sl = Rows::Conv {
            data: &x,
            ld: 64,
            c0: 0,
            cin: 32,
            hw: [h, w / 2],
            k: [3, 3],
            stride: 1,
            pad: [1, 1],
            out: [h, w / 2],
        };
        assert!(sl.wide(1, h * w / 2).is_none());
    }

    /// u8 x i8 against exact integer sums: every int8 kernel, dense and convolution rows
    /// (padding, stride, k-blocks), bit-identical to the portable kernel on the same packing.
    #[test]
    fn int8_kernels_are_exact_and_agree() {
        // (m, cin, h, w, kh, kw, stride, pad, n): dense 1x1s and padded / strided convolutions,
        // one with k (3 * 3 * 96 = 864) over a k-block; the ones under 64 channels gathered, one
        // of them (7 * 7 * 48 = 2352) over two int8 k-blocks
        for (m_img, cin, h, w, kh, kw, s, pad, n) in [
            (2, 64, 5, 7, 1, 1, 1, [0, 0], 100),
            (1, 8, 9, 9, 3, 3, 1, [1, 1], 33),
            (2, 96, 7, 6, 3, 3, 2, [0, 0], 70),
            (1, 12, 8, 6, 1, 7, 1, [0, 3], 16),
            (1, 48, 9, 8, 7, 7, 1, [3, 3], 40),
            // 32 channels: strips inside the input read whole kernel rows in place (rows
            // above / below the input as zeros), those at the edges are gathered; unpadded and
            // strided ones
            (2, 32, 12, 20, 3, 3, 1, [1, 1], 48),
            (1, 32, 10, 14, 3, 3, 1, [0, 0], 32),
            (1, 32, 15, 15, 3, 3, 2, [0, 0], 20),
            // AMX: whole 16-row tiles of a 1x1 loaded with their stride, and a 17-step k-block
            (3, 256, 8, 8, 1, 1, 1, [0, 0], 50),
            (1, 68, 6, 6, 1, 1, 1, [0, 0], 24),
            // a 1x1 with k = 2080 over two int8 k-blocks (a u8 result from the f32 scratch)
            (1, 2080, 3, 4, 1, 1, 1, [0, 0], 40),
        ] {
            let (oh, ow) = ((h + 2 * pad[0] - kh) / s + 1, (w + 2 * pad[1] - kw) / s + 1);
            let m = m_img * oh * ow;
            let k = kh * kw * cin;
            // random; the worst case for 16-bit sums (inputs 255, weights +-127 by column); small
            // weights (no narrowing, AVX2 pairs k-quads), and their worst case
            for case in 0..4 {
                let x: Vec<u8> = match case {
                    1 | 3 => vec![255; m_img * h * w * cin],
                    _ => bytes(m_img * h * w * cin, 9, 0, 255).into_iter().map(|v| v as u8).collect(),
                };
                let wt: Vec<i8> = match case {
                    0 => bytes(k * n, 3, -127, 127).into_iter().map(|v| v as i8).collect(),
                    1 => (0..k * n).map(|i| if i % n % 2 == 0 { 127 } else { -128 }).collect(),
                    2 => bytes(k * n, 3, -32, 32).into_iter().map(|v| v as i8).collect(),
                    _ => (0..k * n).map(|i| if i % n % 2 == 0 { 32 } else { -32 }).collect(),
                };
                let scale: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-5).collect();
                let bias = data(n, 7);
                let rows = Rows::Conv {
                    data: &x,
                    ld: cin,
                    c0: 0,
                    cin,
                    hw: [h, w],
                    k: [kh, kw],
                    stride: s,
                    pad,
                    out: [oh, ow],
                };
                let epi = Epilogue { bias: Some(&bias), alpha: 1.0, load: false, relu: false };
                for isa in QIsa::available() {
                    let pq = PackedQ::new_for(isa, &wt, k, n, &scale);
                    let (held, div, pairs) = narrow(isa, &wt, k, n);
                    if case >= 2 {
                        assert!(div.iter().all(|d| *d == 1.0), "{isa:?}: small weights narrowed");
                    }
                    assert_eq!(pairs, isa == QIsa::Avx2 && case >= 2, "{isa:?}: pairing of case {case}");
                    let eff: Vec<i64> = held.iter().map(|v| *v as i64).collect();
                    let mut got = vec![0.0f32; m * n];
                    qgemm(m, rows, &pq, pq.scale(), &mut got, n, 0, epi);
                    let mut port = vec![0.0f32; m * n];
                    drive(portable::Q8, m, rows, &pq.p, Some(pq.scale()), &mut port, n, 0, epi, None, None);
                    assert_eq!(got, port, "{isa:?} differs from the portable kernel");
                    u8_outputs_quantize_what_is_stored(m, rows, &pq, epi, &got);
                    dual_output_is_qgemm_and_its_quantization(m, rows, &pq, &bias);
                    for r in 0..m {
                        let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
                        for j in 0..n {
                            let mut sum = 0i64;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - pad[0] as isize,
                                        (ox * s + kx) as isize - pad[1] as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    for ci in 0..cin {
                                        let xv = x[((b * h + iy as usize) * w + ix as usize) * cin + ci] as i64;
                                        sum += xv * eff[((ky * kw + kx) * cin + ci) * n + j];
                                    }
                                }
                            }
                            let want = sum as f64 * pq.scale()[j] as f64 + bias[j] as f64;
                            let tol = 1e-5 * (sum.abs() as f64 * pq.scale()[j] as f64 + 1.0);
                            assert!(
                                (got[r * n + j] as f64 - want).abs() <= tol,
                                "{isa:?} ({r},{j}): {} vs {want}",
                                got[r * n + j]
                            );
                        }
                    }
                }
            }
        }
    }

    /// `qgemm_u8` stores `quantize_u8` of `qgemm`'s `want` bit for bit: as one channel slice of a
    /// wider map, and as three parts of their own (one boundary inside a 16-column panel, where
    /// the tile is quantized after the kernel, one on a panel edge).
    fn u8_outputs_quantize_what_is_stored(m: usize, rows: Rows<'_, u8>, pq: &PackedQ, epi: Epilogue<'_>, want: &[f32]) {
        let n = pq.n();
        let inv: Vec<f32> = (0..n).map(|j| 1.0 / (0.02 + j as f32 * 1e-3)).collect();
        let zero: Vec<f32> = (0..n).map(|j| (j % 3) as f32).collect();
        let (a, b) = (n / 3, (2 * n / 3).next_multiple_of(16).min(n));
        let layouts = [
            vec![U8Part { col: 0, ld: n + 8, base: 4 }],
            vec![
                U8Part { col: 0, ld: a, base: 0 },
                U8Part { col: a, ld: b - a, base: m * a },
                U8Part { col: b, ld: n - b, base: m * b },
            ],
        ];
        for parts in layouts {
            let mut dst = vec![7u8; m * (n + 8) + 4];
            qgemm_u8(m, rows, pq, pq.scale(), U8Out { dst: &mut dst, parts: &parts, inv: &inv, zero: &zero }, epi);
            for r in 0..m {
                for j in 0..n {
                    let p = parts[parts.partition_point(|p| p.col <= j) - 1];
                    let mut q = [0u8];
                    quantize_u8(&want[r * n + j..][..1], &mut q, Grid::One(inv[j], zero[j]));
                    assert_eq!(
                        dst[p.base + r * p.ld + j - p.col],
                        q[0],
                        "{:?} row {r} column {j} of {parts:?}",
                        pq.isa
                    );
                }
            }
        }
    }

    /// `qgemm_dual` stores what `qgemm` stores (here a residual sum: C loaded, scaled, ReLU)
    /// and `quantize_u8` of it, bit for bit.
    fn dual_output_is_qgemm_and_its_quantization(m: usize, rows: Rows<'_, u8>, pq: &PackedQ, bias: &[f32]) {
        let n = pq.n();
        let epi = Epilogue { bias: Some(bias), alpha: 0.17, load: true, relu: true };
        let start: Vec<f32> = data(m * n, 11).iter().map(|v| v * 40.0).collect();
        let mut want = start.clone();
        qgemm(m, rows, pq, pq.scale(), &mut want, n, 0, epi);
        let inv: Vec<f32> = (0..n).map(|j| 1.0 / (0.05 + j as f32 * 1e-3)).collect();
        let zero: Vec<f32> = (0..n).map(|j| (j % 5) as f32).collect();
        let (mut got, mut q) = (start, vec![7u8; m * n]);
        let parts = [U8Part { col: 0, ld: n, base: 0 }];
        let out = U8Out { dst: &mut q, parts: &parts, inv: &inv, zero: &zero };
        qgemm_dual(m, rows, pq, pq.scale(), &mut got, out, epi);
        assert_eq!(got, want, "{:?}: the f32 of a dual output", pq.isa);
        for (i, (v, u)) in want.iter().zip(&q).enumerate() {
            let mut e = [0u8];
            quantize_u8(std::slice::from_ref(v), &mut e, Grid::One(inv[i % n], zero[i % n]));
            assert_eq!(*u, e[0], "{:?}: u8 of cell {i}", pq.isa);
        }
    }

    /// The AVX2 kernel's weights: every pair (or, paired, every group of four) feeding a
    /// 16-bit lane within `sum |w| <= 128`, with no more narrowing than that needs; pairing
    /// only where it costs no column more than a divisor of 2.
    #[test]
    fn narrowed_weights_keep_16_bit_sums_exact() {
        let (k, n) = (36, 5);
        let worst = |col: &[i32], pairs: bool| {
            let p = |s: usize, t: usize| col[4 * s + t].abs() + col[4 * s + t + 1].abs();
            let next = |s: usize, t: usize| if pairs && s + 1 < k / 4 { p(s + 1, t) } else { 0 };
            (0..k / 4).flat_map(|s| [0, 2].map(|t| p(s, t) + next(s, t))).max().unwrap()
        };
        for (lo, hi, want_pairs) in [(-127, 127, false), (-40, 40, true)] {
            let wt: Vec<i8> = bytes(k * n, 5, lo, hi).into_iter().map(|v| v as i8).collect();
            let (held, div, pairs) = narrow(QIsa::Avx2, &wt, k, n);
            assert_eq!(pairs, want_pairs, "weights in [{lo}, {hi}]");
            assert!(!pairs || div.iter().all(|d| *d <= 2.0));
            for c in 0..n {
                let col: Vec<i32> = (0..k).map(|i| held[i * n + c] as i32).collect();
                assert!(worst(&col, pairs) <= 128, "column {c}: a lane sums to {}", worst(&col, pairs));
                // 3% less narrowing would break the bound
                let tighter: Vec<i32> =
                    (0..k).map(|i| (wt[i * n + c] as f32 / (div[c] * 0.97)).round_ties_even() as i32).collect();
                assert!(
                    div[c] == 1.0 || worst(&tighter, pairs) > 128,
                    "column {c}: divisor {} not the smallest",
                    div[c]
                );
            }
        }
    }

    #[test]
    fn quantize_u8_rounds_half_to_even_and_clamps_on_every_kernel() {
        let src: Vec<f32> = (0..100).map(|i| i as f32 * 0.5 - 5.0).chain([1e9, -1e9, 254.5, 255.5, 0.5, 1.5]).collect();
        // per-column grids: scales 1 and 2, zero points 0 and 3, in a pattern that no vector
        // width repeats
        let inv: Vec<f32> = (0..src.len()).map(|j| [1.0, 2.0, 1.0][j % 3]).collect();
        let zeros: Vec<f32> = (0..src.len()).map(|j| [0.0, 3.0][(j / 5) % 2]).collect();
        let mut cases: Vec<(Grid, Vec<u8>)> = [0.0f32, 3.0]
            .into_iter()
            .map(|z| {
                (Grid::One(1.0, z), src.iter().map(|v| (v + z).clamp(0.0, 255.0).round_ties_even() as u8).collect())
            })
            .collect();
        let want =
            src.iter().enumerate().map(|(j, v)| (v * inv[j] + zeros[j]).clamp(0.0, 255.0).round_ties_even() as u8);
        cases.push((Grid::Cols(&inv, &zeros), want.collect()));
        for (g, want) in cases {
            let mut got = vec![0u8; src.len()];
            portable::quantize_u8(&src, &mut got, g);
            assert_eq!(got, want);
            #[cfg(target_arch = "x86_64")]
            for isa in Isa::available() {
                let mut got = vec![0u8; src.len()];
                // SAFETY: the CPU has the kernel's instruction set.
                unsafe {
                    match isa {
                        Isa::Avx512 => avx512::quantize_u8(&src, &mut got, g),
                        Isa::Avx2 => avx2::quantize_u8(&src, &mut got, g),
                        Isa::Portable => portable::quantize_u8(&src, &mut got, g),
                    }
                }
                assert_eq!(got, want, "{isa:?} {g:?}");
            }
        }
    }

    #[test]
    fn implicit_im2col_matches_explicit() {
        // 2 images 9x7, channels 3..3+cin of a wider buffer, 3x2 kernel, stride 2, pad (1, 0);
        // 5 channels are gathered first, 20 are streamed tap by tap
        // a 7x1 convolution, pad (3, 0), on 6-wide maps: whole strips fall on padding taps;
        // and a padded 3x3 on 300 channels: taps longer than a k-block
        for (cin, h, w, kh, kw, s, pad) in
            [(5, 9, 7, 3, 2, 2, [1, 0]), (20, 9, 7, 3, 2, 2, [1, 0]), (17, 8, 6, 7, 1, 1, [3, 0])]
        {
            let (n, ld, c0) = (2, cin + 5, 3);
            let (oh, ow) = ((h + 2 * pad[0] - kh) / s + 1, (w + 2 * pad[1] - kw) / s + 1);
            let x = data(n * h * w * ld, 4);
            let k = kh * kw * cin;
            let m = n * oh * ow;
            let mut col = vec![0.0f32; m * k];
            for r in 0..m {
                let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (iy, ix) =
                            ((oy * s + ky) as isize - pad[0] as isize, (ox * s + kx) as isize - pad[1] as isize);
                        if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                            for ci in 0..cin {
                                col[r * k + (ky * kw + kx) * cin + ci] =
                                    x[((b * h + iy as usize) * w + ix as usize) * ld + c0 + ci];
                            }
                        }
                    }
                }
            }
            let wts = data(k * 21, 5);
            let pb = PackedB::new(&wts, k, 21);
            let want = naive(m, k, 21, &col, &wts);
            for isa in Isa::available() {
                let mut c = vec![0.0f32; m * 21];
                let rows = Rows::Conv { data: &x, ld, c0, cin, hw: [h, w], k: [kh, kw], stride: s, pad, out: [oh, ow] };
                gemm_on(
                    isa,
                    m,
                    rows,
                    &pb,
                    &mut c,
                    21,
                    0,
                    Epilogue { bias: None, alpha: 1.0, load: false, relu: false },
                    None,
                );
                for (g, w) in c.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5);
                }
            }
        }
    }
}
