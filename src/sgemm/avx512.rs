//! AVX-512 micro-kernel: a 6 x 16·NP tile of C from `NP` (<= 4) adjacent 16-column panels of
//! B at once, 6·NP zmm accumulators (24 at NP = 4: 4 B loads and 6 broadcasts per 24 FMAs).
//! Partial tiles are handled in the kernel: rows past `rows` are computed (their row pointers
//! repeat a valid row) but never stored, columns past `cols` are masked.

use super::Seg;
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

/// `C = act(load·C + alpha·(bias + A·B))` for a `rows x cols` tile (`rows` <= 6,
/// `cols` <= 16·NP, more than 16·(NP - 1)).
///
/// # Safety
/// AVX-512F available; each segment's pointers valid for its run; panel `q` of B starts at
/// `b + q * bstride` and holds 16 floats (64-byte aligned) per column of all runs; `c` a
/// `rows x cols` region with row stride `ldc`; `bias` holds 16·NP floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) unsafe fn kernel<const NP: usize>(
    segs: &[Seg],
    b: *const f32,
    bstride: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: &[f32],
    alpha: f32,
    load: bool,
    relu: bool,
) {
    unsafe {
        for i in 0..6.min(rows) {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 16 * NP - 1) as *const i8);
        }
        let mut acc = [[_mm512_setzero_ps(); NP]; 6];
        for q in 0..NP {
            let bv = _mm512_loadu_ps(bias.as_ptr().add(16 * q));
            for i in 0..6 {
                acc[i][q] = bv;
            }
        }
        let mut bp = b;
        for seg in segs {
            if seg.p[0].is_null() {
                bp = bp.add(16 * seg.run);
                continue;
            }
            let a = seg.p;
            for j in 0..seg.run {
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
        // rows by constant index: a loop to `rows` would index `acc` dynamically, and LLVM
        // would then keep it in memory and store every accumulator after every FMA
        let e = Store { c, ldc, cols, alpha: _mm512_set1_ps(alpha), load, relu };
        let [r0, r1, r2, r3, r4, r5] = acc;
        e.row(r0, 0);
        if rows > 1 {
            e.row(r1, 1);
        }
        if rows > 2 {
            e.row(r2, 2);
        }
        if rows > 3 {
            e.row(r3, 3);
        }
        if rows > 4 {
            e.row(r4, 4);
        }
        if rows > 5 {
            e.row(r5, 5);
        }
    }
}

/// The epilogue of one tile.
struct Store {
    c: *mut f32,
    ldc: usize,
    cols: usize,
    alpha: __m512,
    load: bool,
    relu: bool,
}

impl Store {
    /// Row `i`: `C = act(load·C + alpha·acc)`, columns past `cols` masked.
    ///
    /// # Safety
    /// AVX-512F available; row `i` of the tile is inside C.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn row<const NP: usize>(&self, acc: [__m512; NP], i: usize) {
        for (q, v) in acc.into_iter().enumerate() {
            let valid = self.cols.saturating_sub(16 * q).min(16);
            let mask: __mmask16 = if valid == 16 { 0xffff } else { ((1u32 << valid) - 1) as u16 };
            // SAFETY: the masked lanes are inside row i of the tile.
            unsafe {
                let p = self.c.add(i * self.ldc + 16 * q);
                let mut y = _mm512_mul_ps(v, self.alpha);
                if self.load {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p));
                }
                if self.relu {
                    y = _mm512_max_ps(y, _mm512_setzero_ps());
                }
                _mm512_mask_storeu_ps(p, mask, y);
            }
        }
    }
}
