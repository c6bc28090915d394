//! Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) for the frozen engine's 3x3 stride-1 convolutions: a 4x4 output
//! tile comes from a 6x6 input tile with 36 products per (input, output) channel pair instead
//! of 144, a quarter of the multiply-adds.
//!
//! The tiles are cut into chunks, one task each. A chunk transforms its input tiles
//! (`V = Bᵀ d B`, into 36 matrices `[tiles, cin]`), runs 36 GEMMs against the transformed
//! weights (`U = G g Gᵀ`, 36 matrices `[cin, cout]` transformed and packed once at load), and
//! transforms back (`Aᵀ M A`) applying bias, the residual scale-add and ReLU as it stores the
//! tile, so nothing of a layer but its chunk's buffers exists at once. Interpolation points
//! 0, ±1, ±2: the transforms below are the matrices of that paper written out row by row.
//!
//! Whether a layer runs this way is decided at load ([`Winograd::for_conv`]): channels wide
//! enough that the transforms pay, and the measured error against the direct convolution on a
//! random input within [`MAX_REL_ERROR`].

use std::cell::RefCell;

use rayon::prelude::*;

use crate::engine::{Act, StoreMode};
use crate::sgemm::{self, Epilogue, PackedB, Rows};

/// Channels transformed at once (one or two vector registers of lanes).
const CB: usize = 16;
type Lanes = [f32; CB];

/// A layer keeps its direct convolution when Winograd's result on a random input differs from
/// it by more than this, relative to the largest output (16 to 48 channels measure 1e-6 to
/// 4e-6 in the tests; the full-model parity budget is 1e-4).
pub const MAX_REL_ERROR: f32 = 1e-5;

/// `INCEPTION_WINOGRAD=0` turns the fast algorithm off (A/B runs); on by default.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("INCEPTION_WINOGRAD").map_or(true, |v| v != "0"))
}

/// A 3x3 stride-1 convolution's transformed weights.
#[derive(Clone, Debug)]
pub struct Winograd {
    cin: usize,
    cout: usize,
    pad: [usize; 2],
    /// `U[t]`, `t = 6 * i + j`: element `(i, j)` of `G g Gᵀ` for every `(ci, co)`.
    u: Vec<PackedB>,
}

impl Winograd {
    /// From weights `[9 * cin, cout]`, tap order `(ky, kx, ci)` (the direct convolution's).
    pub fn new(w: &[f32], cin: usize, cout: usize, pad: [usize; 2]) -> Self {
        assert_eq!(w.len(), 9 * cin * cout, "weights of a 3x3 convolution");
        // G (6 x 3), rows in f64 so the transformed weights are rounded once
        const G: [[f64; 3]; 6] = [
            [1.0 / 4.0, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        let mut u = vec![vec![0f32; cin * cout]; 36];
        for ci in 0..cin {
            for co in 0..cout {
                let g = |ky: usize, kx: usize| w[((ky * 3 + kx) * cin + ci) * cout + co] as f64;
                for i in 0..6 {
                    // (G g)[i][kx]
                    let gg: [f64; 3] = std::array::from_fn(|kx| (0..3).map(|ky| G[i][ky] * g(ky, kx)).sum());
                    for j in 0..6 {
                        let v: f64 = (0..3).map(|kx| gg[kx] * G[j][kx]).sum();
                        u[6 * i + j][ci * cout + co] = v as f32;
                    }
                }
            }
        }
        let u = u.iter().map(|m| PackedB::new(m, cin, cout)).collect();
        Self { cin, cout, pad, u }
    }

    /// The fast algorithm for a convolution, if it pays and is accurate: 3x3, stride 1,
    /// padding 0 or 1, at least 16 channels in and out, the error measured against `direct`
    /// (the convolution's own result, `x -> y`) within [`MAX_REL_ERROR`].
    pub(crate) fn for_conv(
        w: &[f32],
        (kernel, stride, pad): ([usize; 2], usize, [usize; 2]),
        cin: usize,
        cout: usize,
        (bias, relu): (&[f32], bool),
        direct: impl Fn(&Act) -> Act,
    ) -> Option<Self> {
        if !enabled() || kernel != [3, 3] || stride != 1 || pad[0] > 1 || pad[1] > 1 || cin < 16 || cout < 16 {
            return None;
        }
        let wino = Self::new(w, cin, cout, pad);
        (wino.error(bias, relu, &direct) <= MAX_REL_ERROR).then_some(wino)
    }

    /// Largest difference to `direct` (the same convolution with `bias`, then ReLU if `relu`)
    /// on a random 9x11 input, relative to its largest output.
    pub fn error(&self, bias: &[f32], relu: bool, direct: impl Fn(&Act) -> Act) -> f32 {
        let mut x = Act::zeros(1, 9, 11, self.cin);
        let mut s = 0x9e37_79b9u32;
        for v in &mut x.data {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *v = (s >> 8) as f32 / (1u32 << 24) as f32;
        }
        let want = direct(&x);
        let mut got = Act::zeros(1, want.h, want.w, self.cout);
        self.run_into(&x, &mut got.data, self.cout, 0, bias, StoreMode::Store { relu });
        let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        let diff = want.data.iter().zip(&got.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        if diff.is_finite() { diff / scale } else { f32::INFINITY }
    }

    /// Run on `x`, writing channels `[off, off + cout)` of `dst` (row stride `ld`).
    pub(crate) fn run_into(&self, x: &Act, dst: &mut [f32], ld: usize, off: usize, bias: &[f32], mode: StoreMode) {
        assert_eq!(x.c, self.cin, "input channels");
        let (oh, ow) = (x.h + 2 * self.pad[0] - 2, x.w + 2 * self.pad[1] - 2);
        assert!(off + self.cout <= ld && dst.len() >= x.n * oh * ow * ld, "output too small");
        let (th, tw) = (oh.div_ceil(4), ow.div_ceil(4));
        let tiles = x.n * th * tw;
        // chunks whose transformed tiles (36 x (cin + cout) floats each) fit in ~384 KiB of
        // L2, but at least 30 tiles for the GEMMs (fewer measured slower at 256 channels), and
        // a multiple of the thread count in number
        let threads = rayon::current_num_threads().max(1);
        let per = (384 * 1024 / (36 * 4 * (self.cin + self.cout))).clamp(30, 120);
        let chunks = tiles.div_ceil(per).next_multiple_of(threads).min(tiles.div_ceil(6).max(1));
        let per = tiles.div_ceil(chunks);
        let out = Out(dst.as_mut_ptr());
        let geo = Geometry { h: x.h, w: x.w, oh, ow, th, tw, pad: self.pad };
        let task = |ch: usize| {
            let (t0, t1) = (ch * per, ((ch + 1) * per).min(tiles));
            if t0 >= t1 {
                return;
            }
            BUFS.with(|b| {
                let (v, m) = &mut *b.borrow_mut();
                v.resize(36 * (t1 - t0) * self.cin, 0.0);
                m.resize(36 * (t1 - t0) * self.cout, 0.0);
                let nt = t1 - t0;
                transform_input(&x.data, self.cin, &geo, t0, t1, v);
                sgemm::serial(|| {
                    for (t, u) in self.u.iter().enumerate() {
                        let a = Rows::Dense { data: &v[t * nt * self.cin..][..nt * self.cin], ld: self.cin };
                        let c = &mut m[t * nt * self.cout..][..nt * self.cout];
                        sgemm::gemm(nt, a, u, c, self.cout, 0, Epilogue { bias: None, alpha: 1.0, load: false, relu: false });
                    }
                });
                // SAFETY: the chunk's tiles cover output rows no other chunk writes, and the
                // assert above keeps every row inside `dst`.
                unsafe { transform_output(m, self.cout, &geo, t0, t1, out, ld, off, bias, mode) };
            });
        };
        if chunks == 1 {
            task(0);
        } else {
            (0..chunks).into_par_iter().for_each(task);
        }
    }
}

thread_local! {
    /// A chunk's transformed input and GEMM output, kept between calls.
    static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The output pointer shared by chunks that write disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: chunks write disjoint output rows.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Input `h x w`, output `oh x ow` in `th x tw` tiles of 4x4.
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    th: usize,
    tw: usize,
    pad: [usize; 2],
}

impl Geometry {
    /// Tile `t`'s image, output row and output column.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        (t / (self.th * self.tw), (t / self.tw) % self.th * 4, t % self.tw * 4)
    }
}

/// `Bᵀ` applied to six rows of lanes.
#[inline(always)]
fn bt(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut o = [[0.0; CB]; 6];
    for l in 0..CB {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        o[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        o[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        o[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        o[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        o[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        o[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    o
}

/// `Aᵀ` applied to six rows of lanes (four out).
#[inline(always)]
fn at(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut o = [[0.0; CB]; 4];
    for l in 0..CB {
        let [m0, m1, m2, m3, m4, m5] = [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]];
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o[0][l] = m0 + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m5;
    }
    o
}

/// `V[t][tile][c]` for tiles `[t0, t1)`: `Bᵀ d B` of each tile's 6x6 input window (zeros
/// outside the image), `CB` channels at a time.
fn transform_input(x: &[f32], cin: usize, g: &Geometry, t0: usize, t1: usize, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if sgemm::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { transform_input_avx2(x, cin, g, t0, t1, v) };
    }
    transform_input_body(x, cin, g, t0, t1, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_input_avx2(x: &[f32], cin: usize, g: &Geometry, t0: usize, t1: usize, v: &mut [f32]) {
    transform_input_body(x, cin, g, t0, t1, v)
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // the loop index picks a column of `r`
fn transform_input_body(x: &[f32], cin: usize, g: &Geometry, t0: usize, t1: usize, v: &mut [f32]) {
    let nt = t1 - t0;
    for t in t0..t1 {
        let (b, oy, ox) = g.tile(t);
        let (y0, x0) = (oy as isize - g.pad[0] as isize, ox as isize - g.pad[1] as isize);
        for c0 in (0..cin).step_by(CB) {
            let len = CB.min(cin - c0);
            // rows of the window, each transformed along x: r[y][j]
            let mut r = [[[0.0; CB]; 6]; 6];
            for (dy, ry) in r.iter_mut().enumerate() {
                let iy = y0 + dy as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let mut d = [[0.0; CB]; 6];
                for (dx, dd) in d.iter_mut().enumerate() {
                    let ix = x0 + dx as isize;
                    if ix >= 0 && ix < g.w as isize {
                        let src = ((b * g.h + iy as usize) * g.w + ix as usize) * cin + c0;
                        dd[..len].copy_from_slice(&x[src..src + len]);
                    }
                }
                *ry = bt(&d);
            }
            // then along y: V[i][j] = Bᵀ_i (r[.][j])
            for j in 0..6 {
                let col: [Lanes; 6] = std::array::from_fn(|y| r[y][j]);
                for (i, vi) in bt(&col).iter().enumerate() {
                    let dst = ((6 * i + j) * nt + (t - t0)) * cin + c0;
                    v[dst..dst + len].copy_from_slice(&vi[..len]);
                }
            }
        }
    }
}

/// `Aᵀ M A` of each tile's 36 GEMM outputs, stored with bias, residual and ReLU.
///
/// # Safety
/// Rows of tiles `[t0, t1)` at `out` (row stride `ld`, channels `[off, off + cout)`) are
/// inside the output and written by nobody else.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output(
    m: &[f32],
    cout: usize,
    g: &Geometry,
    t0: usize,
    t1: usize,
    out: Out,
    ld: usize,
    off: usize,
    bias: &[f32],
    mode: StoreMode,
) {
    #[cfg(target_arch = "x86_64")]
    if sgemm::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; the rest is the caller's promise.
        return unsafe { transform_output_avx2(m, cout, g, t0, t1, out, ld, off, bias, mode) };
    }
    // SAFETY: the caller's promise.
    unsafe { transform_output_body(m, cout, g, t0, t1, out, ld, off, bias, mode) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output_avx2(
    m: &[f32],
    cout: usize,
    g: &Geometry,
    t0: usize,
    t1: usize,
    out: Out,
    ld: usize,
    off: usize,
    bias: &[f32],
    mode: StoreMode,
) {
    // SAFETY: the caller's promise.
    unsafe { transform_output_body(m, cout, g, t0, t1, out, ld, off, bias, mode) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // the loop index picks a column of `r`
unsafe fn transform_output_body(
    m: &[f32],
    cout: usize,
    g: &Geometry,
    t0: usize,
    t1: usize,
    out: Out,
    ld: usize,
    off: usize,
    bias: &[f32],
    mode: StoreMode,
) {
    let nt = t1 - t0;
    let (alpha, load, relu) = match mode {
        StoreMode::Store { relu } => (1.0, false, relu),
        StoreMode::Residual { scale, relu } => (scale, true, relu),
    };
    for t in t0..t1 {
        let (b, oy, ox) = g.tile(t);
        for c0 in (0..cout).step_by(CB) {
            let len = CB.min(cout - c0);
            // rows of M, each transformed along j: r[i][q]
            let mut r = [[[0.0; CB]; 4]; 6];
            for (i, ri) in r.iter_mut().enumerate() {
                let row: [Lanes; 6] = std::array::from_fn(|j| {
                    let src = ((6 * i + j) * nt + (t - t0)) * cout + c0;
                    let mut l = [0.0; CB];
                    l[..len].copy_from_slice(&m[src..src + len]);
                    l
                });
                *ri = at(&row);
            }
            let mut bl = [0.0; CB];
            bl[..len].copy_from_slice(&bias[c0..c0 + len]);
            for q in 0..4 {
                if ox + q >= g.ow {
                    break;
                }
                let col: [Lanes; 6] = std::array::from_fn(|i| r[i][q]);
                for (p, y) in at(&col).iter().enumerate() {
                    if oy + p >= g.oh {
                        break;
                    }
                    let row = (b * g.oh + oy + p) * g.ow + ox + q;
                    // SAFETY: the caller's promise: this row is inside the output and ours.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(row * ld + off + c0), len) };
                    for (l, d) in dst.iter_mut().enumerate() {
                        let mut v = alpha * (y[l] + bl[l]);
                        if load {
                            v += *d;
                        }
                        *d = if relu { v.max(0.0) } else { v };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Conv;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Against the direct convolution: odd sizes (partial tiles), both paddings, channel
    /// counts off the lane width, batch 2, a column offset into a wider output, both stores.
    #[test]
    fn matches_the_direct_convolution() {
        for &(n, h, w, cin, cout, pad) in
            &[(1, 9, 11, 16, 16, 1), (2, 17, 13, 19, 37, 1), (1, 35, 35, 32, 48, 1), (2, 10, 7, 24, 20, 0), (1, 6, 6, 48, 33, 0)]
        {
            let wts = data(9 * cin * cout, 1 + cin as u32);
            let bias = data(cout, 7);
            let direct = Conv::from_matrix(&wts, [3, 3], cin, cout, 1, [pad, pad], bias.clone(), false);
            let wino = Winograd::new(&wts, cin, cout, [pad, pad]);
            let mut x = Act::zeros(n, h, w, cin);
            x.data = data(x.data.len(), 3);
            let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let ld = cout + 5;
            for residual in [false, true] {
                let mode = if residual {
                    StoreMode::Residual { scale: 0.3, relu: true }
                } else {
                    StoreMode::Store { relu: false }
                };
                let init = data(n * oh * ow * ld, 11);
                let (mut want, mut got) = (init.clone(), init.clone());
                direct.run_direct_into(&x, &mut want, ld, 3, mode);
                wino.run_into(&x, &mut got, ld, 3, &bias, mode);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("{n}x{h}x{w}x{cin}->{cout} pad {pad} residual {residual}: {:.2e}", diff / scale);
                assert!(diff / scale < MAX_REL_ERROR, "{n}x{h}x{w}x{cin}->{cout} pad {pad} residual {residual}");
            }
        }
    }

    #[test]
    fn chosen_only_where_it_applies() {
        let direct = |x: &Act| x.clone();
        let w = data(9 * 32 * 32, 1);
        let none = |k, s, p, c| Winograd::for_conv(&w, (k, s, p), c, c, (&[0.0; 32], false), direct).is_none();
        assert!(none([3, 3], 2, [1, 1], 32), "stride 2");
        assert!(none([3, 3], 1, [2, 2], 32), "padding 2");
        assert!(none([3, 3], 1, [1, 1], 8), "8 channels");
        let c = Conv::from_matrix(&w, [3, 3], 32, 32, 1, [1, 1], vec![0.1; 32], true);
        assert_eq!(c.is_winograd(), enabled());
        let c = Conv::from_matrix(&w[..32 * 32], [1, 1], 32, 32, 1, [0, 0], vec![0.1; 32], true);
        assert!(!c.is_winograd());
    }
}
