//! AVX-512 micro-kernels: a 6 x 16·NP tile of C from `NP` (<= 4) adjacent 16-column panels of
//! B at once, 6·NP zmm accumulators (24 at NP = 4: 4 B loads and 6 broadcasts per 24
//! multiply-adds). f32 with FMA; u8 x i8 with AVX512-VNNI `vpdpbusd` (64 multiply-adds per
//! instruction, exact i32 sums). Partial tiles are handled in the kernel: rows past `rows` are
//! computed (their row pointers repeat a valid row) but never stored, columns past `cols` are
//! masked.

use super::{Grid, Kernel, NR, Seg, TileEpi};
use std::arch::x86_64::*;

/// 12 independent 16-lane FMA chains, `iters` rounds (the peak probe).
///
/// # Safety
/// AVX-512F available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn fma_loop(iters: usize) -> f32 {
    let (x, y) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    let sum = acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
    _mm512_reduce_add_ps(sum)
}

/// `dst = clamp(round(src * inv + zero), 0, 255)`, round half to even (the default rounding of
/// `vcvtps2dq`), 16 at a time.
///
/// # Safety
/// AVX-512F available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_u8(src: &[f32], dst: &mut [u8], g: Grid<'_>) {
    let n16 = src.len() / 16 * 16;
    unsafe {
        let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        let one = match g {
            Grid::One(inv, zero) => (_mm512_set1_ps(inv), _mm512_set1_ps(zero)),
            Grid::Cols(..) => (lo, lo),
        };
        for i in (0..n16).step_by(16) {
            let (s, z) = match g {
                Grid::One(..) => one,
                Grid::Cols(inv, zero) => (_mm512_loadu_ps(inv.as_ptr().add(i)), _mm512_loadu_ps(zero.as_ptr().add(i))),
            };
            let y = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(i)), s), z);
            let y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
            let b = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), b);
        }
    }
    super::portable::quantize_u8(&src[n16..], &mut dst[n16..], g.skip(n16));
}

/// Panel `q` of a tile `cols` wide: its valid columns (<= 16) and their lane mask.
fn panel_mask(cols: usize, q: usize) -> (usize, __mmask16) {
    let valid = cols.saturating_sub(16 * q).min(16);
    (valid, if valid == 16 { !0 } else { ((1u32 << valid) - 1) as u16 })
}

/// The low bytes of the first `valid` (<= 16) lanes of `v` to `p` (the masked store of
/// `vpmovdb` is several times slower on Zen 4 than the register form and a plain store).
///
/// # Safety
/// AVX-512F available; `p` valid for `valid.min(16)` bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_u8(p: *mut u8, valid: usize, v: __m512i) {
    unsafe {
        let b = _mm512_cvtepi32_epi8(v);
        if valid >= 16 {
            _mm_storeu_si128(p.cast(), b);
        } else {
            let mut t = [0u8; 16];
            _mm_storeu_si128(t.as_mut_ptr().cast(), b);
            std::ptr::copy_nonoverlapping(t.as_ptr(), p, valid);
        }
    }
}

/// f32, up to 4 panels per call.
#[derive(Clone, Copy)]
pub(super) struct F32;

impl Kernel for F32 {
    type A = f32;
    const PANELS: usize = 4;

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
    ) {
        let st = Store { c, ldc, rows, cols, e };
        // SAFETY: as the trait requires.
        unsafe {
            match cols.div_ceil(NR) {
                1 => f32_kernel::<1>(segs, b.cast(), bstride / 4, &st),
                2 => f32_kernel::<2>(segs, b.cast(), bstride / 4, &st),
                3 => f32_kernel::<3>(segs, b.cast(), bstride / 4, &st),
                _ => f32_kernel::<4>(segs, b.cast(), bstride / 4, &st),
            }
        }
    }
}

/// `C = act(load·C + alpha·(bias + A·B))` for a `rows x cols` tile (`cols` <= 16·NP, more
/// than 16·(NP - 1); bias from `st.e`, read masked in place); panel `q` of B at `b + q *
/// bstride` floats.
///
/// # Safety
/// AVX-512F available; as for [`Kernel::tile`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn f32_kernel<const NP: usize>(segs: &[Seg], b: *const f32, bstride: usize, st: &Store<'_, '_>) {
    unsafe {
        st.prefetch(NP);
        let mut acc = [[_mm512_setzero_ps(); NP]; 6];
        for q in 0..NP {
            let (_, mask) = panel_mask(st.cols, q);
            let bv = st.e.bias.map_or(_mm512_setzero_ps(), |v| _mm512_maskz_loadu_ps(mask, v.as_ptr().add(16 * q)));
            for i in 0..6 {
                acc[i][q] = bv;
            }
        }
        let (mut pf, pf_end) = (st.e.ahead.p, st.e.ahead.p.wrapping_add(64 * st.e.ahead.lines));
        let mut bp = b;
        for seg in segs {
            if seg.p[0].is_null() {
                bp = bp.add(16 * seg.run);
                continue;
            }
            let a = seg.p.map(|p| p.cast::<f32>());
            for j in 0..seg.run {
                if pf < pf_end {
                    _mm_prefetch::<_MM_HINT_T1>(pf.cast());
                    pf = pf.add(64);
                }
                let mut w = [_mm512_setzero_ps(); NP];
                for q in 0..NP {
                    w[q] = _mm512_load_ps(bp.add(q * bstride));
                }
                for i in 0..6 {
                    let x = _mm512_set1_ps(*a[i].add(j));
                    for q in 0..NP {
                        acc[i][q] = _mm512_fmadd_ps(x, w[q], acc[i][q]);
                    }
                }
                bp = bp.add(16);
            }
        }
        // handed over through a copy: passing `acc` itself keeps it in memory for the whole
        // loop (LLVM then stores every accumulator after every FMA)
        let mut out = [[_mm512_setzero_ps(); NP]; 6];
        for q in 0..NP {
            for i in 0..6 {
                out[i][q] = acc[i][q];
            }
        }
        st.rows(out);
    }
}

/// u8 x i8 (AVX512-VNNI), up to 4 panels per call.
#[derive(Clone, Copy)]
pub(super) struct Q8;

impl Kernel for Q8 {
    type A = u8;
    const PANELS: usize = 4;
    const STORES_U8: bool = true;

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
    ) {
        let st = Store { c, ldc, rows, cols, e };
        // SAFETY: as the trait requires.
        unsafe {
            match cols.div_ceil(NR) {
                1 => q8_kernel::<1>(segs, b, bstride, &st),
                2 => q8_kernel::<2>(segs, b, bstride, &st),
                3 => q8_kernel::<3>(segs, b, bstride, &st),
                _ => q8_kernel::<4>(segs, b, bstride, &st),
            }
        }
    }
}

/// `C = act(load·C + alpha·(acc·scale + bias))` for a `rows x cols` tile of u8 x i8 sums (scale
/// and bias from `st.e`); panel `q` of B at `b + q * bstride` bytes.
///
/// # Safety
/// AVX-512F, BW and VNNI available; as for [`Kernel::tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)]
unsafe fn q8_kernel<const NP: usize>(segs: &[Seg], b: *const u8, bstride: usize, st: &Store<'_, '_>) {
    unsafe {
        st.prefetch(NP);
        let mut acc = [[_mm512_setzero_si512(); NP]; 6];
        let (mut pf, pf_end) = (st.e.ahead.p, st.e.ahead.p.wrapping_add(64 * st.e.ahead.lines));
        let mut bp = b;
        for seg in segs {
            if seg.p[0].is_null() {
                bp = bp.add(64 * seg.run);
                continue;
            }
            let a = seg.p;
            for j in 0..seg.run {
                if pf < pf_end {
                    _mm_prefetch::<_MM_HINT_T1>(pf.cast());
                    pf = pf.add(64);
                }
                let mut w = [_mm512_setzero_si512(); NP];
                for q in 0..NP {
                    w[q] = _mm512_load_si512(bp.add(q * bstride).cast());
                }
                for i in 0..6 {
                    let x = _mm512_set1_epi32((a[i].add(4 * j) as *const i32).read_unaligned());
                    for q in 0..NP {
                        acc[i][q] = _mm512_dpbusd_epi32(acc[i][q], x, w[q]);
                    }
                }
                bp = bp.add(64);
            }
        }
        // the tile's columns of scale and bias, read masked in place (lanes past `cols` are
        // never stored)
        let mut f = [[_mm512_setzero_ps(); NP]; 6];
        for q in 0..NP {
            let (_, mask) = panel_mask(st.cols, q);
            let s = st.e.scale.map_or(_mm512_set1_ps(1.0), |v| _mm512_maskz_loadu_ps(mask, v.as_ptr().add(16 * q)));
            let bv = st.e.bias.map_or(_mm512_setzero_ps(), |v| _mm512_maskz_loadu_ps(mask, v.as_ptr().add(16 * q)));
            for i in 0..6 {
                f[i][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][q]), s, bv);
            }
        }
        // SAFETY: as above.
        match &st.e.u8 {
            None => st.rows(f),
            Some(u) => st.rows_u8(f, u),
        }
    }
}

/// The epilogue of one tile.
pub(super) struct Store<'a, 'b> {
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) e: &'a TileEpi<'b>,
}

impl Store<'_, '_> {
    /// # Safety
    /// AVX-512F available; the tile is inside C.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn prefetch(&self, np: usize) {
        for i in 0..6.min(self.rows) {
            // SAFETY: prefetches never fault; the addresses are inside the tile anyway.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(self.c.add(i * self.ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(self.c.add(i * self.ldc + 16 * np - 1) as *const i8);
            }
        }
    }

    /// All rows of the tile. Rows by constant index: a loop to `rows` would index `acc`
    /// dynamically, and LLVM would then keep it in memory and store every accumulator after
    /// every FMA.
    ///
    /// # Safety
    /// AVX-512F available; the tile is inside C.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const NP: usize>(&self, acc: [[__m512; NP]; 6]) {
        let [r0, r1, r2, r3, r4, r5] = acc;
        // SAFETY: rows below `self.rows` are inside the tile.
        unsafe {
            self.row(r0, 0);
            if self.rows > 1 {
                self.row(r1, 1);
            }
            if self.rows > 2 {
                self.row(r2, 2);
            }
            if self.rows > 3 {
                self.row(r3, 3);
            }
            if self.rows > 4 {
                self.row(r4, 4);
            }
            if self.rows > 5 {
                self.row(r5, 5);
            }
        }
    }

    /// [`Self::rows`] stored as the next convolution's u8 instead, or as well with `u.keep`
    /// (`quantize_u8` of each value; the grid of each panel loaded once).
    ///
    /// # Safety
    /// AVX-512F available; the tile is inside C and `u`'s panels.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows_u8<const NP: usize>(&self, acc: [[__m512; NP]; 6], u: &super::TileU8) {
        let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        let (valid, mask): ([usize; NP], [__mmask16; NP]) =
            (std::array::from_fn(|q| panel_mask(self.cols, q).0), std::array::from_fn(|q| panel_mask(self.cols, q).1));
        // SAFETY: the masked lanes are inside the tile's columns (and their grids).
        let grid: [(__m512, __m512); NP] = std::array::from_fn(|q| unsafe {
            (_mm512_maskz_loadu_ps(mask[q], u.inv.add(16 * q)), _mm512_maskz_loadu_ps(mask[q], u.zero.add(16 * q)))
        });
        // a macro, not a closure: LLVM keeps a closure out of line, with the rows in memory
        macro_rules! put {
            ($r:expr, $i:expr) => {
                let (r, i): ([__m512; NP], usize) = ($r, $i);
                for q in 0..NP {
                    // SAFETY: row `i` < `rows`, masked lanes inside the tile and the panel.
                    unsafe {
                        let p = self.c.add(i * self.ldc + 16 * q);
                        let y = self.finish(r[q], mask[q], p);
                        if u.keep {
                            _mm512_mask_storeu_ps(p, mask[q], y);
                        }
                        let y =
                            _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(_mm512_mul_ps(y, grid[q].0), grid[q].1), lo), hi);
                        store_u8(u.dst[q].add(i * u.ld[q]), valid[q], _mm512_cvtps_epi32(y));
                    }
                }
            };
        }
        let [r0, r1, r2, r3, r4, r5] = acc;
        put!(r0, 0);
        if self.rows > 1 {
            put!(r1, 1);
        }
        if self.rows > 2 {
            put!(r2, 2);
        }
        if self.rows > 3 {
            put!(r3, 3);
        }
        if self.rows > 4 {
            put!(r4, 4);
        }
        if self.rows > 5 {
            put!(r5, 5);
        }
    }

    /// Row `i`: `C = act(load·C + alpha·acc)`, columns past `cols` masked.
    ///
    /// # Safety
    /// AVX-512F available; row `i` of the tile is inside C.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn row<const NP: usize>(&self, acc: [__m512; NP], i: usize) {
        for (q, v) in acc.into_iter().enumerate() {
            let (_, mask) = panel_mask(self.cols, q);
            // SAFETY: the masked lanes are inside row i of the tile.
            unsafe {
                let p = self.c.add(i * self.ldc + 16 * q);
                _mm512_mask_storeu_ps(p, mask, self.finish(v, mask, p));
            }
        }
    }

    /// `act(load·C + alpha·v)` for the masked lanes of one panel row at `p` (the value a row
    /// stores as f32, or quantizes for the next convolution).
    ///
    /// # Safety
    /// AVX-512F available; with `load`, the masked lanes at `p` inside the tile.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn finish(&self, v: __m512, mask: __mmask16, p: *const f32) -> __m512 {
        let mut y = _mm512_mul_ps(v, _mm512_set1_ps(self.e.alpha));
        if self.e.load {
            // SAFETY: as the caller promises.
            y = _mm512_add_ps(y, unsafe { _mm512_maskz_loadu_ps(mask, p) });
        }
        if self.e.relu {
            y = _mm512_max_ps(y, _mm512_setzero_ps());
        }
        y
    }
}
