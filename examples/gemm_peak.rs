//! Dev tool: this CPU's f32 FMA peak and the engine GEMM's rate on given shapes.
//!
//!     cargo run --release --example gemm_peak -- 2312x384x1088 512x2080x384
//!
//! Threads follow RAYON_NUM_THREADS (default: all cores); COLD=N cycles through N copies of the
//! weights (with INT8, of the inputs and outputs too); INT8=1 times the u8 x i8 GEMM instead (rates in GOP/s, 2 per multiply-add). Best
//! of 30 runs per shape.
use inception::sgemm::{Epilogue, PackedB, PackedQ, Rows, fma_peak_gflops, gemm, qgemm};
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
        if std::env::var_os("INT8").is_some() {
            int8(m, k, n);
            continue;
        }
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

fn int8(m: usize, k: usize, n: usize) {
    let k = k.next_multiple_of(4);
    let a: Vec<u8> = (0..m * k).map(|i| (i % 251) as u8).collect();
    let w: Vec<i8> = (0..k * n).map(|i| (i % 201) as i8).collect();
    // COLD=N: N copies of the weights, inputs and outputs, used in turn (as in the network,
    // where each GEMM's operands were last touched by other layers)
    let copies: usize = std::env::var("COLD").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let bs: Vec<PackedQ> = (0..copies).map(|_| PackedQ::new(&w, k, n, &vec![1e-3; n])).collect();
    let aas: Vec<Vec<u8>> = (0..copies).map(|_| a.clone()).collect();
    let mut cs: Vec<Vec<f32>> = (0..copies).map(|_| vec![0.0f32; m * n]).collect();
    let epi = Epilogue { bias: None, alpha: 1.0, load: false, relu: false };
    let mut best = f64::MAX;
    for i in 0..30 {
        let (b, a, c) = (&bs[i % copies], &aas[i % copies], &mut cs[i % copies]);
        let t = Instant::now();
        qgemm(m, Rows::Dense { data: a, ld: k }, b, b.scale(), c, n, 0, epi);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("int8 {m}x{k}x{n}: {:.3} ms, {:.1} GOP/s", best * 1e3, 2.0 * (m * k * n) as f64 / best / 1e9);
}
