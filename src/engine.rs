//! Frozen CPU inference engine (the `fast` engine): an executor of blocks of convolution
//! branches. It knows nothing of the networks; `crate::lower` builds it from a model's trunk
//! description (folding BatchNorm into the weights there).
//!
//! Activations are NHWC f32; every convolution is one GEMM (`crate::sgemm`, weights packed at
//! load) reading the input in place ("indirect" convolution: row pointers per kernel tap, no
//! im2col buffer); bias + ReLU run as each tile is stored; concatenations cost nothing because
//! each branch writes its own channel slice of the block output (GEMM row stride = total
//! channels); the residual `x + scale * up(cat)` is the GEMM's accumulate (`dst = x + scale*AB`),
//! in place in the block input's buffer. Quantized (`crate::quant`), int8 convolutions hand
//! the int8 ones after them u8 activations (`Act<u8>`, `Carry`) instead of f32. Parity with the
//! burn path (and so with timm / facenet) is tested like the burn path.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::buffers;
use crate::models::ModelKind;
use crate::quant::{ActStats, quantize_u8};
use crate::sgemm::{self, PackedB, PackedQ, Rows, U8Out, U8Part};
use crate::winograd::Winograd;

/// An NHWC activation: f32, or (`Act<u8>`) uint8 on the grid of the int8 convolutions that
/// read it, written so by the int8 convolution before them.
#[derive(Clone, Debug)]
pub struct Act<T = f32> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<T>,
}

impl<T> Act<T> {
    /// An activation its producer writes whole (a GEMM's output, a concatenation, a pool), in
    /// a finished layer's buffer where this thread keeps one (`crate::buffers`).
    fn for_overwrite(n: usize, h: usize, w: usize, c: usize) -> Self
    where
        T: buffers::Kept,
    {
        Self { n, h, w, c, data: buffers::take(n * h * w * c) }
    }

    /// Keep the buffer for the next layers of this thread's pass.
    fn recycle(self)
    where
        T: buffers::Kept,
    {
        buffers::give(self.data)
    }

    /// All channels, read in place.
    pub(crate) fn view(&self) -> View<'_, T> {
        self.slice(0, self.c)
    }

    /// Channels `[c0, c0 + c)`, read in place.
    pub(crate) fn slice(&self, c0: usize, c: usize) -> View<'_, T> {
        assert!(c0 + c <= self.c, "channel slice outside the activation");
        View { data: &self.data, n: self.n, h: self.h, w: self.w, ld: self.c, c0, c }
    }
}

impl Act {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { n, h, w, c, data: vec![0.0; n * h * w * c] }
    }

    pub fn from_nchw(data: &[f32], [n, c, h, w]: [usize; 4]) -> Self {
        let mut a = Self::zeros(n, h, w, c);
        a.data.par_chunks_mut(h * w * c).enumerate().for_each(|(b, out)| {
            // pixel by pixel: the writes stream, the reads walk `c` planes in step (channel by
            // channel the writes would be `c` strided passes over the output)
            let planes = &data[b * c * h * w..][..c * h * w];
            for (p, px) in out.chunks_exact_mut(c).enumerate() {
                for (ch, v) in px.iter_mut().enumerate() {
                    *v = planes[ch * h * w + p];
                }
            }
        });
        a
    }

    pub fn to_nchw(&self) -> Vec<f32> {
        let (h, w, c) = (self.h, self.w, self.c);
        let mut out = vec![0.0; self.data.len()];
        out.par_chunks_mut(h * w * c).enumerate().for_each(|(b, o)| {
            let src = &self.data[b * h * w * c..][..h * w * c];
            for p in 0..h * w {
                for ch in 0..c {
                    o[ch * h * w + p] = src[p * c + ch];
                }
            }
        });
        out
    }

    pub fn shape_nchw(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// The same shape, no data.
    fn clone_shape(&self) -> Self {
        Self { data: Vec::new(), ..*self }
    }

    /// Image `i` of the batch as a batch of one (images are the outermost NHWC dimension).
    pub(crate) fn image(&self, i: usize) -> Self {
        let per = self.h * self.w * self.c;
        Self { n: 1, data: self.data[i * per..(i + 1) * per].to_vec(), ..self.clone_shape() }
    }
}

/// Channels `[c0, c0 + c)` of an NHWC activation with `ld` channels a pixel, read in place: a
/// slice of the merged 1x1's output feeds the rest of its branch without a copy.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T = f32> {
    pub(crate) data: &'a [T],
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) ld: usize,
    pub(crate) c0: usize,
    pub(crate) c: usize,
}

impl<'a> From<&'a Act> for View<'a> {
    fn from(a: &'a Act) -> Self {
        a.view()
    }
}

impl View<'_> {
    /// The viewed channels as a contiguous activation (a copy).
    pub(crate) fn to_act(self) -> Act {
        let mut y = Act::zeros(self.n, self.h, self.w, self.c);
        self.copy_into(&mut y.data, self.c, 0);
        y
    }
}

impl<T: Copy + Send + Sync> View<'_, T> {
    /// The viewed channels copied into channels `[off, off + c)` of `dst` (row stride `ld`).
    pub(crate) fn copy_into(self, dst: &mut [T], ld: usize, off: usize) {
        let (c0, c) = (self.c0, self.c);
        dst.par_chunks_mut(ld)
            .zip(self.data.par_chunks(self.ld))
            .for_each(|(d, s)| d[off..off + c].copy_from_slice(&s[c0..c0 + c]));
    }

    /// The viewed channels starting at pixel 0 (pixel `p` at `p * ld`).
    pub(crate) fn rows(&self) -> &[T] {
        &self.data[self.c0..]
    }
}

/// The u8 grid `(scale, zero point)` an int8 convolution's input is quantized on.
pub(crate) type QGrid = (f32, u8);

fn same_grid(a: QGrid, b: QGrid) -> bool {
    a.0.to_bits() == b.0.to_bits() && a.1 == b.1
}

/// A convolution's input: f32, or u8 already on its grid.
#[derive(Clone, Copy, Debug)]
pub(crate) enum In<'a> {
    F32(View<'a>),
    U8(View<'a, u8>, QGrid),
}

impl<'a> From<View<'a>> for In<'a> {
    fn from(v: View<'a>) -> Self {
        In::F32(v)
    }
}

impl<'a> From<&'a Act> for In<'a> {
    fn from(a: &'a Act) -> Self {
        In::F32(a.view())
    }
}

impl<'a> In<'a> {
    fn dims(&self) -> (usize, usize, usize, usize) {
        match self {
            In::F32(v) => (v.n, v.h, v.w, v.c),
            In::U8(v, _) => (v.n, v.h, v.w, v.c),
        }
    }

    /// The f32 input of an op that reads no u8 (pools, f32 convolutions): the u8 flow only
    /// ever feeds int8 convolutions.
    fn f32(self) -> View<'a> {
        match self {
            In::F32(v) => v,
            In::U8(..) => unreachable!("u8 activations feed int8 convolutions only"),
        }
    }
}

/// An activation between layers: f32, or u8 on the grid of the convolution after it, or both
/// (a residual block's output: f32 for the next shortcut, u8 for the next block's int8 1x1).
pub(crate) enum Carry {
    F32(Act),
    U8(Act<u8>, QGrid),
    Dual(Act, Act<u8>, QGrid),
}

impl Carry {
    /// What the next convolution reads: the u8 where there is one (it was made on that
    /// convolution's grid).
    fn input(&self) -> In<'_> {
        match self {
            Carry::F32(a) => In::F32(a.view()),
            Carry::U8(a, g) | Carry::Dual(_, a, g) => In::U8(a.view(), *g),
        }
    }

    fn recycle(self) {
        match self {
            Carry::F32(a) => a.recycle(),
            Carry::U8(a, _) => a.recycle(),
            Carry::Dual(a, q, _) => {
                a.recycle();
                q.recycle();
            }
        }
    }

    fn into_f32(self) -> Act {
        match self {
            Carry::F32(a) => a,
            Carry::Dual(a, q, _) => {
                q.recycle();
                a
            }
            Carry::U8(..) => unreachable!("u8 activations feed int8 convolutions only"),
        }
    }

    /// A new `[n, h, w, c]` activation written whole by `write`: u8 on `grid` where given, else
    /// f32.
    fn written([n, h, w, c]: [usize; 4], grid: Option<QGrid>, write: impl FnOnce(Dst)) -> Self {
        match grid {
            Some(g) => {
                let mut y = Act::<u8>::for_overwrite(n, h, w, c);
                write(Dst::U8 { data: &mut y.data, ld: c, off: 0, grids: &ColGrids::of(g, c) });
                Carry::U8(y, g)
            }
            None => {
                let mut y = Act::for_overwrite(n, h, w, c);
                write(Dst::F32 { data: &mut y.data, ld: c, off: 0 });
                Carry::F32(y)
            }
        }
    }
}

/// Per output channel, the grid of the int8 convolution that reads it (`1 / scale` and the
/// zero point as f32, as the quantizer takes them).
#[derive(Clone, Debug, Default)]
pub(crate) struct ColGrids {
    inv: Vec<f32>,
    zero: Vec<f32>,
}

impl ColGrids {
    /// `channels` channels read on `g`, appended.
    fn push(&mut self, g: QGrid, channels: usize) {
        self.inv.extend(std::iter::repeat_n(1.0 / g.0, channels));
        self.zero.extend(std::iter::repeat_n(g.1 as f32, channels));
    }

    fn of(g: QGrid, channels: usize) -> Self {
        let mut c = Self::default();
        c.push(g, channels);
        c
    }
}

/// Where a convolution's output goes: channels `[off, off + cout)` of `data` (row stride `ld`),
/// f32, or u8 on the grids of the convolutions after it (`grids` per channel of `data`); or
/// (`U8Slots`, the merged 1x1) each slot `(offset, channels)` of its channels as a dense map of
/// its own, slot maps one after the other; or (`Dual`, an int8 convolution's whole output) f32
/// into `data` and u8 into `u8`, both dense.
pub(crate) enum Dst<'a> {
    F32 { data: &'a mut [f32], ld: usize, off: usize },
    U8 { data: &'a mut [u8], ld: usize, off: usize, grids: &'a ColGrids },
    U8Slots { data: &'a mut [u8], slots: &'a [(usize, usize)], grids: &'a ColGrids },
    Dual { data: &'a mut [f32], u8: &'a mut [u8], grids: &'a ColGrids },
}

impl Dst<'_> {
    /// The same destination `by` channels further on.
    fn shifted(&mut self, by: usize) -> Dst<'_> {
        match self {
            Dst::F32 { data, ld, off } => Dst::F32 { data, ld: *ld, off: *off + by },
            Dst::U8 { data, ld, off, grids } => Dst::U8 { data, ld: *ld, off: *off + by, grids },
            Dst::U8Slots { .. } => unreachable!("slot maps are the merged 1x1's alone"),
            Dst::Dual { .. } => unreachable!("a dual output is a block's whole output"),
        }
    }
}

/// How a convolution's result is written.
#[derive(Clone, Copy)]
pub(crate) enum StoreMode {
    /// `dst = AB + bias`, then ReLU if asked.
    Store { relu: bool },
    /// `dst = dst + scale * (AB + bias)`, then ReLU if asked (the residual sum).
    Residual { scale: f32, relu: bool },
}

/// A convolution with folded BatchNorm: weights `[kh * kw * cin, cout]` (packed), tap order
/// `(ky, kx, ci)`.
#[derive(Clone, Debug)]
pub struct Conv {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) kernel: [usize; 2],
    pub(crate) stride: usize,
    pub(crate) pad: [usize; 2],
    w: Weights,
    pub(crate) b: Vec<f32>,
    relu: bool,
    /// Calibration: statistics of every input this convolution sees (`crate::quant`).
    probe: Option<Arc<Mutex<ActStats>>>,
}

/// A convolution's weights: f32 for the GEMM, f32 transformed for Winograd (in place of the
/// GEMM's, chosen at load), or int8 (`crate::quant`).
#[derive(Clone, Debug)]
enum Weights {
    F32(PackedB),
    Winograd(Arc<Winograd>),
    /// `[kh * kw * cin4, cout]` int8 with the input's channels padded to `cin4` (a multiple
    /// of 4); the input is quantized to u8 with `x_scale` and zero point `x_zero` before the
    /// GEMM, whose i32 sums are scaled per column by `col_scale = x_scale * w_scale`; `bias`
    /// is the convolution's bias less what the zero point adds (`col_scale * z * sum w`).
    Int8 {
        w: PackedQ,
        cin4: usize,
        x_scale: f32,
        x_zero: u8,
        col_scale: Vec<f32>,
        bias: Vec<f32>,
    },
}

/// An int8 convolution's tables as stored: weights `[kh * kw * cin4, cout]`, their
/// per-channel scales, and the input's scale and zero point (0 for non-negative inputs; only
/// unpadded convolutions take another, as padding must read as zero).
#[derive(Clone, Debug)]
pub struct Int8Tables {
    pub weight: Vec<i8>,
    pub w_scale: Vec<f32>,
    pub x_scale: f32,
    pub x_zero: u8,
}

impl Conv {
    /// From PyTorch-layout weights `[cout, cin, kh, kw]`, each output channel scaled by
    /// `scale[co]` (a folded BatchNorm; ones otherwise) plus `bias`.
    pub fn new(
        weight: &[f32],
        [cout, cin, kh, kw]: [usize; 4],
        stride: usize,
        pad: [usize; 2],
        scale: &[f32],
        bias: Vec<f32>,
        relu: bool,
    ) -> Self {
        let k = kh * kw * cin;
        let mut w = vec![0.0; k * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        w[((ky * kw + kx) * cin + ci) * cout + co] =
                            weight[((co * cin + ci) * kh + ky) * kw + kx] * scale[co];
                    }
                }
            }
        }
        Self::from_matrix(&w, [kh, kw], cin, cout, stride, pad, bias, relu)
    }

    /// From weights `[kh * kw * cin, cout]` (tap order `(ky, kx, ci)`) and bias.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_matrix(
        w: &[f32],
        kernel: [usize; 2],
        cin: usize,
        cout: usize,
        stride: usize,
        pad: [usize; 2],
        bias: Vec<f32>,
        relu: bool,
    ) -> Self {
        let k = kernel[0] * kernel[1] * cin;
        let packed = Weights::F32(PackedB::new(w, k, cout));
        let mut conv = Self { cin, cout, kernel, stride, pad, w: packed, b: bias, relu, probe: None };
        // the GEMM convolution is the reference the Winograd one is checked against
        let run = |x: &Act| conv.run(x);
        if let Some(wino) = Winograd::for_conv(w, (kernel, stride, pad), cin, cout, (&conv.b, relu), run) {
            conv.w = Weights::Winograd(Arc::new(wino));
        }
        conv
    }

    /// Whether this convolution runs as Winograd.
    pub fn is_winograd(&self) -> bool {
        matches!(self.w, Weights::Winograd(_))
    }

    /// The same convolution run directly (one GEMM), for comparisons.
    pub fn without_winograd(self) -> Self {
        let Weights::Winograd(wino) = &self.w else { return self };
        let k = self.kernel[0] * self.kernel[1] * self.cin;
        let w = Weights::F32(PackedB::new(&wino.direct_weights(), k, self.cout));
        Self { w, ..self }
    }

    /// The f32 weights `[kh * kw * cin, cout]` (`None` once quantized; recovered from the
    /// transformed ones, to ~1e-7, for a Winograd convolution).
    pub(crate) fn weights_f32(&self) -> Option<Vec<f32>> {
        match &self.w {
            Weights::F32(p) => Some(p.unpack()),
            Weights::Winograd(wino) => Some(wino.direct_weights()),
            Weights::Int8 { .. } => None,
        }
    }

    /// Run from now on with int8 weights (`k` over channels padded to `cin4 = cin` rounded up
    /// to 4).
    pub(crate) fn set_int8(&mut self, t: &Int8Tables) {
        let cin4 = self.cin.next_multiple_of(4);
        let k = self.kernel[0] * self.kernel[1] * cin4;
        let w = PackedQ::new(&t.weight, k, self.cout, &t.w_scale);
        let col_scale: Vec<f32> = w.scale().iter().map(|s| s * t.x_scale).collect();
        let z = t.x_zero as f32;
        let bias = self.b.iter().zip(&col_scale).zip(w.col_sums()).map(|((b, s), n)| b - s * z * *n as f32).collect();
        self.w = Weights::Int8 { w, cin4, x_scale: t.x_scale, x_zero: t.x_zero, col_scale, bias };
    }

    /// Replace the bias, and the f32 weights (`[kh * kw * cin, cout]`) when given.
    pub(crate) fn set_f32(&mut self, w: Option<&[f32]>, bias: Vec<f32>) {
        match w {
            Some(w) => {
                *self = Conv::from_matrix(w, self.kernel, self.cin, self.cout, self.stride, self.pad, bias, self.relu)
            }
            None => self.b = bias,
        }
    }

    pub(crate) fn set_probe(&mut self, probe: Option<Arc<Mutex<ActStats>>>) {
        self.probe = probe;
    }

    pub(crate) fn is_int8(&self) -> bool {
        matches!(self.w, Weights::Int8 { .. })
    }

    /// Multiply-accumulates on an `h x w` input, batch 1.
    fn macs(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.out_hw(h, w);
        (oh * ow * self.cout * self.cin * self.kernel[0] * self.kernel[1]) as u64
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == 1
    }

    /// The grid of its input, for an int8 convolution that can read u8 in place (whole k-steps:
    /// `cin` a multiple of 4).
    fn u8_grid(&self) -> Option<QGrid> {
        match &self.w {
            Weights::Int8 { x_scale, x_zero, .. } if self.cin.is_multiple_of(4) => Some((*x_scale, *x_zero)),
            _ => None,
        }
    }

    /// Whether it can write its output as u8 (int8, `cout` a multiple of 4).
    fn emits_u8(&self) -> bool {
        self.is_int8() && self.cout.is_multiple_of(4)
    }

    /// The GEMM rows of this convolution on an `h x w` NHWC input `data`: channels `[c0, c0 +
    /// cin)` of pixels `ld` apart.
    fn rows<'a, T: sgemm::Elem>(&self, data: &'a [T], hw: [usize; 2], (ld, c0): (usize, usize)) -> Rows<'a, T> {
        if self.is_pointwise() {
            Rows::Dense { data: &data[c0..], ld }
        } else {
            Rows::Conv {
                data,
                ld,
                c0,
                cin: self.cin.next_multiple_of(T::STEP),
                hw,
                k: self.kernel,
                stride: self.stride,
                pad: self.pad,
                out: self.out_hw(hw[0], hw[1]).into(),
            }
        }
    }

    /// Run on `x`, writing channels `[off, off + cout)` of `dst` (row stride `ld`).
    pub(crate) fn run_into<'a>(&self, x: impl Into<View<'a>>, dst: &mut [f32], ld: usize, off: usize, mode: StoreMode) {
        self.run_to(In::F32(x.into()), Dst::F32 { data: dst, ld, off }, mode)
    }

    /// Run on `x` (u8 only on this convolution's grid) into `dst` (u8, stored only, for an int8
    /// convolution).
    pub(crate) fn run_to(&self, x: In, dst: Dst, mode: StoreMode) {
        let (n, h, w, c) = x.dims();
        assert_eq!(c, self.cin, "input channels");
        if let (Some(p), In::F32(x)) = (&self.probe, x) {
            let stats = &mut *p.lock().unwrap_or_else(|e| e.into_inner());
            if x.ld == x.c { stats.observe(x.data) } else { stats.observe(&x.to_act().data) }
        }
        let (oh, ow) = self.out_hw(h, w);
        let bias = match &self.w {
            Weights::F32(_) => &self.b,
            Weights::Winograd(wino) => {
                let Dst::F32 { data, ld, off } = dst else { unreachable!("a Winograd convolution writes f32") };
                return wino.run_into(x.f32(), data, ld, off, &self.b, mode);
            }
            Weights::Int8 { bias, .. } => bias,
        };
        let epi = match mode {
            StoreMode::Store { relu } => sgemm::Epilogue { bias: Some(bias), alpha: 1.0, load: false, relu },
            StoreMode::Residual { scale, relu } => sgemm::Epilogue { bias: Some(bias), alpha: scale, load: true, relu },
        };
        let m = n * oh * ow;
        match &self.w {
            Weights::F32(wt) => {
                let (x, Dst::F32 { data, ld, off }) = (x.f32(), dst) else {
                    unreachable!("an f32 convolution writes f32")
                };
                sgemm::gemm(m, self.rows(x.data, [h, w], (x.ld, x.c0)), wt, data, ld, off, epi)
            }
            Weights::Winograd(_) => unreachable!("returned above"),
            Weights::Int8 { w: wt, cin4, x_scale, x_zero, col_scale, .. } => {
                let mut quantized = None;
                let (data, ld, c0) = match x {
                    In::U8(v, g) => {
                        assert!(same_grid(g, (*x_scale, *x_zero)), "u8 input on another convolution's grid");
                        (v.data, v.ld, v.c0)
                    }
                    In::F32(v) => (&quantized.insert(quantize_u8(&v, *cin4, *x_scale, *x_zero))[..], *cin4, 0),
                };
                let rows = self.rows(data, [h, w], (ld, c0));
                match dst {
                    Dst::F32 { data, ld, off } => sgemm::qgemm(m, rows, wt, col_scale, data, ld, off, epi),
                    Dst::U8 { data, ld, off, grids } => {
                        let (inv, zero) = (&grids.inv[off..off + self.cout], &grids.zero[off..off + self.cout]);
                        let parts = [U8Part { col: 0, ld, base: off }];
                        sgemm::qgemm_u8(m, rows, wt, col_scale, U8Out { dst: data, parts: &parts, inv, zero }, epi)
                    }
                    Dst::U8Slots { data, slots, grids } => {
                        let parts: Vec<U8Part> =
                            slots.iter().map(|&(o, c)| U8Part { col: o, ld: c, base: m * o }).collect();
                        let out = U8Out { dst: data, parts: &parts, inv: &grids.inv, zero: &grids.zero };
                        sgemm::qgemm_u8(m, rows, wt, col_scale, out, epi)
                    }
                    Dst::Dual { data, u8, grids } => {
                        let parts = [U8Part { col: 0, ld: self.cout, base: 0 }];
                        let out = U8Out { dst: u8, parts: &parts, inv: &grids.inv, zero: &grids.zero };
                        sgemm::qgemm_dual(m, rows, wt, col_scale, data, out, epi)
                    }
                }
                quantized.into_iter().for_each(buffers::give);
            }
        }
    }

    /// Run on `x` into a new activation: u8 on `next` where given and it can.
    fn run_carry(&self, x: In, next: Option<QGrid>) -> Carry {
        let (n, h, w, _) = x.dims();
        let (oh, ow) = self.out_hw(h, w);
        let mode = StoreMode::Store { relu: self.relu };
        Carry::written([n, oh, ow, self.cout], next.filter(|_| self.emits_u8()), |dst| self.run_to(x, dst, mode))
    }

    /// Run on `x` into a new activation.
    pub fn run<'a>(&self, x: impl Into<View<'a>>) -> Act {
        self.run_carry(In::F32(x.into()), None).into_f32()
    }
}

/// 3x3 / 2 max pool (VALID) into channels `[off, off + c)` of `dst`.
pub(crate) fn max_pool_into<'a>(x: impl Into<View<'a>>, dst: &mut [f32], ld: usize, off: usize) {
    let x: View = x.into();
    let (oh, ow) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
    let (c, xs) = (x.c, x.rows());
    dst[..x.n * oh * ow * ld].par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
        let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
        let out = &mut row[off..off + c];
        out.fill(f32::NEG_INFINITY);
        for dy in 0..3 {
            for dx in 0..3 {
                let src = ((b * x.h + oy * 2 + dy) * x.w + ox * 2 + dx) * x.ld;
                for (o, v) in out.iter_mut().zip(&xs[src..src + c]) {
                    *o = o.max(*v);
                }
            }
        }
    });
}

/// 3x3 / 1 average pool, padding 1, padding excluded from the mean.
pub(crate) fn avg_pool<'a>(x: impl Into<View<'a>>) -> Act {
    let x: View = x.into();
    let mut y = Act::zeros(x.n, x.h, x.w, x.c);
    avg_pool_into(x, &mut y.data, x.c, 0, false);
    y
}

/// 3x3 / 1 average pool, padding 1, padding excluded from the mean, into channels `[off, off
/// + c)` of `dst` (row stride `ld`), then ReLU if asked.
pub(crate) fn avg_pool_into<'a>(x: impl Into<View<'a>>, dst: &mut [f32], ld: usize, off: usize, relu: bool) {
    let x: View = x.into();
    let (h, w, c, xs) = (x.h, x.w, x.c, x.rows());
    dst[..x.n * h * w * ld].par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
        let out = &mut row[off..off + c];
        out.fill(0.0);
        let (b, oy, ox) = (r / (h * w), (r / w) % h, r % w);
        let (y0, y1, x0, x1) = (oy.saturating_sub(1), (oy + 1).min(h - 1), ox.saturating_sub(1), (ox + 1).min(w - 1));
        for iy in y0..=y1 {
            for ix in x0..=x1 {
                let src = ((b * h + iy) * w + ix) * x.ld;
                for (o, v) in out.iter_mut().zip(&xs[src..src + c]) {
                    *o += v;
                }
            }
        }
        let inv = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
        match relu {
            true => out.iter_mut().for_each(|o| *o = (*o * inv).max(0.0)),
            false => out.iter_mut().for_each(|o| *o *= inv),
        }
    });
}

/// The geometry of a convolution, all the block structure needs to know of it (the frozen
/// `Conv` here, the training engine's convolution in `crate::train::engine`).
pub trait ConvShape {
    fn kernel(&self) -> [usize; 2];
    fn stride(&self) -> usize;
    fn pad(&self) -> [usize; 2];
    fn cout(&self) -> usize;

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let ([kh, kw], s, [ph, pw]) = (self.kernel(), self.stride(), self.pad());
        ((h + 2 * ph - kh) / s + 1, (w + 2 * pw - kw) / s + 1)
    }
}

impl ConvShape for Conv {
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

/// One step of a branch: a convolution, the 3x3/2 max pool or the 3x3/1 average pool
/// (padding excluded).
#[derive(Clone, Debug)]
pub enum Op<C = Conv> {
    Conv(Box<C>),
    MaxPool,
    AvgPool,
}

impl<C: ConvShape> Op<C> {
    pub(crate) fn out_shape(&self, h: usize, w: usize, c: usize) -> (usize, usize, usize) {
        match self {
            Op::Conv(conv) => {
                let (oh, ow) = conv.out_hw(h, w);
                (oh, ow, conv.cout())
            }
            Op::MaxPool => ((h - 3) / 2 + 1, (w - 3) / 2 + 1, c),
            Op::AvgPool => (h, w, c),
        }
    }
}

/// A chain of ops; its output is the last op's, or (Inception-C's split branches) the
/// concatenation of `tails` applied to the chain's output.
#[derive(Clone, Debug)]
pub struct Branch<C = Conv> {
    pub(crate) ops: Vec<Op<C>>,
    pub(crate) tails: Vec<C>,
}

impl<C> Branch<C> {
    /// A chain of ops.
    pub fn new(ops: Vec<Op<C>>) -> Self {
        Self { ops, tails: vec![] }
    }
    /// A chain whose output feeds several convolutions, concatenated.
    pub fn split(ops: Vec<Op<C>>, tails: Vec<C>) -> Self {
        Self { ops, tails }
    }
    pub fn convs(convs: Vec<C>) -> Self {
        Self::new(convs.into_iter().map(|c| Op::Conv(Box::new(c))).collect())
    }
    pub fn max_pool() -> Self {
        Self::new(vec![Op::MaxPool])
    }
}

impl<C: ConvShape> Branch<C> {
    pub(crate) fn out_shape(&self, h: usize, w: usize, c: usize) -> (usize, usize, usize) {
        let (h, w, c) = self.ops.iter().fold((h, w, c), |(h, w, c), op| op.out_shape(h, w, c));
        if self.tails.is_empty() { (h, w, c) } else { (h, w, self.tails.iter().map(|t| t.cout()).sum()) }
    }
}

impl Branch {
    /// Multiply-accumulates and output shape on an `h x w x c` input, batch 1.
    fn macs(&self, h: usize, w: usize, c: usize) -> (u64, (usize, usize, usize)) {
        let mut total = 0;
        let (mut h, mut w, mut c) = (h, w, c);
        for op in &self.ops {
            if let Op::Conv(conv) = op {
                total += conv.macs(h, w);
            }
            (h, w, c) = op.out_shape(h, w, c);
        }
        total += self.tails.iter().map(|t| t.macs(h, w)).sum::<u64>();
        let c = if self.tails.is_empty() { c } else { self.tails.iter().map(|t| t.cout).sum() };
        (total, (h, w, c))
    }

    /// The pool branch (Fig. 4, 7, 9, and Inception-ResNet-v2's stem): its 1x1.
    fn pool_1x1(&self) -> Option<&Conv> {
        match &self.ops[..] {
            [Op::AvgPool, Op::Conv(conv)] if self.tails.is_empty() && conv.is_pointwise() && conv.pad == [0, 0] => {
                Some(conv)
            }
            _ => None,
        }
    }

    /// The grid the branch reads u8 on, where its first convolution can (`None`: f32).
    fn input_grid(&self) -> Option<QGrid> {
        match self.ops.first() {
            _ if self.pool_1x1().is_some() => None,
            Some(Op::Conv(c)) => c.u8_grid(),
            Some(_) => None,
            None => tails_grid(&self.tails),
        }
    }

    /// Whether its output can be u8 (its last convolutions can write it).
    fn emits_u8(&self) -> bool {
        match self.ops.last() {
            _ if !self.tails.is_empty() => self.tails.iter().all(Conv::emits_u8),
            _ if self.pool_1x1().is_some() => false,
            Some(Op::Conv(c)) => c.emits_u8(),
            _ => false,
        }
    }

    /// Run on `x` (a slice of the merged 1x1's output is read in place) into `dst`; with `u8`,
    /// a convolution followed by an int8 one hands it u8 on its grid.
    fn run(&self, x: In, mut dst: Dst, u8: bool) {
        if let Some(conv) = self.pool_1x1() {
            // the 1x1 is linear and its bias a constant, which the mean keeps, so it runs first
            // and the mean then averages its `cout` channels instead of the `cin` (4-8x fewer);
            // only the ReLU waits for the mean. (Merged into the block's leading 1x1 GEMM
            // instead, with the ReLU starting after its columns, it was no faster:
            // BENCHMARKS.md.)
            let Dst::F32 { data, ld, off } = dst else { unreachable!("the pool branch writes f32") };
            let x = x.f32();
            let mut y = Act::for_overwrite(x.n, x.h, x.w, conv.cout);
            conv.run_into(x, &mut y.data, conv.cout, 0, StoreMode::Store { relu: false });
            avg_pool_into(&y, data, ld, off, conv.relu);
            return y.recycle();
        }
        let last = if self.tails.is_empty() { self.ops.len() - 1 } else { self.ops.len() };
        let mut tmp: Option<Carry> = None;
        for (i, op) in self.ops[..last].iter().enumerate() {
            let input = tmp.as_ref().map_or(x, Carry::input);
            let y = match op {
                Op::Conv(conv) => {
                    let next = match self.ops.get(i + 1) {
                        Some(Op::Conv(c)) => c.u8_grid(),
                        Some(_) => None,
                        None => tails_grid(&self.tails),
                    };
                    conv.run_carry(input, next.filter(|_| u8))
                }
                Op::AvgPool => Carry::F32(avg_pool(input.f32())),
                Op::MaxPool => {
                    let input = input.f32();
                    let (oh, ow, c) = op.out_shape(input.h, input.w, input.c);
                    let mut y = Act::for_overwrite(input.n, oh, ow, c);
                    max_pool_into(input, &mut y.data, c, 0);
                    Carry::F32(y)
                }
            };
            tmp.replace(y).into_iter().for_each(Carry::recycle);
        }
        let input = tmp.as_ref().map_or(x, Carry::input);
        if self.tails.is_empty() {
            match (&self.ops[last], dst) {
                (Op::Conv(conv), dst) => conv.run_to(input, dst, StoreMode::Store { relu: conv.relu }),
                (Op::MaxPool, Dst::F32 { data, ld, off }) => max_pool_into(input.f32(), data, ld, off),
                (Op::MaxPool, _) => unreachable!("a pool writes f32"),
                (Op::AvgPool, _) => unreachable!("no branch ends in an average pool"),
            }
        } else {
            let mut o = 0;
            for t in &self.tails {
                t.run_to(input, dst.shifted(o), StoreMode::Store { relu: t.relu });
                o += t.cout;
            }
        }
        tmp.into_iter().for_each(Carry::recycle);
    }
}

/// The grid the tails of a split branch read u8 on: all see the same input, so calibration
/// gives them one grid; `None` where any cannot read u8.
fn tails_grid(tails: &[Conv]) -> Option<QGrid> {
    let g = tails.first()?.u8_grid()?;
    tails.iter().all(|t| t.u8_grid().is_some_and(|h| same_grid(g, h))).then_some(g)
}

/// The branches' leading 1x1 convolutions merged into one, and each branch's
/// `(offset, channels)` in its output.
#[derive(Clone, Debug)]
struct Merged1x1 {
    conv: Conv,
    slots: Vec<Option<(usize, usize)>>,
}

/// The residual wrapper of a block: `x + scale * up(cat)` (or `up(cat)` without shortcut),
/// then ReLU if asked.
#[derive(Clone, Debug)]
pub struct Residual<C = Conv> {
    pub up: C,
    pub scale: f32,
    pub relu: bool,
    /// `false`: no shortcut, the plain counterpart of the block.
    pub shortcut: bool,
}

/// Parallel branches concatenated along channels, optionally wrapped in a scaled residual.
/// The branches' leading 1x1 convolutions on the block input run as one wider GEMM
/// (`merged`), whose channel slices then feed the rest of each branch.
#[derive(Clone, Debug)]
pub struct Block {
    branches: Vec<Branch>,
    merged: Option<Merged1x1>,
    residual: Option<Residual>,
}

/// Take the leading pointwise convolutions of the branches (when two or more share the
/// input and the activation) and merge them into one `[cin, sum of couts]` convolution.
fn merge_leading_1x1(branches: &mut [Branch]) -> Option<Merged1x1> {
    let lead = |b: &Branch| match b.ops.first() {
        Some(Op::Conv(conv)) if conv.is_pointwise() && conv.pad == [0, 0] && conv.relu => Some((**conv).clone()),
        _ => None,
    };
    if branches.iter().filter_map(lead).count() < 2 {
        return None;
    }
    let convs: Vec<Option<Conv>> = branches.iter().map(lead).collect();
    let cin = convs.iter().flatten().map(|c| c.cin).next()?;
    let total: usize = convs.iter().flatten().map(|c| c.cout).sum();
    let mut w = vec![0.0f32; cin * total];
    let mut b = Vec::with_capacity(total);
    let mut slots = Vec::new();
    let mut off = 0;
    for (branch, conv) in branches.iter_mut().zip(&convs) {
        match conv {
            Some(c) => {
                let cw = c.weights_f32().expect("convolutions are merged before quantization");
                for r in 0..cin {
                    w[r * total + off..r * total + off + c.cout].copy_from_slice(&cw[r * c.cout..(r + 1) * c.cout]);
                }
                b.extend_from_slice(&c.b);
                slots.push(Some((off, c.cout)));
                off += c.cout;
                branch.ops.remove(0);
            }
            None => slots.push(None),
        }
    }
    let conv = Conv::from_matrix(&w, [1, 1], cin, total, 1, [0, 0], b, true);
    Some(Merged1x1 { conv, slots })
}

impl Block {
    /// Branches concatenated.
    pub fn plain(branches: Vec<Branch>) -> Self {
        Self::new(branches, None)
    }

    pub fn new(mut branches: Vec<Branch>, residual: Option<Residual>) -> Self {
        let merged = merge_leading_1x1(&mut branches);
        Self { branches, merged, residual }
    }

    /// Multiply-accumulates and output shape on an `h x w x c` input, batch 1.
    fn macs(&self, h: usize, w: usize, c: usize) -> (u64, (usize, usize, usize)) {
        let mut total = self.merged.as_ref().map_or(0, |m| m.conv.macs(h, w));
        let mut out = (h, w, 0);
        for (i, b) in self.branches.iter().enumerate() {
            let cin = match self.merged.as_ref().and_then(|m| m.slots[i]) {
                Some((_, ch)) => ch,
                None => c,
            };
            let (m, (oh, ow, oc)) = b.macs(h, w, cin);
            total += m;
            out = (oh, ow, out.2 + oc);
        }
        if let Some(r) = &self.residual {
            total += r.up.macs(out.0, out.1);
            out.2 = r.up.cout;
        }
        (total, out)
    }

    /// The grid this block reads u8 on, where it can: one branch (no merge, no residual) whose
    /// first convolution can.
    fn input_grid(&self) -> Option<QGrid> {
        match &self.branches[..] {
            [b] if self.merged.is_none() && self.residual.is_none() => b.input_grid(),
            _ => None,
        }
    }

    /// The grid on which its merged 1x1 reads the input as u8 alongside the f32 the rest of
    /// the block reads (the shortcut, a pool branch).
    fn shortcut_grid(&self) -> Option<QGrid> {
        self.merged.as_ref().and_then(|m| m.conv.u8_grid())
    }

    /// Run on `x`; with `u8`, int8 convolutions hand the int8 ones after them u8 on their grid
    /// (the output too, on `next`, where this block's last convolution can write it).
    /// `shortcut`: the grid of the next block's int8 1x1 when that block also needs the f32 (a
    /// residual block's shortcut); a residual block then writes both.
    fn run(&self, x: Carry, next: Option<QGrid>, shortcut: Option<QGrid>, u8: bool) -> Carry {
        let b = match &self.branches[..] {
            [b] if self.merged.is_none() && self.residual.is_none() => b,
            _ => return self.run_branches(x, next.or(shortcut).filter(|_| u8), u8),
        };
        let input = x.input();
        let (n, h, w, c) = input.dims();
        let (oh, ow, oc) = b.out_shape(h, w, c);
        let y = Carry::written([n, oh, ow, oc], next.filter(|_| u8 && b.emits_u8()), |dst| b.run(input, dst, u8));
        x.recycle();
        y
    }

    /// The grids of the merged 1x1's columns when all its readers take u8 (`concat`: the grid
    /// of the up-projection, which reads the slots of 1x1-only branches), else `None`.
    fn merged_grids(&self, concat: Option<QGrid>) -> Option<(ColGrids, Vec<Option<QGrid>>)> {
        let m = self.merged.as_ref().filter(|m| m.conv.emits_u8())?;
        let (mut cols, mut slots) = (ColGrids::default(), Vec::new());
        for (b, s) in self.branches.iter().zip(&m.slots) {
            match s {
                Some((_, ch)) => {
                    let g = if b.ops.is_empty() && b.tails.is_empty() { concat? } else { b.input_grid()? };
                    cols.push(g, *ch);
                    slots.push(Some(g));
                }
                None => slots.push(None),
            }
        }
        Some((cols, slots))
    }

    /// Several branches, concatenated, and the residual wrapper. With `u8`, the merged 1x1
    /// writes u8 on its readers' grids, and in a residual block the branches write the
    /// concatenation as u8 on the up-projection's grid, so only the block input (the f32
    /// shortcut) is quantized, and not even that where the block before handed it over as u8
    /// too (`Carry::Dual`); the up-projection then writes this block's output both ways on
    /// `out_grid` (the next block's).
    fn run_branches(&self, x: Carry, out_grid: Option<QGrid>, u8: bool) -> Carry {
        let (x, xq) = match x {
            Carry::F32(a) => (a, None),
            Carry::Dual(a, q, g) => (a, Some((q, g))),
            Carry::U8(..) => unreachable!("a block of several branches reads f32"),
        };
        let merged_in = |m: &Merged1x1| match &xq {
            Some((q, g)) if m.conv.u8_grid().is_some_and(|mg| same_grid(mg, *g)) => In::U8(q.view(), *g),
            _ => In::F32(x.view()),
        };
        let empty = |b: &Branch| b.ops.is_empty() && b.tails.is_empty();
        let up_grid = self.residual.as_ref().and_then(|r| r.up.u8_grid()).filter(|_| u8);
        let mut concat = up_grid.filter(|_| self.branches.iter().all(|b| empty(b) || b.emits_u8()));
        let mut merged_grids = self.merged_grids(concat).filter(|_| u8);
        if concat.is_some() && merged_grids.is_none() && self.branches.iter().any(empty) {
            // a 1x1-only branch's slot is f32: so is the concatenation
            concat = None;
            merged_grids = self.merged_grids(None).filter(|_| u8);
        }
        /// The merged 1x1's output: f32 channels, or u8 slot maps one after the other.
        enum Merged {
            F32(Act),
            Slots(Act<u8>),
        }
        let merged_out = self.merged.as_ref().map(|m| match &merged_grids {
            Some((cols, _)) => {
                // each slot a dense map: the 3x3s after it read whole kernel rows in place
                let slots: Vec<(usize, usize)> = m.slots.iter().flatten().copied().collect();
                let mut y = Act::<u8>::for_overwrite(x.n, x.h, x.w, m.conv.cout);
                let dst = Dst::U8Slots { data: &mut y.data, slots: &slots, grids: cols };
                m.conv.run_to(merged_in(m), dst, StoreMode::Store { relu: true });
                Merged::Slots(y)
            }
            None => Merged::F32(m.conv.run_carry(merged_in(m), None).into_f32()),
        });
        xq.into_iter().for_each(|(q, _)| q.recycle());
        let inputs: Vec<Option<In>> = match (&self.merged, &merged_out) {
            (Some(m), Some(Merged::F32(h))) => m.slots.iter().map(|s| s.map(|(o, c)| In::F32(h.slice(o, c)))).collect(),
            (Some(m), Some(Merged::Slots(q))) => {
                let grids = &merged_grids.as_ref().expect("u8 merged output has grids").1;
                let pixels = q.n * q.h * q.w;
                let slot = |(o, c): (usize, usize)| View {
                    data: &q.data[pixels * o..pixels * (o + c)],
                    ld: c,
                    c0: 0,
                    c,
                    ..q.view()
                };
                m.slots.iter().zip(grids).map(|(s, g)| s.zip(*g).map(|(s, g)| In::U8(slot(s), g))).collect()
            }
            _ => vec![None; self.branches.len()],
        };
        let shapes: Vec<_> = self
            .branches
            .iter()
            .zip(&inputs)
            .map(|(b, i)| {
                let (_, h, w, c) = i.unwrap_or(In::F32(x.view())).dims();
                b.out_shape(h, w, c)
            })
            .collect();
        let (oh, ow) = (shapes[0].0, shapes[0].1);
        let ctot: usize = shapes.iter().map(|s| s.2).sum();
        let concat_grids = concat.map(|g| ColGrids::of(g, ctot));
        let mut out = match concat {
            Some(g) => Carry::U8(Act::for_overwrite(x.n, oh, ow, ctot), g),
            None => Carry::F32(Act::for_overwrite(x.n, oh, ow, ctot)),
        };
        let mut off = 0;
        for ((b, s), input) in self.branches.iter().zip(&shapes).zip(&inputs) {
            let dst = match (&mut out, &concat_grids) {
                (Carry::F32(o), _) => Dst::F32 { data: &mut o.data, ld: ctot, off },
                (Carry::U8(o, _), Some(grids)) => Dst::U8 { data: &mut o.data, ld: ctot, off, grids },
                (Carry::U8(..), None) => unreachable!("a u8 concatenation has grids"),
                (Carry::Dual(..), _) => unreachable!("a concatenation is f32 or u8"),
            };
            match (input, dst) {
                // a branch that was only its 1x1: copy the slice into place
                (Some(In::F32(i)), Dst::F32 { data, .. }) if empty(b) => i.copy_into(data, ctot, off),
                (Some(In::U8(i, _)), Dst::U8 { data, .. }) if empty(b) => i.copy_into(data, ctot, off),
                (_, _) if empty(b) => unreachable!("a 1x1-only slot has the concatenation's type"),
                (Some(i), dst) => b.run(*i, dst, u8),
                (None, dst) => b.run(In::F32(x.view()), dst, u8),
            }
            off += s.2;
        }
        match merged_out {
            Some(Merged::F32(h)) => h.recycle(),
            Some(Merged::Slots(q)) => q.recycle(),
            None => {}
        }
        let Some(Residual { up, scale, relu, shortcut }) = &self.residual else {
            x.recycle();
            return out;
        };
        // the shortcut sum in place in `x`, or the plain counterpart's own output
        let (mut y, mode) = match shortcut {
            true => (x, StoreMode::Residual { scale: *scale, relu: *relu }),
            false => {
                let n = x.n;
                x.recycle();
                (Act::for_overwrite(n, oh, ow, up.cout), StoreMode::Store { relu: *relu })
            }
        };
        let y = match out_grid.filter(|_| up.emits_u8()) {
            Some(g) => {
                let mut q = Act::<u8>::for_overwrite(y.n, y.h, y.w, y.c);
                let grids = ColGrids::of(g, y.c);
                up.run_to(out.input(), Dst::Dual { data: &mut y.data, u8: &mut q.data, grids: &grids }, mode);
                Carry::Dual(y, q, g)
            }
            None => {
                let c = y.c;
                up.run_to(out.input(), Dst::F32 { data: &mut y.data, ld: c, off: 0 }, mode);
                Carry::F32(y)
            }
        };
        out.recycle();
        y
    }
}

/// A dense layer `y = x W + b`, `W` as `[din, dout]` (packed).
#[derive(Clone, Debug)]
pub struct Dense {
    w: PackedB,
    b: Vec<f32>,
}

impl Dense {
    /// From weights `[din, dout]` (row-major) and bias.
    pub fn new(w: &[f32], din: usize, dout: usize, b: Vec<f32>) -> Self {
        Self { w: PackedB::new(w, din, dout), b }
    }

    pub(crate) fn dout(&self) -> usize {
        self.w.n()
    }

    pub(crate) fn din(&self) -> usize {
        self.w.k()
    }

    /// Weights `[din, dout]` and bias.
    pub(crate) fn matrix(&self) -> (Vec<f32>, Vec<f32>) {
        (self.w.unpack(), self.b.clone())
    }

    fn macs(&self) -> u64 {
        (self.w.k() * self.w.n()) as u64
    }

    pub(crate) fn run(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.dout()];
        let epi = sgemm::Epilogue { bias: Some(&self.b), alpha: 1.0, load: false, relu: false };
        sgemm::gemm(n, Rows::Dense { data: x, ld: self.w.k() }, &self.w, &mut y, self.dout(), 0, epi);
        y
    }
}

/// One image's pass: the trunk's output and the kept stage outputs.
type Pass = (Act, Vec<Act>);

/// Called with each `feature_info` stage's output.
pub type Tap<'a> = dyn FnMut(usize, &Act) + Send + 'a;

/// A whole network, frozen for inference (built by `crate::lower`).
#[derive(Clone, Debug)]
pub struct Engine {
    pub(crate) kind: ModelKind,
    pub(crate) width: f64,
    pub(crate) blocks: Vec<Block>,
    /// Index of the block after which each `feature_info` stage ends.
    pub(crate) stage_ends: Vec<usize>,
    /// facenet's `last_linear` + `last_bn`, folded.
    pub(crate) bottleneck: Option<Dense>,
    pub(crate) classifier: Option<Dense>,
    /// int8 convolutions hand u8 to the int8 convolutions after them (on by default; off, each
    /// quantizes its f32 input itself, with the same result bit for bit).
    pub(crate) u8_dataflow: bool,
}

impl Engine {
    /// Turn the u8 dataflow between int8 convolutions on or off (A/B runs, tests).
    pub fn set_u8_dataflow(&mut self, on: bool) {
        self.u8_dataflow = on;
    }

    /// How many convolutions run as Winograd, of all.
    pub fn winograd_count(&mut self) -> (usize, usize) {
        let convs = self.convs_mut();
        (convs.iter().filter(|c| c.is_winograd()).count(), convs.len())
    }

    /// Every convolution, in a fixed order (blocks in turn; in a block the merged 1x1, the
    /// branches' ops and tails, the residual up-projection): how `crate::quant` names them.
    pub fn convs_mut(&mut self) -> Vec<&mut Conv> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            if let Some(m) = &mut b.merged {
                out.push(&mut m.conv);
            }
            for br in &mut b.branches {
                for op in &mut br.ops {
                    if let Op::Conv(c) = op {
                        out.push(&mut **c);
                    }
                }
                out.extend(br.tails.iter_mut());
            }
            if let Some(r) = &mut b.residual {
                out.push(&mut r.up);
            }
        }
        out
    }

    /// The dense layers of the head by name (`bottleneck`, `classifier`).
    pub(crate) fn dense_layers(&self) -> Vec<(&'static str, &Dense)> {
        [("bottleneck", self.bottleneck.as_ref()), ("classifier", self.classifier.as_ref())]
            .into_iter()
            .filter_map(|(n, d)| d.map(|d| (n, d)))
            .collect()
    }

    pub(crate) fn dense_layers_mut(&mut self) -> Vec<(&'static str, &mut Dense)> {
        [("bottleneck", self.bottleneck.as_mut()), ("classifier", self.classifier.as_mut())]
            .into_iter()
            .filter_map(|(n, d)| d.map(|d| (n, d)))
            .collect()
    }

    /// Convolutions running int8, of all.
    pub fn int8_convs(&mut self) -> (usize, usize) {
        let c = self.convs_mut();
        (c.iter().filter(|c| c.is_int8()).count(), c.len())
    }

    /// Per stage, the output shape `[1, C, H, W]` and multiply-accumulates on an `s x s` input
    /// (batch 1); last, the head's `[1, classes]` and MACs.
    pub fn shapes_and_macs(&self, s: usize) -> Vec<(Vec<usize>, u64)> {
        let mut rows = Vec::new();
        let (mut shape, mut acc) = ((s, s, 3), 0u64);
        for (i, b) in self.blocks.iter().enumerate() {
            let (m, out) = b.macs(shape.0, shape.1, shape.2);
            acc += m;
            shape = out;
            if self.stage_ends.contains(&i) {
                rows.push((vec![1, shape.2, shape.0, shape.1], std::mem::take(&mut acc)));
            }
        }
        let head: Vec<&Dense> = self.bottleneck.iter().chain(&self.classifier).collect();
        let out = head.last().map_or(shape.2, |d| d.dout());
        rows.push((vec![1, out], head.iter().map(|d| d.macs()).sum()));
        rows
    }

    pub fn width(&self) -> f64 {
        self.width
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    pub fn num_classes(&self) -> usize {
        self.classifier.as_ref().map_or(0, |d| d.dout())
    }

    /// Trunk, calling `tap(stage, &output)` at each `feature_info` stage end.
    pub fn forward_features_tapped(&self, x: Act, tap: &mut (dyn FnMut(usize, &Act) + Send)) -> Act {
        self.trunk(x, Some(tap))
    }

    pub fn forward_features(&self, x: Act) -> Act {
        self.trunk(x, None)
    }

    /// The blocks in turn, image by image when batched: one image's activations (at most
    /// ~1.5 MiB past the stem) stay in the caches, a batch's (8 x) do not, and nothing in the
    /// network gains from a taller GEMM as much as it loses to the memory traffic (BENCHMARKS.md,
    /// 2026-12-02 fourth session). Whole rounds of images run one per thread, each pass with
    /// serial GEMMs (no synchronisation inside the pass); the remainder with parallel GEMMs. Each
    /// image's result is the same as alone (a GEMM's sums do not depend on its task split).
    fn trunk(&self, x: Act, tap: Option<&mut Tap<'_>>) -> Act {
        let keep = tap.is_some();
        // Run on a pool worker: each GEMM's tasks are then pushed to the local queue instead of
        // being injected from outside and waited for with a sleep/wake.
        let outs: Vec<Pass> = rayon::scope(|s| {
            if x.n == 1 {
                return vec![with_pool_awake(s, || self.blocks_on(x, keep))];
            }
            let threads = rayon::current_num_threads().max(1);
            let rounds = if threads > 1 { x.n / threads * threads } else { 0 };
            let mut outs: Vec<_> =
                (0..rounds).into_par_iter().map(|i| sgemm::serial(|| self.blocks_on(x.image(i), keep))).collect();
            outs.extend((rounds..x.n).map(|i| self.blocks_on(x.image(i), keep)));
            outs
        });
        // the batch again, stage by stage: images are the outermost NHWC dimension
        let join = |pick: &dyn Fn(&Pass) -> &Act| {
            let a = pick(&outs[0]);
            let mut data = Vec::with_capacity(a.data.len() * outs.len());
            outs.iter().for_each(|o| data.extend_from_slice(&pick(o).data));
            Act { n: outs.len(), data, ..a.clone_shape() }
        };
        if let Some(t) = tap {
            // stage `s`'s output is the `s`-th kept (`stage_ends` is in block order)
            for s in 0..outs[0].1.len() {
                match outs.len() {
                    1 => t(s, &outs[0].1[s]),
                    _ => t(s, &join(&|o| &o.1[s])),
                }
            }
        }
        if outs.len() == 1 {
            return outs.into_iter().next().map(|o| o.0).expect("one image");
        }
        join(&|o| &o.0)
    }

    /// Every block on one image; with `keep`, a copy of each `feature_info` stage's output.
    fn blocks_on(&self, x: Act, keep: bool) -> Pass {
        let mut taps = Vec::new();
        let mut x = Carry::F32(x);
        for (j, b) in self.blocks.iter().enumerate() {
            let tapped = keep && self.stage_ends.contains(&j);
            let after = self.blocks.get(j + 1).filter(|_| self.u8_dataflow && !tapped);
            let (next, shortcut) = (after.and_then(Block::input_grid), after.and_then(Block::shortcut_grid));
            x = b.run(x, next, shortcut, self.u8_dataflow);
            if let (true, Carry::F32(a)) = (tapped, &x) {
                taps.push(a.clone());
            }
        }
        // the next pass may run on another thread: hold no buffers between passes
        buffers::clear();
        (x.into_f32(), taps)
    }

    /// Global average pool (+ facenet bottleneck): `[n, d]` row-major and `d`.
    pub fn pre_logits(&self, f: &Act) -> (Vec<f32>, usize) {
        let hw = f.h * f.w;
        let mut pooled = vec![0.0f32; f.n * f.c];
        for (b, out) in pooled.chunks_mut(f.c).enumerate() {
            for p in 0..hw {
                let src = &f.data[(b * hw + p) * f.c..][..f.c];
                out.iter_mut().zip(src).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= hw as f32);
        }
        match &self.bottleneck {
            Some(d) => (d.run(&pooled, f.n), d.dout()),
            None => (pooled, f.c),
        }
    }

    /// Classifier on pre-logits (identity when the model has none).
    pub fn logits(&self, pre: &[f32], n: usize) -> (Vec<f32>, usize) {
        match &self.classifier {
            Some(d) => (d.run(pre, n), d.dout()),
            None => (pre.to_vec(), pre.len() / n.max(1)),
        }
    }
}

/// `INCEPTION_SPIN=0` turns [`with_pool_awake`] off (A/B runs); on by default.
fn spin_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("INCEPTION_SPIN").map_or(true, |v| v != "0"))
}

thread_local! {
    /// Set on a worker while it runs a pass under [`with_pool_awake`], or spins for one.
    static IN_PASS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`IN_PASS`] when dropped.
struct Busy;
impl Drop for Busy {
    fn drop(&mut self) {
        IN_PASS.with(|p| p.set(false));
    }
}

/// How long a kept-awake worker spins without finding a task before it goes back to sleep.
const SPIN_IDLE: std::time::Duration = std::time::Duration::from_millis(2);

/// Run `pass` (one image, parallel GEMMs) with the pool's other workers kept awake: each
/// spins taking tasks (`rayon::yield_now`) instead of falling asleep between two parallel
/// sections and being woken for the next (~340 times an image, 10-55 us each after a serial
/// gap; BENCHMARKS.md). A worker that is itself running a pass, or that finds nothing to do
/// for [`SPIN_IDLE`], leaves at once; all leave when the pass ends (or panics).
fn with_pool_awake<'s, R>(s: &rayon::Scope<'s>, pass: impl FnOnce() -> R) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let threads = rayon::current_num_threads();
    if threads < 2 || !spin_enabled() || IN_PASS.with(|p| p.get()) {
        return pass();
    }
    let done = Arc::new(AtomicBool::new(false));
    for _ in 1..threads {
        let done = Arc::clone(&done);
        s.spawn(move |_| {
            // a worker running a pass (waiting in it) or already spinning for one stays as it is
            if IN_PASS.with(|p| p.replace(true)) {
                return;
            }
            let _busy = Busy;
            let mut idle = std::time::Instant::now();
            let mut spins = 0u32;
            while !done.load(Ordering::Acquire) {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => spins = 0,
                    Some(rayon::Yield::Idle) => {
                        spins += 1;
                        if spins == 1 {
                            idle = std::time::Instant::now();
                        } else if spins.is_multiple_of(64) && idle.elapsed() > SPIN_IDLE {
                            return;
                        }
                        std::hint::spin_loop();
                    }
                    None => return,
                }
            }
        });
    }
    // ends the spinning however the pass leaves
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let _done = Done(done);
    IN_PASS.with(|p| p.set(true));
    let _busy = Busy;
    pass()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool")
    }

    fn work(seed: u64) -> u64 {
        (0..64u64).map(|i| (0..2000u64).into_par_iter().map(|j| (i * j) ^ seed).sum::<u64>()).sum()
    }

    /// Passes kept awake give the same results, also two at once on a two-thread pool.
    #[test]
    fn passes_kept_awake_agree_alone_and_concurrently() {
        let pool = pool();
        let want = (work(1), work(2));
        let one = pool.install(|| rayon::scope(|s| with_pool_awake(s, || work(1))));
        assert_eq!(one, want.0);
        let both = pool.install(|| {
            rayon::join(
                || rayon::scope(|s| with_pool_awake(s, || work(1))),
                || rayon::scope(|s| with_pool_awake(s, || work(2))),
            )
        });
        assert_eq!(both, want);
    }

    /// A pass that panics releases the spinning worker: the panic comes back, the pool still
    /// runs work.
    #[test]
    fn a_panicking_pass_releases_the_pool() {
        let pool = pool();
        let r = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rayon::scope(|s| {
                    with_pool_awake(s, || {
                        work(3);
                        panic!("a failing pass")
                    })
                })
            }))
        });
        assert!(r.is_err());
        assert_eq!(pool.install(|| rayon::scope(|s| with_pool_awake(s, || work(4)))), work(4));
    }
}
