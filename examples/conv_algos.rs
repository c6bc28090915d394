//! Direct (one GEMM) against Winograd F(4x4, 3x3) on the 3x3 stride-1 convolutions of
//! Inception-ResNet-v2 and Inception-v4 at 299 px, batch 1: median time of each, and the
//! largest difference relative to the largest output.
//!
//! `cargo run --release --example conv_algos [runs]`

use std::time::Instant;

use inception::engine::{Act, Conv};

fn data(len: usize, seed: u32, lo: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            lo + (1.0 - lo) * ((s >> 8) as f32 / (1u32 << 24) as f32)
        })
        .collect()
}

fn median_ms(runs: usize, f: impl Fn()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(9);
    // (layer, input h = w, cin, cout, padding)
    let layers = [
        ("stem 2a (valid)", 149, 32, 32, 0),
        ("stem 2b", 147, 32, 64, 1),
        ("stem 4a (valid)", 73, 80, 192, 0),
        ("5b / A 3x3", 35, 64, 96, 1),
        ("5b / A 3x3", 35, 96, 96, 1),
        ("block35", 35, 32, 32, 1),
        ("block35", 35, 32, 48, 1),
        ("block35", 35, 48, 64, 1),
        ("6a (IR-v2)", 35, 256, 256, 1),
        ("6a (v4)", 35, 192, 224, 1),
        ("7a (IR-v2)", 17, 256, 288, 1),
    ];
    println!("| layer | input | direct ms | Winograd ms | speed-up | rel. error |");
    println!("|---|---|---|---|---|---|");
    for (name, hw, cin, cout, pad) in layers {
        let w = data(cout * cin * 9, cin as u32, -1.0);
        let ones = vec![1.0; cout];
        let wino = Conv::new(&w, [cout, cin, 3, 3], 1, [pad, pad], &ones, vec![0.0; cout], false);
        let direct = wino.clone().without_winograd();
        let mut x = Act::zeros(1, hw, hw, cin);
        x.data = data(x.data.len(), 5, 0.0);
        let (a, b) = (direct.run(&x), wino.run(&x));
        let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.data.iter().zip(&b.data).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        let td = median_ms(runs, || drop(direct.run(&x)));
        let tw = median_ms(runs, || drop(wino.run(&x)));
        let used = if wino.is_winograd() { "" } else { " (not chosen)" };
        println!(
            "| {name}{used} | {hw}x{hw}x{cin} -> {cout} | {td:.2} | {tw:.2} | {:.2}x | {err:.1e} |",
            td / tw
        );
    }
}
