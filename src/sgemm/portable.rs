//! Portable micro-kernels (any CPU): the 6 x 16 tile in plain Rust, f32 and u8 x i8.

use super::{Grid, Kernel, MR, NR, Seg, TileEpi, store_tile};

/// f32, one panel per call.
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
        let mut acc = [0.0f32; MR * NR];
        if let Some(bias) = e.bias {
            for row in acc.chunks_exact_mut(NR) {
                row[..cols].copy_from_slice(bias);
            }
        }
        let mut b = b.cast::<f32>();
        for seg in segs {
            if !seg.p[0].is_null() {
                // SAFETY: each pointer is valid for `run` floats, b for `run` lines.
                let a = seg.p.map(|p| unsafe { std::slice::from_raw_parts(p.cast::<f32>(), seg.run) });
                for j in 0..seg.run {
                    // SAFETY: as above.
                    let w = unsafe { std::slice::from_raw_parts(b.add(j * NR), NR) };
                    for (row, x) in acc.chunks_exact_mut(NR).zip(&a) {
                        row.iter_mut().zip(w).for_each(|(o, w)| *o += x[j] * w);
                    }
                }
            }
            // SAFETY: the runs add up to the block's lines.
            b = unsafe { b.add(seg.run * NR) };
        }
        // SAFETY: the tile is the caller's region.
        unsafe { store_tile(&acc, NR, c, ldc, rows, cols, e) };
    }
}

/// u8 x i8 with i32 sums, one panel per call.
#[derive(Clone, Copy)]
pub(super) struct Q8;

impl Kernel for Q8 {
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
        let mut acc = [0i32; MR * NR];
        let mut b = b.cast::<i8>();
        for seg in segs {
            if !seg.p[0].is_null() {
                // SAFETY: each pointer is valid for `run` quads, b for `run` lines.
                let a = seg.p.map(|p| unsafe { std::slice::from_raw_parts(p, 4 * seg.run) });
                for j in 0..seg.run {
                    // SAFETY: as above.
                    let w = unsafe { std::slice::from_raw_parts(b.add(j * 64), 64) };
                    for (row, x) in acc.chunks_exact_mut(NR).zip(&a) {
                        let x = &x[4 * j..4 * j + 4];
                        for (o, w) in row.iter_mut().zip(w.chunks_exact(4)) {
                            *o += (0..4).map(|t| x[t] as i32 * w[t] as i32).sum::<i32>();
                        }
                    }
                }
            }
            // SAFETY: the runs add up to the block's lines.
            b = unsafe { b.add(seg.run * 64) };
        }
        let f = dequantize(&acc, cols, e);
        // SAFETY: the tile is the caller's region.
        unsafe { store_tile(&f, NR, c, ldc, rows, cols, e) };
    }
}

/// `acc · scale + bias` of a 6 x 16 tile of i32 sums.
pub(super) fn dequantize(acc: &[i32; MR * NR], cols: usize, e: &TileEpi<'_>) -> [f32; MR * NR] {
    let mut f = [0.0f32; MR * NR];
    let scale = e.scale.unwrap_or(&[]);
    for (frow, arow) in f.chunks_exact_mut(NR).zip(acc.chunks_exact(NR)) {
        for j in 0..cols {
            // fused, as the vector kernels' FMA, so that every kernel rounds alike
            frow[j] = (arow[j] as f32).mul_add(scale.get(j).copied().unwrap_or(1.0), e.bias.map_or(0.0, |b| b[j]));
        }
    }
    f
}

/// `dst = clamp(round(src * inv + zero), 0, 255)`, round half to even.
pub(super) fn quantize_u8(src: &[f32], dst: &mut [u8], g: Grid<'_>) {
    for (j, (d, v)) in dst.iter_mut().zip(src).enumerate() {
        let (inv, zero) = match g {
            Grid::One(inv, zero) => (inv, zero),
            Grid::Cols(inv, zero) => (inv[j], zero[j]),
        };
        *d = (v * inv + zero).clamp(0.0, 255.0).round_ties_even() as u8;
    }
}

pub(super) fn fma_loop(iters: usize) -> usize {
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
