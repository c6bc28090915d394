//! f32 GEMM for the frozen engine, `C = act(load·C + alpha·(A·B + bias))`, with the weights `B`
//! packed once at load time.
//!
//! `B` (`[k, n]`, the convolution weights) is stored as panels of `NR` = 16 columns, each panel
//! `k` rows of 16 contiguous floats (64-byte aligned), split into `KC`-row slices (16 KiB, kept
//! in L1 while a task's rows run over it). `A` (activations) is not packed: the 6x16
//! micro-kernel reads its 6 rows through pointers, one set per run of contiguous columns
//! ("indirect" convolution: for a k x k convolution a run is one tap's input channels of six
//! output pixels, or zeros for padding), so im2col never exists. Only inputs with fewer than 16
//! channels (the RGB stem) are gathered into a row-major scratch tile first. Bias, the residual
//! scale-add and ReLU are applied as the 12 AVX2 accumulators are stored. Without AVX2+FMA a
//! portable kernel computes the same thing.

use rayon::prelude::*;
use std::cell::RefCell;

const MR: usize = 6;
const NR: usize = 16;
const KC: usize = 256;
const MC: usize = 72;
/// Up to this many column panels per task, loop strips outside panels.
const FEW_PANELS: usize = 4;

/// 64-byte aligned floats (a `B` row of 16 is one cache line; unaligned ones straddle two).
#[derive(Clone, Debug, Default)]
struct Aligned(Vec<Line>);

#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Aligned {
    fn zeros(len: usize) -> Self {
        Self(vec![Line::default(); len.div_ceil(16)])
    }
    fn as_slice(&self) -> &[f32] {
        // SAFETY: Line is 16 f32 with no padding (size 64 = 16 * 4).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 16) }
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
    }
}

/// `B` (`[k, n]` row-major) packed into 16-column panels (the last one zero-padded), stored
/// k-block by k-block: block `[k0, k0 + kc)` holds every panel's `kc x 16` slice in turn, so a
/// task sweeping the panels of one k-block reads one contiguous stream.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// Rows per k-block (the last block may be shorter).
    kc: usize,
    data: Aligned,
}

impl PackedB {
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight matrix is not k x n");
        let kc = k.div_ceil(k.div_ceil(KC).max(1)).max(1);
        let mut data = Aligned::zeros(n.div_ceil(NR) * NR * k);
        let packed = data.as_mut_slice();
        layout(k, n, kc, |r, c0, cols, off| packed[off..off + cols].copy_from_slice(&w[r * n + c0..r * n + c0 + cols]));
        Self { k, n, kc, data }
    }

    /// Back to `[k, n]` row-major (used at load time to merge convolutions).
    pub fn unpack(&self) -> Vec<f32> {
        let (n, mut w, packed) = (self.n, vec![0.0f32; self.k * self.n], self.data.as_slice());
        layout(self.k, n, self.kc, |r, c0, cols, off| {
            w[r * n + c0..r * n + c0 + cols].copy_from_slice(&packed[off..off + cols])
        });
        w
    }

    /// Offset of panel `p`'s slice of the k-block starting at `k0` (`kcb` rows).
    fn slice(&self, k0: usize, kcb: usize, p: usize) -> usize {
        k0 * self.n.div_ceil(NR) * NR + p * kcb * NR
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// Every (row, panel) of a packed `[k, n]` matrix with `kc`-row blocks:
/// `f(row, first column, columns, offset of its 16 floats)`.
fn layout(k: usize, n: usize, kc: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let panels = n.div_ceil(NR);
    for k0 in (0..k).step_by(kc) {
        let kcb = kc.min(k - k0);
        for p in 0..panels {
            let (c0, cols) = (p * NR, NR.min(n - p * NR));
            for kk in 0..kcb {
                f(k0 + kk, c0, cols, k0 * panels * NR + (p * kcb + kk) * NR);
            }
        }
    }
}

/// Where the rows of `A` come from.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// Row `r` is `data[r * ld .. r * ld + k]`.
    Dense { data: &'a [f32], ld: usize },
    /// Implicit im2col of an NHWC input (`n, h, w`, channel `c0 + ci` at row stride `ld`) for a
    /// `kh x kw` convolution with `stride` and top/left `pad`: row `r` is output pixel `r` of an
    /// `oh x ow` map, column `(ky * kw + kx) * cin + ci`.
    Conv {
        data: &'a [f32],
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

/// Source of rows past the input (padding).
static ZEROS: [f32; KC] = [0.0; KC];

/// Six row pointers, each valid for `run` floats: columns `[k, k + run)` of a 6-row strip; all
/// null where every row is zero there (padding), which the kernels skip.
#[derive(Clone, Copy, Debug)]
struct Seg {
    p: [*const f32; MR],
    run: usize,
}

/// A convolution row's image and the input position of its tap (0, 0).
type Origin = (usize, isize, isize);

impl<'a> Rows<'a> {
    /// Columns `[k, k + run)` of row `r` (`run` stops at the end of a convolution tap).
    fn segment(&self, r: usize, k: usize, max_run: usize) -> (&'a [f32], usize) {
        match *self {
            Rows::Dense { data, ld } => (&data[r * ld + k..r * ld + k + max_run], max_run),
            Rows::Conv { .. } => {
                let (tap, run) = self.tap(k, max_run);
                (self.at(self.origin(r), tap, run), run)
            }
        }
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

    /// `run` input values of a tap for the row at `origin` (`ZEROS` where the tap is padding).
    fn at(&self, (b, y0, x0): Origin, [ky, kx, ci]: [usize; 3], run: usize) -> &'a [f32] {
        let Rows::Conv { data, ld, c0, hw: [h, w], .. } = *self else { unreachable!("tap of a dense row") };
        let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
            &ZEROS[..run]
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
                let p = std::array::from_fn(|i| data[row(i) * ld + k0..row(i) * ld + k0 + kc].as_ptr());
                out.push(Seg { p, run: kc });
            }
            Rows::Conv { .. } => {
                let origins: [Origin; MR] = std::array::from_fn(|i| self.origin(row(i)));
                let mut kk = 0;
                while kk < kc {
                    let (tap, run) = self.tap(k0 + kk, kc - kk);
                    let p = origins.map(|o| self.at(o, tap, run).as_ptr());
                    // a tap that is padding for all six rows adds nothing: the kernel skips it
                    let p = if p.iter().all(|&q| q == ZEROS.as_ptr()) { [std::ptr::null(); MR] } else { p };
                    out.push(Seg { p, run });
                    kk += run;
                }
            }
        }
    }

    /// Rows `[r0, r1)`, columns `[k0, k0 + kc)` copied row-major into `out` (row stride `kc`).
    fn gather(&self, r0: usize, r1: usize, k0: usize, kc: usize, out: &mut [f32]) {
        if let Rows::Conv { data, ld, c0: 0, cin, hw: [h, w], k: [_, kw], .. } = *self
            && ld == cin
        {
            // the input's channels are dense, so the taps `kx..kw` of one kernel row are one
            // contiguous run of the input row: copy runs, not taps
            for (r, row) in (r0..r1).zip(out.chunks_exact_mut(kc)) {
                let (b, y0, x0) = self.origin(r);
                let mut kk = 0;
                while kk < kc {
                    let k = k0 + kk;
                    let (ky, kx, ci) = (k / cin / kw, (k / cin) % kw, k % cin);
                    let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
                    let run = if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                        let run = (cin - ci).min(kc - kk); // one padded tap
                        row[kk..kk + run].fill(0.0);
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
        for (r, row) in (r0..r1).zip(out.chunks_exact_mut(kc)) {
            let mut kk = 0;
            while kk < kc {
                let (src, run) = self.segment(r, k0 + kk, kc - kk);
                row[kk..kk + run].copy_from_slice(src);
                kk += run;
            }
        }
    }

    /// Inputs whose taps are too short to stream directly (fewer than 16 channels).
    fn needs_gather(&self) -> bool {
        matches!(self, Rows::Conv { cin, .. } if *cin < 16)
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

/// A raw pointer to the output, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of (row, column) cells.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Per-thread scratch: segments of the current tile, and the gathered rows of narrow inputs.
#[derive(Default)]
struct Scratch {
    segs: Vec<Seg>,
    /// Start of each strip's segments in `segs`.
    starts: Vec<usize>,
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `C[r, c0 + j]` (row stride `ldc`) for `r < m`, `j < b.n()`.
pub fn gemm(m: usize, a: Rows<'_>, b: &PackedB, c: &mut [f32], ldc: usize, c0: usize, epi: Epilogue<'_>) {
    gemm_on(has_avx2_fma(), m, a, b, c, ldc, c0, epi)
}

/// [`gemm`] with the kernel chosen by the caller (`avx` only where the CPU has AVX2 + FMA).
#[allow(clippy::too_many_arguments)]
fn gemm_on(avx: bool, m: usize, a: Rows<'_>, b: &PackedB, c: &mut [f32], ldc: usize, c0: usize, epi: Epilogue<'_>) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c0 + n <= ldc && c.len() >= (m - 1) * ldc + c0 + n, "output too small for the GEMM");
    if let Some(bias) = epi.bias {
        assert!(bias.len() >= n, "bias shorter than n");
    }
    match a {
        Rows::Dense { data, ld } => assert!(k <= ld && data.len() >= (m - 1) * ld + k, "A too small"),
        Rows::Conv { data, ld, c0, cin, hw: [h, w], k: [kh, kw], out: [oh, ow], .. } => {
            assert!(k == kh * kw * cin && c0 + cin <= ld && m.is_multiple_of(oh * ow), "bad convolution geometry");
            assert!(data.len() >= (m / (oh * ow)) * h * w * ld, "input too small");
        }
    }
    let t0 = profiling().then(std::time::Instant::now);
    let kc = b.kc;
    let nkb = k.div_ceil(kc);
    let panels = n.div_ceil(NR);
    // row tiles of equal size (a multiple of MR, at most MC)
    let mc = m.div_ceil(m.div_ceil(MC)).next_multiple_of(MR);
    let mtiles = m.div_ceil(mc);
    let threads = rayon::current_num_threads().max(1);
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
    let nchunks = panels.div_ceil(per_chunk);
    let out = Out(c.as_mut_ptr());
    let task = |t: usize| {
        let (mt, nc) = (t / nchunks, t % nchunks);
        let (r0, r1) = (mt * mc, (mt * mc + mc).min(m));
        let (p0, p1) = (nc * per_chunk, (nc * per_chunk + per_chunk).min(panels));
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let strips = (r1 - r0).div_ceil(MR);
            for kb in 0..nkb {
                let k0 = kb * kc;
                let kcb = kc.min(k - k0);
                scratch.segs.clear();
                scratch.starts.clear();
                if a.needs_gather() {
                    scratch.rows.resize((r1 - r0) * kcb, 0.0);
                    a.gather(r0, r1, k0, kcb, &mut scratch.rows);
                    let tile_rows = Rows::Dense { data: &scratch.rows, ld: kcb };
                    for st in 0..strips {
                        scratch.starts.push(scratch.segs.len());
                        tile_rows.segments(st * MR, r1 - r0, 0, kcb, &mut scratch.segs);
                    }
                } else {
                    for st in 0..strips {
                        scratch.starts.push(scratch.segs.len());
                        a.segments(r0 + st * MR, r1, k0, kcb, &mut scratch.segs);
                    }
                }
                scratch.starts.push(scratch.segs.len());
                let step = Epilogue {
                    bias: if kb == 0 { epi.bias } else { None },
                    alpha: epi.alpha,
                    load: epi.load || kb > 0,
                    relu: epi.relu && kb == nkb - 1,
                };
                let run = |p: usize, st: usize| {
                    let bp = &b.data.as_slice()[b.slice(k0, kcb, p)..][..kcb * NR];
                    let (j0, cols) = (p * NR, NR.min(n - p * NR));
                    let epi = Epilogue { bias: step.bias.map(|v| &v[j0..j0 + cols]), ..step };
                    let rows = MR.min(r1 - r0 - st * MR);
                    let segs = &scratch.segs[scratch.starts[st]..scratch.starts[st + 1]];
                    // SAFETY: the segments' pointers are valid for their runs (they point into
                    // `a`'s data, the gathered rows or ZEROS, all alive for this call); rows/cols
                    // of this tile are inside C (asserted above) and no other task writes them.
                    unsafe {
                        let cp = out.at((r0 + st * MR) * ldc + c0 + j0);
                        tile(avx, segs, bp, cp, ldc, rows, cols, epi);
                    }
                };
                if p1 - p0 <= FEW_PANELS {
                    // narrow output: keep each strip's rows in L1 across the few panels
                    (0..strips).for_each(|st| (p0..p1).for_each(|p| run(p, st)));
                } else {
                    // keep each panel's weight slice in L1 across the strips
                    (p0..p1).for_each(|p| (0..strips).for_each(|st| run(p, st)));
                }
            }
        });
    };
    if mtiles * nchunks == 1 || threads == 1 {
        (0..mtiles * nchunks).for_each(task);
    } else {
        (0..mtiles * nchunks).into_par_iter().for_each(task);
    }
    if let Some(t0) = t0 {
        let conv = matches!(a, Rows::Conv { .. });
        eprintln!("gemm m={m} k={k} n={n} conv={} ms={:.4}", conv as u8, t0.elapsed().as_secs_f64() * 1e3);
    }
}

/// `INCEPTION_PROFILE_GEMM=1`: print every GEMM's shape and time to stderr (see BENCHMARKS.md).
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("INCEPTION_PROFILE_GEMM").is_some())
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One `rows x cols` (<= 6 x 16) tile of C.
///
/// # Safety
/// Every segment's pointers are valid for `run` floats and the runs add up to `b.len() / 16`;
/// `c` points at a `rows x cols` region with row stride `ldc` that nobody else touches; the
/// epilogue's bias (if any) holds this tile's `cols` values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    avx: bool,
    segs: &[Seg],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    epi: Epilogue<'_>,
) {
    let mut bias16 = [0.0f32; NR];
    if let Some(v) = epi.bias {
        bias16[..cols].copy_from_slice(v);
    }
    let mut acc = [0.0f32; MR * NR];
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller); see above for the rest.
        unsafe {
            if rows == MR && cols == NR {
                avx2::kernel(segs, b.as_ptr(), c, ldc, &bias16, epi.alpha, epi.load, epi.relu);
                return;
            }
            avx2::kernel(segs, b.as_ptr(), acc.as_mut_ptr(), NR, &bias16, 1.0, false, false);
        }
    }
    if !avx {
        // SAFETY: as above.
        unsafe { portable_kernel(segs, b, &bias16, &mut acc) };
    }
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: (i, j) is inside the caller's region.
            unsafe {
                let dst = c.add(i * ldc + j);
                let mut v = epi.alpha * acc[i * NR + j];
                if epi.load {
                    v += *dst;
                }
                *dst = if epi.relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// `acc = bias + A·B` for one 6 x 16 tile, in plain Rust.
///
/// # Safety
/// As for [`tile`].
unsafe fn portable_kernel(segs: &[Seg], b: &[f32], bias: &[f32; NR], acc: &mut [f32; MR * NR]) {
    for i in 0..MR {
        acc[i * NR..(i + 1) * NR].copy_from_slice(bias);
    }
    let mut bv = b.chunks_exact(NR);
    for seg in segs {
        if seg.p[0].is_null() {
            bv.by_ref().take(seg.run).for_each(drop);
            continue;
        }
        // SAFETY: each pointer is valid for `run` floats.
        let rows = seg.p.map(|p| unsafe { std::slice::from_raw_parts(p, seg.run) });
        for (j, w) in bv.by_ref().take(seg.run).enumerate() {
            for (i, row) in rows.iter().enumerate() {
                for (a, w) in acc[i * NR..(i + 1) * NR].iter_mut().zip(w) {
                    *a += row[j] * w;
                }
            }
        }
    }
}

/// Measured f32 multiply-add peak of one core, GFLOP/s (12 independent FMA chains for ~0.2 s;
/// AVX2 when present, else whatever the portable loop compiles to).
pub fn fma_peak_gflops() -> f64 {
    let iters = 20_000_000usize;
    let t = std::time::Instant::now();
    #[cfg(target_arch = "x86_64")]
    let flops = if has_avx2_fma() {
        // SAFETY: AVX2 + FMA checked.
        std::hint::black_box(unsafe { avx2::fma_loop(iters) });
        iters * 12 * 16
    } else {
        portable_fma_loop(iters)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let flops = portable_fma_loop(iters);
    flops as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn portable_fma_loop(iters: usize) -> usize {
    let mut acc = [[0.0f32; 8]; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            for v in a.iter_mut() {
                *v = v.mul_add(1.000_000_1, 0.999_999);
            }
        }
    }
    std::hint::black_box(acc);
    iters * 12 * 16
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Seg;
    use std::arch::x86_64::*;

    /// 12 independent FMA chains, `iters` rounds (the peak probe).
    ///
    /// # Safety
    /// AVX2 + FMA available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_loop(iters: usize) -> f32 {
        let (x, y) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
        let mut acc = [_mm256_setzero_ps(); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut out = [0.0f32; 8];
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
        // SAFETY: out holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// `C = act(load·C + alpha·(bias + A·B))` for a full 6 x 16 tile.
    ///
    /// # Safety
    /// AVX2 + FMA available; each segment's pointers valid for its run, `b` holds 16 floats per
    /// column of all runs; `c` a 6 x 16 region with row stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        segs: &[Seg],
        mut b: *const f32,
        c: *mut f32,
        ldc: usize,
        bias: &[f32; 16],
        alpha: f32,
        load: bool,
        relu: bool,
    ) {
        unsafe {
            for i in 0..6 {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 15) as *const i8);
            }
            let b0 = _mm256_loadu_ps(bias.as_ptr());
            let b1 = _mm256_loadu_ps(bias.as_ptr().add(8));
            let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (b0, b1, b0, b1, b0, b1);
            let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (b0, b1, b0, b1, b0, b1);
            for seg in segs {
                if seg.p[0].is_null() {
                    b = b.add(16 * seg.run);
                    continue;
                }
                let [a0, a1, a2, a3, a4, a5] = seg.p;
                for j in 0..seg.run {
                    let w0 = _mm256_load_ps(b);
                    let w1 = _mm256_load_ps(b.add(8));
                    let x = _mm256_broadcast_ss(&*a0.add(j));
                    c00 = _mm256_fmadd_ps(x, w0, c00);
                    c01 = _mm256_fmadd_ps(x, w1, c01);
                    let x = _mm256_broadcast_ss(&*a1.add(j));
                    c10 = _mm256_fmadd_ps(x, w0, c10);
                    c11 = _mm256_fmadd_ps(x, w1, c11);
                    let x = _mm256_broadcast_ss(&*a2.add(j));
                    c20 = _mm256_fmadd_ps(x, w0, c20);
                    c21 = _mm256_fmadd_ps(x, w1, c21);
                    let x = _mm256_broadcast_ss(&*a3.add(j));
                    c30 = _mm256_fmadd_ps(x, w0, c30);
                    c31 = _mm256_fmadd_ps(x, w1, c31);
                    let x = _mm256_broadcast_ss(&*a4.add(j));
                    c40 = _mm256_fmadd_ps(x, w0, c40);
                    c41 = _mm256_fmadd_ps(x, w1, c41);
                    let x = _mm256_broadcast_ss(&*a5.add(j));
                    c50 = _mm256_fmadd_ps(x, w0, c50);
                    c51 = _mm256_fmadd_ps(x, w1, c51);
                    b = b.add(16);
                }
            }
            let al = _mm256_set1_ps(alpha);
            let zero = _mm256_setzero_ps();
            let rows = [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51]];
            for (i, row) in rows.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let p = c.add(i * ldc + j * 8);
                    let mut y = _mm256_mul_ps(*v, al);
                    if load {
                        y = _mm256_add_ps(y, _mm256_loadu_ps(p));
                    }
                    if relu {
                        y = _mm256_max_ps(y, zero);
                    }
                    _mm256_storeu_ps(p, y);
                }
            }
        }
    }
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
        for (avx, &(m, k, n)) in [false, has_avx2_fma()].into_iter().flat_map(|v| {
            [(1, 1, 1), (7, 300, 17), (150, 600, 40), (64, 2080, 33), (13, 5, 130)].iter().map(move |s| (v, s))
        }) {
            let (a, w, bias) = (data(m * k, 1), data(k * n, 2), data(n, 3));
            let want = naive(m, k, n, &a, &w);
            let pb = PackedB::new(&w, k, n);
            assert_eq!(pb.unpack(), w);
            // stored into a wider output at column offset 3, with bias and ReLU
            let ldc = n + 5;
            let mut c = vec![7.0f32; m * ldc];
            let epi = Epilogue { bias: Some(&bias), alpha: 1.0, load: false, relu: true };
            gemm_on(avx, m, Rows::Dense { data: &a, ld: k }, &pb, &mut c, ldc, 3, epi);
            // residual: C = C + 0.2 (AB + bias)
            let mut r = vec![1.5f32; m * n];
            let epi = Epilogue { bias: Some(&bias), alpha: 0.2, load: true, relu: false };
            gemm_on(avx, m, Rows::Dense { data: &a, ld: k }, &pb, &mut r, n, 0, epi);
            for i in 0..m {
                assert_eq!(c[i * ldc..i * ldc + 3], [7.0; 3]);
                assert_eq!(c[i * ldc + 3 + n..(i + 1) * ldc], [7.0; 2]);
                for j in 0..n {
                    let y = want[i * n + j] + bias[j];
                    assert!((c[i * ldc + 3 + j] - y.max(0.0)).abs() < 1e-4, "{m}x{k}x{n} ({i},{j})");
                    assert!((r[i * n + j] - (1.5 + 0.2 * y)).abs() < 1e-4);
                }
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
            for avx in [false, has_avx2_fma()] {
                let mut c = vec![0.0f32; m * 21];
                let rows = Rows::Conv { data: &x, ld, c0, cin, hw: [h, w], k: [kh, kw], stride: s, pad, out: [oh, ow] };
                gemm_on(
                    avx,
                    m,
                    rows,
                    &pb,
                    &mut c,
                    21,
                    0,
                    Epilogue { bias: None, alpha: 1.0, load: false, relu: false },
                );
                for (g, w) in c.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5);
                }
            }
        }
    }
}
