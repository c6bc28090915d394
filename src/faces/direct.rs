//! Direct convolution for P-Net, whose layers are too narrow for the GEMM engine (3 -> 10,
//! 10 -> 16, 16 -> 32 channels over maps of a million pixels): maps are row-planar (`[h][c][w]`,
//! each channel's row contiguous), and a kernel keeps a 16-pixel strip of a block of output
//! channels in registers over all taps. Runtime dispatch: AVX2 + FMA where present, portable
//! code otherwise (the same loops).

use rayon::prelude::*;

/// A row-planar map: value `(y, c, x)` at `data[(y * c_total + c) * w + x]`.
#[derive(Clone, Debug)]
pub struct Planar {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Strip width (two AVX registers).
const XS: usize = 16;

/// A stride-1, unpadded `k x k` convolution with bias.
#[derive(Clone, Debug)]
pub struct DirectConv {
    cin: usize,
    cout: usize,
    k: usize,
    /// `[ci][ky][kx][co]`: a tap's weights for consecutive output channels are contiguous.
    w: Vec<f32>,
    b: Vec<f32>,
}

impl DirectConv {
    /// From PyTorch-layout weights `[cout, cin, k, k]`.
    pub fn new(weight: &[f32], [cout, cin, k]: [usize; 3], bias: Vec<f32>) -> Self {
        let mut w = vec![0.0; weight.len()];
        for co in 0..cout {
            for t in 0..cin * k * k {
                w[t * cout + co] = weight[co * cin * k * k + t];
            }
        }
        Self { cin, cout, k, w, b: bias }
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    pub fn run(&self, x: &Planar) -> Planar {
        assert_eq!(x.c, self.cin, "direct conv: channels");
        let (oh, ow) = (x.h + 1 - self.k, x.w + 1 - self.k);
        let mut y = Planar { c: self.cout, h: oh, w: ow, data: vec![0.0; oh * self.cout * ow] };
        let fma = crate::sgemm::has_avx2_fma();
        y.data.par_chunks_mut(self.cout * ow).enumerate().for_each(|(oy, row)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { row_avx2(self, x, oy, row) };
                return;
            }
            row_portable(self, x, oy, row);
        });
        y
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(c: &DirectConv, x: &Planar, oy: usize, row: &mut [f32]) {
    for_blocks(c, x.w + 1 - c.k, |co, step, x0, whole_strip| {
        if !whole_strip {
            return point(c, x, oy, co, step, x0, row);
        }
        // SAFETY: the caller checked AVX2 + FMA; `for_blocks` keeps strips inside the row.
        unsafe {
            match step {
                6 => avx2::strip::<6>(c, x, oy, co, x0, row),
                5 => avx2::strip::<5>(c, x, oy, co, x0, row),
                4 => avx2::strip::<4>(c, x, oy, co, x0, row),
                3 => avx2::strip::<3>(c, x, oy, co, x0, row),
                2 => avx2::strip::<2>(c, x, oy, co, x0, row),
                _ => avx2::strip::<1>(c, x, oy, co, x0, row),
            }
        }
    });
}

fn row_portable(c: &DirectConv, x: &Planar, oy: usize, row: &mut [f32]) {
    let ow = x.w + 1 - c.k;
    for co in 0..c.cout {
        for px in 0..ow {
            point(c, x, oy, co, 1, px, row);
        }
    }
}

/// Blocks of output channels (as wide as divides what is left, at most 6) by strips of `XS`
/// pixels (the last strip overlaps its neighbour); a row narrower than a strip goes pixel by
/// pixel. `f(co, channels, x, strip)`: a strip at `x`, or (`strip` false) the pixel `x`.
#[inline(always)]
fn for_blocks(c: &DirectConv, ow: usize, mut f: impl FnMut(usize, usize, usize, bool)) {
    let mut co = 0;
    while co < c.cout {
        let left = c.cout - co;
        let step = match left {
            _ if left.is_multiple_of(6) => 6,
            _ if left.is_multiple_of(5) => 5,
            _ if left.is_multiple_of(4) => 4,
            _ if left >= 3 => 3,
            _ => left,
        };
        if ow < XS {
            (0..ow).for_each(|px| f(co, step, px, false));
        } else {
            let mut x0 = 0;
            while x0 < ow {
                f(co, step, x0.min(ow - XS), true);
                x0 += XS;
            }
        }
        co += step;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{DirectConv, Planar};

    /// Output channels `co..co + B`, pixels `x0..x0 + 16` of output row `oy`: `2 * B`
    /// accumulators over every tap.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn strip<const B: usize>(c: &DirectConv, x: &Planar, oy: usize, co: usize, x0: usize, row: &mut [f32]) {
        let ow = x.w + 1 - c.k;
        debug_assert!(x0 + 16 <= ow && co + B <= c.cout);
        let mut acc = [[_mm256_setzero_ps(); 2]; B];
        for (b, a) in acc.iter_mut().enumerate() {
            let v = _mm256_set1_ps(c.b[co + b]);
            *a = [v, v];
        }
        // SAFETY (pointer reads): rows `oy..oy + k` and columns `x0..x0 + 16 + k - 1` lie in
        // `x` because `x0 + 16 <= ow = x.w - k + 1`; weights `t * cout + co + b` < `w.len()`.
        unsafe {
            for ci in 0..c.cin {
                for ky in 0..c.k {
                    let src = x.data.as_ptr().add(((oy + ky) * x.c + ci) * x.w + x0);
                    for kx in 0..c.k {
                        let s0 = _mm256_loadu_ps(src.add(kx));
                        let s1 = _mm256_loadu_ps(src.add(kx + 8));
                        let w = c.w.as_ptr().add(((ci * c.k + ky) * c.k + kx) * c.cout + co);
                        for (b, a) in acc.iter_mut().enumerate() {
                            let wv = _mm256_broadcast_ss(&*w.add(b));
                            a[0] = _mm256_fmadd_ps(wv, s0, a[0]);
                            a[1] = _mm256_fmadd_ps(wv, s1, a[1]);
                        }
                    }
                }
            }
            for (b, a) in acc.iter().enumerate() {
                let dst = &mut row[(co + b) * ow + x0..(co + b) * ow + x0 + 16];
                _mm256_storeu_ps(dst.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(dst.as_mut_ptr().add(8), a[1]);
            }
        }
    }
}

/// One output pixel (rows narrower than a strip).
fn point(c: &DirectConv, x: &Planar, oy: usize, co: usize, n: usize, px: usize, row: &mut [f32]) {
    let ow = x.w + 1 - c.k;
    for b in co..co + n {
        let mut acc = c.b[b];
        for ci in 0..c.cin {
            for ky in 0..c.k {
                for kx in 0..c.k {
                    let t = (ci * c.k + ky) * c.k + kx;
                    acc += c.w[t * c.cout + b] * x.data[((oy + ky) * x.c + ci) * x.w + px + kx];
                }
            }
        }
        row[b * ow + px] = acc;
    }
}

/// PReLU on a row-planar map (slope per channel).
pub fn prelu(x: &mut Planar, alpha: &[f32]) {
    let (c, w) = (x.c, x.w);
    x.data.par_chunks_mut(c * w).for_each(|row| {
        for (ch, r) in row.chunks_exact_mut(w).enumerate() {
            let a = alpha[ch];
            r.iter_mut().for_each(|v| *v = if *v < 0.0 { *v * a } else { *v });
        }
    });
}

/// PyTorch's output size of a ceil-mode pool without padding.
pub fn pool_out(n: usize, k: usize, s: usize) -> usize {
    if n < k {
        return 1;
    }
    let o = (n - k).div_ceil(s) + 1;
    if (o - 1) * s >= n { o - 1 } else { o }
}

/// `k x k` / `s` max pool, ceil mode, on a row-planar map.
pub fn max_pool_ceil(x: &Planar, k: usize, s: usize) -> Planar {
    let (oh, ow) = (pool_out(x.h, k, s), pool_out(x.w, k, s));
    let (c, w) = (x.c, x.w);
    let mut y = Planar { c, h: oh, w: ow, data: vec![0.0; oh * c * ow] };
    y.data.par_chunks_mut(c * ow).enumerate().for_each(|(oy, row)| {
        for (ch, out) in row.chunks_exact_mut(ow).enumerate() {
            if k == 2 && s == 2 && oy * 2 + 1 < x.h {
                // P-Net's 2 x 2 / 2: pairs of two rows, the last column alone when odd
                let (r0, r1) = (&x.data[(2 * oy * c + ch) * w..][..w], &x.data[((2 * oy + 1) * c + ch) * w..][..w]);
                for (ox, o) in out.iter_mut().enumerate().take(w / 2) {
                    *o = r0[2 * ox].max(r0[2 * ox + 1]).max(r1[2 * ox].max(r1[2 * ox + 1]));
                }
                if w % 2 == 1 && ow > w / 2 {
                    out[w / 2] = r0[w - 1].max(r1[w - 1]);
                }
                continue;
            }
            out.fill(f32::NEG_INFINITY);
            for iy in oy * s..(oy * s + k).min(x.h) {
                let src = &x.data[(iy * c + ch) * w..][..w];
                for (ox, o) in out.iter_mut().enumerate() {
                    for v in &src[ox * s..(ox * s + k).min(w)] {
                        *o = o.max(*v);
                    }
                }
            }
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(c: &DirectConv, x: &Planar) -> Vec<f32> {
        let (oh, ow) = (x.h + 1 - c.k, x.w + 1 - c.k);
        let mut y = vec![0.0; oh * c.cout * ow];
        for oy in 0..oh {
            for co in 0..c.cout {
                for ox in 0..ow {
                    let mut acc = c.b[co] as f64;
                    for ci in 0..c.cin {
                        for ky in 0..c.k {
                            for kx in 0..c.k {
                                let t = (ci * c.k + ky) * c.k + kx;
                                acc +=
                                    c.w[t * c.cout + co] as f64 * x.data[((oy + ky) * x.c + ci) * x.w + ox + kx] as f64;
                            }
                        }
                    }
                    y[(oy * c.cout + co) * ow + ox] = acc as f32;
                }
            }
        }
        y
    }

    /// Both code paths (AVX2 strips where the CPU has them, and the portable one) against a
    /// plain f64 loop, for narrow rows (pixel by pixel), overlapping last strips and every
    /// channel blocking (10 = 5 + 5, 16 = 4 x 4, 7 = 3 + 4, 2, 1).
    #[test]
    fn direct_conv_paths_agree() {
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (cin, cout, k, h, w) in
            [(3, 10, 3, 9, 40), (10, 16, 3, 6, 17), (16, 7, 3, 5, 12), (4, 2, 1, 3, 33), (2, 1, 2, 4, 20)]
        {
            let weight: Vec<f32> = (0..cout * cin * k * k).map(|_| rnd()).collect();
            let bias: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let c = DirectConv::new(&weight, [cout, cin, k], bias);
            let x = Planar { c: cin, h, w, data: (0..h * cin * w).map(|_| rnd()).collect() };
            let want = naive(&c, &x);
            let fast = c.run(&x).data;
            let (oh, ow) = (h + 1 - k, w + 1 - k);
            let mut portable = vec![0.0; oh * cout * ow];
            for (oy, row) in portable.chunks_mut(cout * ow).enumerate() {
                row_portable(&c, &x, oy, row);
            }
            for (got, what) in [(&fast, "dispatched"), (&portable, "portable")] {
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(d < 1e-5, "{what} {cin}->{cout} k{k} {h}x{w}: {d}");
            }
        }
    }
}
