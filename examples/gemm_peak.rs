//! Dev tool: this CPU's f32 FMA peak and the engine GEMM's rate on given shapes.
//!
//!     cargo run --release --example gemm_peak -- 2312x384x1088 512x2080x384
//!
//! Threads follow RAYON_NUM_THREADS (default: all cores); COLD=N cycles through N copies of the
//! weights. Best of 30 runs per shape.
use inception::sgemm::{Epilogue, PackedB, Rows, fma_peak_gflops, gemm};
use std::time::Instant;

fn main() {
    let threads = rayon::current_num_threads();
    println!("f32 FMA peak: {:.1} GFLOP/s per core, {threads} threads", fma_peak_gflops());
    for shape in std::env::args().skip(1) {
        let dims: Vec<usize> = shape.split('x').filter_map(|v| v.parse().ok()).collect();
        let [m, k, n] = dims[..] else {
            eprintln!("skipping {shape:?}: want MxKxN");
            continue;
        };
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        // COLD=N: cycle through N copies of the weights (more than the L3 holds, as at batch 1)
        let copies: usize = std::env::var("COLD").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let bs: Vec<PackedB> = (0..copies).map(|_| PackedB::new(&w, k, n)).collect();
        let mut c = vec![0.0f32; m * n];
        let epi = Epilogue { bias: None, alpha: 1.0, load: false, relu: false };
        let mut best = f64::MAX;
        for i in 0..30 {
            let b = &bs[i % copies];
            let t = Instant::now();
            if std::env::var_os("IN_POOL").is_some() {
                rayon::scope(|_| gemm(m, Rows::Dense { data: &a, ld: k }, b, &mut c, n, 0, epi));
            } else {
                gemm(m, Rows::Dense { data: &a, ld: k }, b, &mut c, n, 0, epi);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{k}x{n}: {:.3} ms, {:.1} GFLOP/s", best * 1e3, 2.0 * (m * k * n) as f64 / best / 1e9);
    }
}
