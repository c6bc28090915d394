//! AVX2 micro-kernels, one 6 x 16 tile per call (12 ymm accumulators): f32 with FMA, and
//! u8 x i8 with `vpmaddubsw` + `vpmaddwd`, or, where the weights allow, two `vpmaddubsw`
//! added in 16 bits before each `vpmaddwd` widens (3 multiplies per 8 k instead of 4); the
//! 16-bit sums stay exact because `PackedQ` narrows each column's weights for the kernel
//! (`sgemm::narrow`). Full tiles are stored from the registers; partial ones through a
//! scratch tile.

use super::portable::dequantize;
use super::{Grid, Kernel, MR, NR, Seg, TileEpi, store_tile};
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

/// `dst = clamp(round(src * inv + zero), 0, 255)`, round half to even (the default rounding of
/// `vcvtps2dq`), 8 at a time.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_u8(src: &[f32], dst: &mut [u8], g: Grid<'_>) {
    let n8 = src.len() / 8 * 8;
    unsafe {
        let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
        let one = match g {
            Grid::One(inv, zero) => (_mm256_set1_ps(inv), _mm256_set1_ps(zero)),
            Grid::Cols(..) => (lo, lo),
        };
        for i in (0..n8).step_by(8) {
            let (s, z) = match g {
                Grid::One(..) => one,
                Grid::Cols(inv, zero) => (_mm256_loadu_ps(inv.as_ptr().add(i)), _mm256_loadu_ps(zero.as_ptr().add(i))),
            };
            let y = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(src.as_ptr().add(i)), s), z);
            let y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
            let v = _mm256_cvtps_epi32(y);
            // 8 i32 in [0, 255] -> 8 bytes
            let w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let b = _mm_packus_epi16(w, w);
            _mm_storel_epi64(dst.as_mut_ptr().add(i).cast(), b);
        }
    }
    super::portable::quantize_u8(&src[n8..], &mut dst[n8..], g.skip(n8));
}

/// `y = act(load·C + alpha·v)` stored to 8 floats at `p`.
///
/// # Safety
/// AVX2 available; `p` valid for 8 floats.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(p: *mut f32, v: __m256, e: &TileEpi<'_>) {
    unsafe {
        let mut y = _mm256_mul_ps(v, _mm256_set1_ps(e.alpha));
        if e.load {
            y = _mm256_add_ps(y, _mm256_loadu_ps(p));
        }
        if e.relu {
            y = _mm256_max_ps(y, _mm256_setzero_ps());
        }
        _mm256_storeu_ps(p, y);
    }
}

/// f32, FMA.
#[derive(Clone, Copy)]
pub(super) struct F32;

impl Kernel for F32 {
    type A = f32;
    const PANELS: usize = 1;

    unsafe fn tile(
        self,
        segs: &[Seg],
        b: *const u8,
        _bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        e: &TileEpi<'_>,
    ) {
        let mut bias = [0.0f32; NR];
        if let Some(v) = e.bias {
            bias[..cols].copy_from_slice(v);
        }
        // SAFETY: as the trait requires.
        unsafe {
            if rows == MR && cols == NR {
                f32_kernel(segs, b.cast(), c, ldc, &bias, e);
            } else {
                let mut acc = [0.0f32; MR * NR];
                let raw = TileEpi {
                    bias: None,
                    scale: None,
                    alpha: 1.0,
                    load: false,
                    relu: false,
                    u8: None,
                    ahead: super::Ahead::NONE,
                };
                f32_kernel(segs, b.cast(), acc.as_mut_ptr(), NR, &bias, &raw);
                store_tile(&acc, NR, c, ldc, rows, cols, e);
            }
        }
    }
}

/// `C = act(load·C + alpha·(bias + A·B))` for a full 6 x 16 tile.
///
/// # Safety
/// AVX2 + FMA available; each segment's pointers valid for its run, `b` holds 16 floats per
/// column of all runs; `c` a 6 x 16 region with row stride `ldc`.
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_kernel(segs: &[Seg], mut b: *const f32, c: *mut f32, ldc: usize, bias: &[f32; 16], e: &TileEpi<'_>) {
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
            let [a0, a1, a2, a3, a4, a5] = seg.p.map(|p| p.cast::<f32>());
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
        let rows = [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51]];
        for (i, row) in rows.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                store8(c.add(i * ldc + j * 8), *v, e);
            }
        }
    }
}

/// u8 x i8 (weights narrowed by `sgemm::narrow`), i32 sums; `PAIRS`: two k-quads summed in
/// 16 bits per widening.
#[derive(Clone, Copy)]
pub(super) struct Q8<const PAIRS: bool>;

impl<const PAIRS: bool> Kernel for Q8<PAIRS> {
    type A = u8;
    const PANELS: usize = 1;

    unsafe fn tile(
        self,
        segs: &[Seg],
        b: *const u8,
        _bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        e: &TileEpi<'_>,
    ) {
        // SAFETY: as the trait requires.
        unsafe { q8_tile::<PAIRS>(segs, b, c, ldc, rows, cols, e) }
    }
}

/// The sums of a tile dequantized and stored (`acc * scale + bias`, then the epilogue). Inside
/// the AVX2 function so that the intrinsics inline: from the trait method they were calls, and
/// took half of the int8 GEMM's time.
///
/// # Safety
/// As [`Kernel::tile`], with the kernel's weight range.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_tile<const PAIRS: bool>(
    segs: &[Seg],
    b: *const u8,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    e: &TileEpi<'_>,
) {
    unsafe {
        // the tile's C lines are fetched while it computes (the f32 kernel does the same)
        for i in 0..rows {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 15) as *const i8);
        }
        let acc = q8_kernel::<PAIRS>(segs, b);
        if rows == MR && cols == NR {
            let (mut scale, mut bias) = ([0.0f32; NR], [0.0f32; NR]);
            scale.copy_from_slice(e.scale.unwrap_or(&[1.0; NR]));
            if let Some(v) = e.bias {
                bias.copy_from_slice(v);
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let f = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(*v),
                        _mm256_loadu_ps(scale.as_ptr().add(8 * j)),
                        _mm256_loadu_ps(bias.as_ptr().add(8 * j)),
                    );
                    store8(c.add(i * ldc + j * 8), f, e);
                }
            }
        } else {
            let mut sums = [0i32; MR * NR];
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    _mm256_storeu_si256(sums.as_mut_ptr().add(i * NR + 8 * j).cast(), *v);
                }
            }
            store_tile(&dequantize(&sums, cols, e), NR, c, ldc, rows, cols, e);
        }
    }
}

/// The i32 sums of a 6 x 16 tile, as `[row][half]`.
///
/// # Safety
/// AVX2 available; each segment's pointers valid for `4 * run` bytes, `b` one 64-byte line
/// per step of all runs; the weights within `sgemm::narrow`'s bound.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q8_kernel<const PAIRS: bool>(segs: &[Seg], mut b: *const u8) -> [[__m256i; 2]; 6] {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let z = _mm256_setzero_si256();
        let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
        let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
        // one row's quad (4 u8, broadcast) times both halves of the line
        macro_rules! quad {
            ($a:expr, $w0:expr, $w1:expr, $c0:ident, $c1:ident) => {
                let x = _mm256_set1_epi32(($a as *const i32).read_unaligned());
                $c0 = _mm256_add_epi32($c0, _mm256_madd_epi16(_mm256_maddubs_epi16(x, $w0), ones));
                $c1 = _mm256_add_epi32($c1, _mm256_madd_epi16(_mm256_maddubs_epi16(x, $w1), ones));
            };
        }
        // two consecutive quads of a row times two lines, summed in 16 bits, then widened
        macro_rules! pair {
            ($a:expr, $w0:expr, $w1:expr, $v0:expr, $v1:expr, $c0:ident, $c1:ident) => {
                let x = _mm256_set1_epi32(($a as *const i32).read_unaligned());
                let y = _mm256_set1_epi32(($a as *const i32).add(1).read_unaligned());
                let s0 = _mm256_add_epi16(_mm256_maddubs_epi16(x, $w0), _mm256_maddubs_epi16(y, $v0));
                let s1 = _mm256_add_epi16(_mm256_maddubs_epi16(x, $w1), _mm256_maddubs_epi16(y, $v1));
                $c0 = _mm256_add_epi32($c0, _mm256_madd_epi16(s0, ones));
                $c1 = _mm256_add_epi32($c1, _mm256_madd_epi16(s1, ones));
            };
        }
        for seg in segs {
            if seg.p[0].is_null() {
                b = b.add(64 * seg.run);
                continue;
            }
            let [a0, a1, a2, a3, a4, a5] = seg.p;
            let mut j = 0;
            while PAIRS && j + 2 <= seg.run {
                let w0 = _mm256_load_si256(b.cast());
                let w1 = _mm256_load_si256(b.add(32).cast());
                let v0 = _mm256_load_si256(b.add(64).cast());
                let v1 = _mm256_load_si256(b.add(96).cast());
                pair!(a0.add(4 * j), w0, w1, v0, v1, c00, c01);
                pair!(a1.add(4 * j), w0, w1, v0, v1, c10, c11);
                pair!(a2.add(4 * j), w0, w1, v0, v1, c20, c21);
                pair!(a3.add(4 * j), w0, w1, v0, v1, c30, c31);
                pair!(a4.add(4 * j), w0, w1, v0, v1, c40, c41);
                pair!(a5.add(4 * j), w0, w1, v0, v1, c50, c51);
                b = b.add(128);
                j += 2;
            }
            while j < seg.run {
                let w0 = _mm256_load_si256(b.cast());
                let w1 = _mm256_load_si256(b.add(32).cast());
                quad!(a0.add(4 * j), w0, w1, c00, c01);
                quad!(a1.add(4 * j), w0, w1, c10, c11);
                quad!(a2.add(4 * j), w0, w1, c20, c21);
                quad!(a3.add(4 * j), w0, w1, c30, c31);
                quad!(a4.add(4 * j), w0, w1, c40, c41);
                quad!(a5.add(4 * j), w0, w1, c50, c51);
                b = b.add(64);
                j += 1;
            }
        }
        [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51]]
    }
}
