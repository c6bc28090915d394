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
