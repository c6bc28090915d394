//! Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016) for the frozen engine's stride-1 convolutions: F(4x4, 3x3) for 3x3 kernels
//! (a 4x4 output tile from a 6x6 input tile with 36 products per (input, output) channel pair
//! instead of 144) and 1-D F(m, r) for the 1x7 / 7x1 / 1x3 / 3x1 kernels of Inception-B and -C
//! (`m` outputs from `m + r - 1` products instead of `m * r`).
//!
//! The tiles are cut into chunks, one task each. A chunk transforms its input tiles
//! (`V = Bᵀ d B`, or `Bᵀ d` on a line, into one `[tiles, cin]` matrix per product), runs one
//! GEMM per product against the transformed weights (`U = G g Gᵀ` / `G g`, `[cin, cout]`,
//! transformed and packed once at load), and transforms back (`Aᵀ M A` / `Aᵀ M`) applying bias,
//! the residual scale-add and ReLU as it stores the tile, so nothing of a layer but its chunk's
//! buffers exists at once. F(4x4, 3x3) uses the paper's matrices (points 0, ±1, ±2) written
//! out row by row; the 1-D ones are built at load from their points ([`toom_cook`]).
//!
//! Whether a layer runs this way is decided at load ([`Winograd::for_conv`]): channels wide
//! enough that the transforms pay, and the measured error against the direct convolution on a
//! random input within [`MAX_REL_ERROR`].

use std::cell::RefCell;

use rayon::prelude::*;

use crate::engine::{Act, StoreMode, View};
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

/// A convolution's transformed weights.
#[derive(Clone, Debug)]
pub struct Winograd {
    cin: usize,
    cout: usize,
    kernel: [usize; 2],
    pad: [usize; 2],
    kind: Kind,
    /// One `[cin, cout]` matrix per product of a tile (36, or `n` for a line).
    u: Vec<PackedB>,
}

/// F(4x4, 3x3)'s G (6 x 3), in f64 so the transformed weights are rounded once.
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The left inverse `(Gᵀ G)⁻¹ Gᵀ` (`r x n`) of an `n x r` matrix of full column rank.
fn left_inverse(g: &[f64], n: usize, r: usize) -> Vec<f64> {
    let gtg: Vec<f64> = (0..r * r).map(|e| (0..n).map(|j| g[j * r + e / r] * g[j * r + e % r]).sum()).collect();
    let inv = invert(&gtg, r);
    (0..r * n).map(|e| (0..r).map(|k| inv[(e / n) * r + k] * g[(e % n) * r + k]).sum()).collect()
}

#[derive(Clone, Debug)]
enum Kind {
    /// F(4x4, 3x3): 4x4 output tiles, 36 products.
    Tile,
    /// F(m, r) along one axis, for `1 x r` (`along_w`) and `r x 1` kernels: `m` outputs from
    /// `n = m + r - 1` products; `bt` is `n x n`, `at` is `m x n`, row-major.
    Line { m: usize, n: usize, along_w: bool, bt: Vec<f32>, at: Vec<f32> },
}

/// Interpolation points of the 1-D algorithms, smallest first (then infinity).
const POINTS: [f64; 11] = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1.0 / 3.0, -1.0 / 3.0];

/// Toom-Cook matrices of F(m, r) on `POINTS` and infinity: `(Bᵀ, G, Aᵀ)`, `n x n`, `n x r`,
/// `m x n`, with `n = m + r - 1`. With `V` the evaluation matrix of a degree `n - 1`
/// polynomial at the points (infinity gives the leading coefficient), `G` and `H` those of
/// degrees `r - 1` and `m - 1`, a linear convolution is `V⁻¹ ((G g) ⊙ (H h))`; transposed in `h`
/// it is the correlation `Hᵀ ((G g) ⊙ (V⁻ᵀ d))`: `Bᵀ = V⁻ᵀ`, `Aᵀ = Hᵀ`.
fn toom_cook(m: usize, r: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = m + r - 1;
    let eval = |j: usize, deg: usize, k: usize| -> f64 {
        if j == n - 1 { (k == deg - 1) as u8 as f64 } else { POINTS[j].powi(k as i32) }
    };
    let v: Vec<f64> = (0..n * n).map(|e| eval(e / n, n, e % n)).collect();
    let vinv = invert(&v, n);
    let bt = (0..n * n).map(|e| vinv[(e % n) * n + e / n]).collect();
    let g = (0..n * r).map(|e| eval(e / r, r, e % r)).collect();
    let at = (0..m * n).map(|e| eval(e % n, m, e / n)).collect();
    (bt, g, at)
}

/// The inverse of an `n x n` matrix (Gauss-Jordan with partial pivoting).
fn invert(a: &[f64], n: usize) -> Vec<f64> {
    let mut a = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|e| (e / n == e % n) as u8 as f64).collect();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs())).unwrap_or(col);
        for k in 0..n {
            a.swap(col * n + k, piv * n + k);
            inv.swap(col * n + k, piv * n + k);
        }
        let d = a[col * n + col];
        for k in 0..n {
            a[col * n + k] /= d;
            inv[col * n + k] /= d;
        }
        for i in (0..n).filter(|&i| i != col) {
            let f = a[i * n + col];
            for k in 0..n {
                a[i * n + k] -= f * a[col * n + k];
                inv[i * n + k] -= f * inv[col * n + k];
            }
        }
    }
    inv
}

/// Outputs per line tile of a `1 x r` / `r x 1` kernel: F(6, 3) (2.25x fewer products, error
/// ~7e-7 in the tests) and F(3, 7) (2.33x, ~2e-6 at 40 channels, up to 9e-6 at 224; F(4, 7)
/// measures ~6e-6 already at 40 channels, 9e-6 at 128, and on 17-wide lines it saves only 7% of
/// the products, so F(3, 7) stays).
fn line_outputs(r: usize) -> usize {
    if r == 3 { 6 } else { 3 }
}

impl Winograd {
    /// F(4x4, 3x3) from weights `[9 * cin, cout]`, tap order `(ky, kx, ci)` (the direct
    /// convolution's).
    pub fn new(w: &[f32], cin: usize, cout: usize, pad: [usize; 2]) -> Self {
        assert_eq!(w.len(), 9 * cin * cout, "weights of a 3x3 convolution");
        let mut u = vec![vec![0f32; cin * cout]; 36];
        for ci in 0..cin {
            for co in 0..cout {
                let g = |ky: usize, kx: usize| w[((ky * 3 + kx) * cin + ci) * cout + co] as f64;
                for i in 0..6 {
                    // (G g)[i][kx]
                    let gg: [f64; 3] = std::array::from_fn(|kx| (0..3).map(|ky| G4[i][ky] * g(ky, kx)).sum());
                    for j in 0..6 {
                        let v: f64 = (0..3).map(|kx| gg[kx] * G4[j][kx]).sum();
                        u[6 * i + j][ci * cout + co] = v as f32;
                    }
                }
            }
        }
        let u = u.iter().map(|m| PackedB::new(m, cin, cout)).collect();
        Self { cin, cout, kernel: [3, 3], pad, kind: Kind::Tile, u }
    }

    /// F(m, r) for a `1 x r` or `r x 1` kernel with weights `[r * cin, cout]`.
    pub fn line(w: &[f32], kernel: [usize; 2], m: usize, cin: usize, cout: usize, pad: [usize; 2]) -> Self {
        let (along_w, r) = (kernel[0] == 1, kernel[0].max(kernel[1]));
        assert!(kernel.contains(&1) && w.len() == r * cin * cout && m >= 1, "weights of a 1-D convolution");
        let n = m + r - 1;
        assert!(n <= POINTS.len() + 1, "F({m}, {r}) needs more interpolation points");
        let (bt, g, at) = toom_cook(m, r);
        let mut u = vec![vec![0f32; cin * cout]; n];
        for ci in 0..cin {
            for co in 0..cout {
                for (j, uj) in u.iter_mut().enumerate() {
                    let v: f64 = (0..r).map(|k| g[j * r + k] * w[(k * cin + ci) * cout + co] as f64).sum();
                    uj[ci * cout + co] = v as f32;
                }
            }
        }
        let u = u.iter().map(|m| PackedB::new(m, cin, cout)).collect();
        let (bt, at) = (bt.iter().map(|&v| v as f32).collect(), at.iter().map(|&v| v as f32).collect());
        Self { cin, cout, kernel, pad, kind: Kind::Line { m, n, along_w, bt, at }, u }
    }

    /// The direct convolution's weights `[taps * cin, cout]` back from the transformed ones
    /// (`g = P U Pᵀ` / `P U` with `P` the left inverse of G; f32-rounded, so to ~1e-7).
    pub fn direct_weights(&self) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let u: Vec<Vec<f32>> = self.u.iter().map(|p| p.unpack()).collect();
        let taps = self.kernel[0] * self.kernel[1];
        let mut w = vec![0f32; taps * cin * cout];
        match &self.kind {
            Kind::Tile => {
                let g: Vec<f64> = G4.iter().flatten().copied().collect();
                let p = left_inverse(&g, 6, 3);
                for e in 0..cin * cout {
                    for (ky, kx) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                        let v: f64 = (0..36).map(|t| p[ky * 6 + t / 6] * u[t][e] as f64 * p[kx * 6 + t % 6]).sum();
                        w[(ky * 3 + kx) * cin * cout + e] = v as f32;
                    }
                }
            }
            Kind::Line { n, .. } => {
                let (_, g, _) = toom_cook(n + 1 - taps, taps);
                let p = left_inverse(&g, *n, taps);
                for e in 0..cin * cout {
                    for k in 0..taps {
                        let v: f64 = (0..*n).map(|j| p[k * n + j] * u[j][e] as f64).sum();
                        w[k * cin * cout + e] = v as f32;
                    }
                }
            }
        }
        w
    }

    /// The fast algorithm for a convolution, if it applies and is accurate: stride 1, 3x3
    /// (F(4x4, 3x3)) or 1x7 / 7x1 (F(3, 7)), padding below the kernel, at least 16
    /// channels in and out, the error measured against `direct` (the convolution's own result,
    /// `x -> y`) within [`MAX_REL_ERROR`].
    pub(crate) fn for_conv(
        w: &[f32],
        (kernel, stride, pad): ([usize; 2], usize, [usize; 2]),
        cin: usize,
        cout: usize,
        (bias, relu): (&[f32], bool),
        direct: impl Fn(&Act) -> Act,
    ) -> Option<Self> {
        if !enabled() || stride != 1 || pad[0] >= kernel[0] || pad[1] >= kernel[1] || cin < 16 || cout < 16 {
            return None;
        }
        let wino = match kernel {
            [3, 3] => Self::new(w, cin, cout, pad),
            // 1x3 / 3x1 run on 8x8 maps only, where F(6, 3) measured no faster than the GEMM
            [1, 7] | [7, 1] => Self::line(w, kernel, line_outputs(7), cin, cout, pad),
            _ => return None,
        };
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
    pub(crate) fn run_into<'a>(
        &self,
        x: impl Into<View<'a>>,
        dst: &mut [f32],
        ld: usize,
        off: usize,
        bias: &[f32],
        mode: StoreMode,
    ) {
        let x: View = x.into();
        assert_eq!(x.c, self.cin, "input channels");
        let [kh, kw] = self.kernel;
        let (oh, ow) = (x.h + 2 * self.pad[0] + 1 - kh, x.w + 2 * self.pad[1] + 1 - kw);
        assert!(off + self.cout <= ld && dst.len() >= x.n * oh * ow * ld, "output too small");
        let extent = match self.kind {
            Kind::Tile => [4, 4],
            Kind::Line { m, along_w: true, .. } => [1, m],
            Kind::Line { m, along_w: false, .. } => [m, 1],
        };
        let (th, tw) = (oh.div_ceil(extent[0]), ow.div_ceil(extent[1]));
        let tiles = x.n * th * tw;
        let np = self.u.len();
        // chunks whose transformed tiles (np x (cin + cout) floats each) fit in ~384 KiB of
        // L2, but at least 30 tiles for the GEMMs (fewer measured slower at 256 channels), and
        // a multiple of the thread count in number; each chunk whole strips of the GEMM
        // kernel's rows (26-row GEMMs ran at 96 GFLOP/s on Zen 4, 24 or 30 at 106-110)
        let threads = rayon::current_num_threads().max(1);
        let per = (384 * 1024 / (np * 4 * (self.cin + self.cout))).clamp(30, 480);
        let strips = tiles.div_ceil(sgemm::MR);
        let chunks = tiles.div_ceil(per).next_multiple_of(threads).min(strips);
        let out = Out(dst.as_mut_ptr());
        let geo = Geometry { h: x.h, w: x.w, oh, ow, th, tw, extent };
        let task = |ch: usize| {
            // strips spread evenly: chunk `ch` takes strips [ch * strips / chunks, ...)
            let (s0, s1) = (ch * strips / chunks, (ch + 1) * strips / chunks);
            // (chunks <= strips: every chunk has at least one strip)
            let (t0, t1) = (s0 * sgemm::MR, (s1 * sgemm::MR).min(tiles));
            BUFS.with(|b| {
                let (v, m) = &mut *b.borrow_mut();
                let nt = t1 - t0;
                v.resize(np * nt * self.cin, 0.0);
                m.resize(np * nt * self.cout, 0.0);
                let tiles = Tiles { geo: &geo, t0, t1 };
                self.input(x.rows(), x.ld, &tiles, v);
                sgemm::serial(|| {
                    for (t, u) in self.u.iter().enumerate() {
                        let a = Rows::Dense { data: &v[t * nt * self.cin..][..nt * self.cin], ld: self.cin };
                        let c = &mut m[t * nt * self.cout..][..nt * self.cout];
                        let epi = Epilogue { bias: None, alpha: 1.0, load: false, relu: false };
                        match self.u.get(t + 1) {
                            Some(next) => sgemm::gemm_before(nt, a, u, c, self.cout, 0, epi, next),
                            None => sgemm::gemm(nt, a, u, c, self.cout, 0, epi),
                        }
                    }
                });
                let store = Store { out, ld, off, bias, mode };
                // SAFETY: the chunk's tiles cover output rows no other chunk writes, and the
                // assert above keeps every row inside `dst`.
                unsafe { self.output(m, &tiles, &store) };
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

/// Input `h x w`, output `oh x ow` in `th x tw` tiles of `extent` outputs.
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    th: usize,
    tw: usize,
    extent: [usize; 2],
}

/// Tiles `[t0, t1)` of a geometry: one chunk.
struct Tiles<'a> {
    geo: &'a Geometry,
    t0: usize,
    t1: usize,
}

impl Tiles<'_> {
    /// Each tile's index in the chunk, image, first output row and first output column.
    fn iter(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let g = self.geo;
        (self.t0..self.t1)
            .map(move |t| (t - self.t0, t / (g.th * g.tw), (t / g.tw) % g.th * g.extent[0], t % g.tw * g.extent[1]))
    }

    fn len(&self) -> usize {
        self.t1 - self.t0
    }

    /// `len` channels from `c0` of input pixel `(b, iy, ix)` (pixels `ld` apart) into `d`
    /// (zeros outside).
    #[inline(always)]
    fn read(&self, x: &[f32], (ld, cin): (usize, usize), (b, iy, ix): (usize, isize, isize), c0: usize, d: &mut Lanes) {
        let (g, len) = (self.geo, CB.min(cin - c0));
        if iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize {
            let src = ((b * g.h + iy as usize) * g.w + ix as usize) * ld + c0;
            // whole lanes by constant length: vector moves, not a `memmove` call
            if len == CB { d.copy_from_slice(&x[src..src + CB]) } else { d[..len].copy_from_slice(&x[src..src + len]) }
        } else {
            *d = [0.0; CB];
        }
    }
}

/// Where and how a chunk's results are stored.
struct Store<'a> {
    out: Out,
    ld: usize,
    off: usize,
    bias: &'a [f32],
    mode: StoreMode,
}

impl Store<'_> {
    /// `y + bias` into channels `[c0, c0 + len)` of output pixel `row`, with the residual
    /// scale-add and ReLU of the mode.
    ///
    /// # Safety
    /// `row` is inside the output and no other thread writes it.
    #[inline(always)]
    unsafe fn put(&self, row: usize, c0: usize, len: usize, y: &Lanes) {
        let (alpha, load, relu) = match self.mode {
            StoreMode::Store { relu } => (1.0, false, relu),
            StoreMode::Residual { scale, relu } => (scale, true, relu),
        };
        // SAFETY: the caller's promise.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.out.0.add(row * self.ld + self.off + c0), len) };
        let put = |d: &mut [f32], y: &[f32], b: &[f32]| {
            for ((d, y), b) in d.iter_mut().zip(y).zip(b) {
                let mut v = alpha * (y + b);
                if load {
                    v += *d;
                }
                *d = if relu { v.max(0.0) } else { v };
            }
        };
        // whole lanes by constant length (one vector a step)
        match <&mut [f32; CB]>::try_from(&mut *dst) {
            Ok(d) => put(d, y, &self.bias[c0..c0 + CB]),
            Err(_) => put(dst, y, &self.bias[c0..c0 + len]),
        }
    }
}

/// `Bᵀ` of F(4x4, 3x3) applied to six rows of lanes.
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

/// `Aᵀ` of F(4x4, 3x3) applied to six rows of lanes (four out).
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

/// `Σ_k row[k] d[k]` on lanes (`row` at most `N` long, the zero coefficients skipped). `N`
/// is known at compile time so that the sum stays in a register (a loop over a runtime
/// length kept it in memory: a load and a store per coefficient).
#[inline(always)]
fn dot<const N: usize>(row: &[f32], d: &[Lanes; N]) -> Lanes {
    let mut acc = [0.0; CB];
    for (k, dk) in d.iter().enumerate() {
        let c = row.get(k).copied().unwrap_or(0.0);
        if c != 0.0 {
            for l in 0..CB {
                acc[l] += c * dk[l];
            }
        }
    }
    acc
}

/// One line tile of `n <= N` points: the lanes from `read`, then rows `[0, rows)` of the
/// row-major `rows x n` matrix `mat` (`Bᵀ`, or `Aᵀ`) applied to them, each handed to `out`.
#[inline(always)]
fn line_tile<const N: usize>(
    n: usize,
    mat: &[f32],
    rows: usize,
    read: impl Fn(usize) -> Lanes,
    mut out: impl FnMut(usize, &Lanes),
) {
    let mut d = [[0.0; CB]; N];
    for (k, dk) in d.iter_mut().enumerate().take(n) {
        *dk = read(k);
    }
    for p in 0..rows {
        out(p, &dot::<N>(&mat[p * n..(p + 1) * n], &d));
    }
}

/// [`line_tile`] with F(3, 7)'s nine points unrolled, any other count (up to 12) on twelve.
#[inline(always)]
fn line_tile_n(n: usize, mat: &[f32], rows: usize, read: impl Fn(usize) -> Lanes, out: impl FnMut(usize, &Lanes)) {
    match n {
        9 => line_tile::<9>(n, mat, rows, read, out),
        _ => line_tile::<12>(n, mat, rows, read, out),
    }
}

impl Winograd {
    /// The input transform of a chunk: `V[t][tile][c]`, `CB` channels at a time (input pixels
    /// `ld` apart).
    fn input(&self, x: &[f32], ld: usize, tiles: &Tiles, v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match sgemm::Isa::detect() {
            // SAFETY: the CPU has AVX-512F.
            sgemm::Isa::Avx512 => return unsafe { self.input_avx512(x, ld, tiles, v) },
            // SAFETY: the CPU has AVX2 and FMA.
            sgemm::Isa::Avx2 => return unsafe { self.input_avx2(x, ld, tiles, v) },
            sgemm::Isa::Portable => {}
        }
        self.input_body(x, ld, tiles, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_avx512(&self, x: &[f32], ld: usize, tiles: &Tiles, v: &mut [f32]) {
        self.input_body(x, ld, tiles, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_avx2(&self, x: &[f32], ld: usize, tiles: &Tiles, v: &mut [f32]) {
        self.input_body(x, ld, tiles, v)
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // the loop index picks a column of `r`
    fn input_body(&self, x: &[f32], ld: usize, tiles: &Tiles, v: &mut [f32]) {
        let (cin, nt, [ph, pw]) = (self.cin, tiles.len(), self.pad.map(|p| p as isize));
        // tile `i`, product `t`, channels from `c0`
        let mut put = |t: usize, i: usize, c0: usize, lanes: &Lanes| {
            let len = CB.min(cin - c0);
            let dst = (t * nt + i) * cin + c0;
            if len == CB {
                v[dst..dst + CB].copy_from_slice(lanes)
            } else {
                v[dst..dst + len].copy_from_slice(&lanes[..len])
            }
        };
        for (i, b, oy, ox) in tiles.iter() {
            let (y0, x0) = (oy as isize - ph, ox as isize - pw);
            for c0 in (0..cin).step_by(CB) {
                match &self.kind {
                    Kind::Tile => {
                        // Bᵀ d B: the window's rows along x, then the columns along y
                        let mut r = [[[0.0; CB]; 6]; 6];
                        for (dy, ry) in r.iter_mut().enumerate() {
                            let mut d = [[0.0; CB]; 6];
                            for (dx, dd) in d.iter_mut().enumerate() {
                                tiles.read(x, (ld, cin), (b, y0 + dy as isize, x0 + dx as isize), c0, dd);
                            }
                            *ry = bt(&d);
                        }
                        for j in 0..6 {
                            let col: [Lanes; 6] = std::array::from_fn(|y| r[y][j]);
                            for (k, vk) in bt(&col).iter().enumerate() {
                                put(6 * k + j, i, c0, vk);
                            }
                        }
                    }
                    Kind::Line { n, along_w, bt, .. } => {
                        let read = |k: usize| {
                            let p = if *along_w { (b, y0, x0 + k as isize) } else { (b, y0 + k as isize, x0) };
                            let mut l = [0.0; CB];
                            tiles.read(x, (ld, cin), p, c0, &mut l);
                            l
                        };
                        line_tile_n(*n, bt, *n, read, |k, y| put(k, i, c0, y));
                    }
                }
            }
        }
    }

    /// The output transform of a chunk, stored with bias, residual and ReLU.
    ///
    /// # Safety
    /// The output rows of the chunk's tiles are inside the output and written by nobody else.
    unsafe fn output(&self, m: &[f32], tiles: &Tiles, store: &Store) {
        #[cfg(target_arch = "x86_64")]
        match sgemm::Isa::detect() {
            // SAFETY: the CPU has AVX-512F; the rest is the caller's promise.
            sgemm::Isa::Avx512 => return unsafe { self.output_avx512(m, tiles, store) },
            // SAFETY: the CPU has AVX2 and FMA; the rest is the caller's promise.
            sgemm::Isa::Avx2 => return unsafe { self.output_avx2(m, tiles, store) },
            sgemm::Isa::Portable => {}
        }
        // SAFETY: the caller's promise.
        unsafe { self.output_body(m, tiles, store) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_avx512(&self, m: &[f32], tiles: &Tiles, store: &Store) {
        // SAFETY: the caller's promise.
        unsafe { self.output_body(m, tiles, store) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn output_avx2(&self, m: &[f32], tiles: &Tiles, store: &Store) {
        // SAFETY: the caller's promise.
        unsafe { self.output_body(m, tiles, store) }
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // the loop index picks a column of `r`
    unsafe fn output_body(&self, m: &[f32], tiles: &Tiles, store: &Store) {
        let (cout, nt, g) = (self.cout, tiles.len(), tiles.geo);
        let get = |t: usize, i: usize, c0: usize| {
            let len = CB.min(cout - c0);
            let src = (t * nt + i) * cout + c0;
            let mut l = [0.0; CB];
            if len == CB {
                l.copy_from_slice(&m[src..src + CB])
            } else {
                l[..len].copy_from_slice(&m[src..src + len])
            }
            l
        };
        for (i, b, oy, ox) in tiles.iter() {
            for c0 in (0..cout).step_by(CB) {
                let len = CB.min(cout - c0);
                let row = |y: usize, x: usize| (b * g.oh + y) * g.ow + x;
                match &self.kind {
                    Kind::Tile => {
                        // Aᵀ M A: the rows along j, then the columns along i
                        let mut r = [[[0.0; CB]; 4]; 6];
                        for (k, rk) in r.iter_mut().enumerate() {
                            *rk = at(&std::array::from_fn(|j| get(6 * k + j, i, c0)));
                        }
                        for q in 0..4.min(g.ow - ox) {
                            let col: [Lanes; 6] = std::array::from_fn(|k| r[k][q]);
                            for (p, y) in at(&col).iter().enumerate().take(g.oh - oy) {
                                // SAFETY: the caller's promise: this row is inside and ours.
                                unsafe { store.put(row(oy + p, ox + q), c0, len, y) };
                            }
                        }
                    }
                    Kind::Line { m: mo, n, along_w, at, .. } => {
                        let fit = if *along_w { g.ow - ox } else { g.oh - oy };
                        let out = |p: usize, y: &Lanes| {
                            let r = if *along_w { row(oy, ox + p) } else { row(oy + p, ox) };
                            // SAFETY: as above.
                            unsafe { store.put(r, c0, len, y) };
                        };
                        line_tile_n(*n, at, (*mo).min(fit), |k| get(k, i, c0), out);
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
        for &(n, h, w, cin, cout, pad) in &[
            (1, 9, 11, 16, 16, 1),
            (2, 17, 13, 19, 37, 1),
            (1, 35, 35, 32, 48, 1),
            (2, 10, 7, 24, 20, 0),
            (1, 6, 6, 48, 33, 0),
        ] {
            let wts = data(9 * cin * cout, 1 + cin as u32);
            let bias = data(cout, 7);
            let direct =
                Conv::from_matrix(&wts, [3, 3], cin, cout, 1, [pad, pad], bias.clone(), false).without_winograd();
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
                direct.run_into(&x, &mut want, ld, 3, mode);
                wino.run_into(&x, &mut got, ld, 3, &bias, mode);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("{n}x{h}x{w}x{cin}->{cout} pad {pad} residual {residual}: {:.2e}", diff / scale);
                assert!(diff / scale < MAX_REL_ERROR, "{n}x{h}x{w}x{cin}->{cout} pad {pad} residual {residual}");
            }
        }
    }

    /// F(m, r) for the 1-D kernels against the direct convolution, for several tile sizes.
    #[test]
    fn line_algorithms_match_the_direct_convolution() {
        for (kernel, pad) in [([1, 7], [0, 3]), ([7, 1], [3, 0]), ([1, 3], [0, 1]), ([3, 1], [1, 0]), ([1, 7], [0, 0])]
        {
            let r = kernel[0].max(kernel[1]);
            for m in 2..=6 {
                let (n, h, w, cin, cout) = (2, 17, 15, 40, 24);
                let wts = data(r * cin * cout, 5 + m as u32);
                let bias = data(cout, 7);
                let direct = Conv::from_matrix(&wts, kernel, cin, cout, 1, pad, bias.clone(), false).without_winograd();
                let wino = Winograd::line(&wts, kernel, m, cin, cout, pad);
                let mut x = Act::zeros(n, h, w, cin);
                x.data = data(x.data.len(), 3).iter().map(|v| v.abs()).collect();
                let (oh, ow) = (h + 2 * pad[0] + 1 - kernel[0], w + 2 * pad[1] + 1 - kernel[1]);
                let ld = cout + 2;
                let mode = StoreMode::Residual { scale: 0.2, relu: false };
                let init = data(n * oh * ow * ld, 11);
                let (mut want, mut got) = (init.clone(), init);
                direct.run_into(&x, &mut want, ld, 1, mode);
                wino.run_into(&x, &mut got, ld, 1, &bias, mode);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("F({m}, {r}) {kernel:?} pad {pad:?}: {:.2e}", diff / scale);
                if m <= line_outputs(r) {
                    assert!(diff / scale < MAX_REL_ERROR, "F({m}, {r}) {kernel:?}: {}", diff / scale);
                }
            }
        }
    }

    /// The direct weights come back from the transformed ones (what quantization reads).
    #[test]
    fn direct_weights_come_back() {
        for (kernel, pad) in [([3, 3], [1, 1]), ([1, 7], [0, 3]), ([7, 1], [3, 0])] {
            let (cin, cout) = (24, 40);
            let w = data(kernel[0] * kernel[1] * cin * cout, 9);
            let c = Conv::from_matrix(&w, kernel, cin, cout, 1, pad, vec![0.0; cout], true);
            assert_eq!(c.is_winograd(), enabled());
            let back = c.weights_f32().expect("f32");
            let err = w.iter().zip(&back).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-6, "{kernel:?}: {err}");
        }
    }

    #[test]
    fn chosen_only_where_it_applies() {
        let direct = |x: &Act| x.clone();
        let w = data(9 * 32 * 32, 1);
        let none = |k, s, p, c| Winograd::for_conv(&w, (k, s, p), c, c, (&[0.0; 32], false), direct).is_none();
        assert!(none([3, 3], 2, [1, 1], 32), "stride 2");
        assert!(none([3, 3], 1, [3, 3], 32), "padding 3");
        assert!(none([3, 3], 1, [1, 1], 8), "8 channels");
        assert!(none([5, 5], 1, [2, 2], 32), "5x5");
        assert!(none([1, 5], 1, [0, 2], 32), "1x5");
        let c = Conv::from_matrix(&w, [3, 3], 32, 32, 1, [1, 1], vec![0.1; 32], true);
        assert_eq!(c.is_winograd(), enabled());
        let c = Conv::from_matrix(&w[..32 * 32], [1, 1], 32, 32, 1, [0, 0], vec![0.1; 32], true);
        assert!(!c.is_winograd());
        let c = Conv::from_matrix(&w[..7 * 32 * 32], [7, 1], 32, 32, 1, [3, 0], vec![0.1; 32], true);
        assert_eq!(c.is_winograd(), enabled());
    }
}
