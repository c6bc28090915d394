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
//! scale-add and ReLU are applied as the accumulators are stored.
//!
//! Micro-kernels, one file per instruction set, chosen at run time ([`Isa::detect`]):
//! `avx512` (6 x 64: four panels per call), `avx2` (6 x 16, FMA) and a portable one; all
//! compute the same tile and are tested against each other where the CPU has them.

use rayon::prelude::*;
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

const MR: usize = 6;
const NR: usize = 16;
/// Rows per k-block: a panel's slice is `KC x 16` floats (16 KiB), kept in L1 while a
/// task's strips run over it; the AVX-512 kernel reads four panels at once, so it takes half.
const KC: usize = 256;
const KC_AVX512: usize = 128;
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

    /// 16-column panels one kernel call covers.
    fn panels(self) -> usize {
        if self == Isa::Avx512 { 4 } else { 1 }
    }

    fn kc(self) -> usize {
        if self == Isa::Avx512 { KC_AVX512 } else { KC }
    }
}

impl PackedB {
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight matrix is not k x n");
        let kc = k.div_ceil(k.div_ceil(Isa::detect().kc()).max(1)).max(1);
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
    gemm_on(Isa::detect(), m, a, b, c, ldc, c0, epi)
}

/// [`gemm`] with the kernel chosen by the caller (one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
fn gemm_on(isa: Isa, m: usize, a: Rows<'_>, b: &PackedB, c: &mut [f32], ldc: usize, c0: usize, epi: Epilogue<'_>) {
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
                // panels [p, p + np) for strip st
                let run = |(p, np): (usize, usize), st: usize| {
                    let bp = &b.data.as_slice()[b.slice(k0, kcb, p)..][..np * kcb * NR];
                    let (j0, cols) = (p * NR, (np * NR).min(n - p * NR));
                    let epi = Epilogue { bias: step.bias.map(|v| &v[j0..j0 + cols]), ..step };
                    let rows = MR.min(r1 - r0 - st * MR);
                    let segs = &scratch.segs[scratch.starts[st]..scratch.starts[st + 1]];
                    // SAFETY: the segments' pointers are valid for their runs (they point into
                    // `a`'s data, the gathered rows or ZEROS, all alive for this call); rows/cols
                    // of this tile are inside C (asserted above) and no other task writes them.
                    unsafe {
                        let cp = out.at((r0 + st * MR) * ldc + c0 + j0);
                        tile(isa, segs, bp, kcb * NR, cp, ldc, rows, cols, epi);
                    }
                };
                let group = isa.panels();
                let groups = || (p0..p1).step_by(group).map(|p| (p, group.min(p1 - p)));
                if p1 - p0 <= FEW_PANELS {
                    // narrow output: keep each strip's rows in L1 across the few panels
                    (0..strips).for_each(|st| groups().for_each(|g| run(g, st)));
                } else {
                    // keep each panel's weight slice in L1 across the strips
                    groups().for_each(|g| (0..strips).for_each(|st| run(g, st)));
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
    Isa::available().contains(&Isa::Avx2)
}

/// One `rows x cols` (<= 6 x 16 · panels) tile of C; B's panels `bstride` floats apart.
///
/// # Safety
/// Every segment's pointers are valid for `run` floats and the runs add up to
/// `bstride / 16`; `b` holds the tile's panels; `c` points at a `rows x cols` region with row
/// stride `ldc` that nobody else touches; the epilogue's bias (if any) holds this tile's
/// `cols` values; `isa` is one of [`Isa::available`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    segs: &[Seg],
    b: &[f32],
    bstride: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    epi: Epilogue<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        let mut bias64 = [0.0f32; 4 * NR];
        if let Some(v) = epi.bias {
            bias64[..cols].copy_from_slice(v);
        }
        let (bp, e) = (b.as_ptr(), epi);
        // SAFETY: AVX-512F present (isa is available); see above for the rest.
        unsafe {
            match cols.div_ceil(NR) {
                1 => avx512::kernel::<1>(segs, bp, bstride, c, ldc, rows, cols, &bias64, e.alpha, e.load, e.relu),
                2 => avx512::kernel::<2>(segs, bp, bstride, c, ldc, rows, cols, &bias64, e.alpha, e.load, e.relu),
                3 => avx512::kernel::<3>(segs, bp, bstride, c, ldc, rows, cols, &bias64, e.alpha, e.load, e.relu),
                _ => avx512::kernel::<4>(segs, bp, bstride, c, ldc, rows, cols, &bias64, e.alpha, e.load, e.relu),
            }
        }
        return;
    }
    let mut bias16 = [0.0f32; NR];
    if let Some(v) = epi.bias {
        bias16[..cols].copy_from_slice(v);
    }
    let mut acc = [0.0f32; MR * NR];
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller); see above for the rest.
        unsafe {
            if rows == MR && cols == NR {
                avx2::kernel(segs, b.as_ptr(), c, ldc, &bias16, epi.alpha, epi.load, epi.relu);
                return;
            }
            avx2::kernel(segs, b.as_ptr(), acc.as_mut_ptr(), NR, &bias16, 1.0, false, false);
        }
    }
    if isa == Isa::Portable {
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
        Isa::Portable => portable_fma_loop(iters),
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
            gemm_on(isa, m, Rows::Dense { data: &a, ld: k }, &pb, &mut c, ldc, 3, epi);
            // residual: C = C + 0.2 (AB + bias)
            let mut r = vec![1.5f32; m * n];
            let epi = Epilogue { bias: Some(&bias), alpha: 0.2, load: true, relu: false };
            gemm_on(isa, m, Rows::Dense { data: &a, ld: k }, &pb, &mut r, n, 0, epi);
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
                );
                for (g, w) in c.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5);
                }
            }
        }
    }
}
