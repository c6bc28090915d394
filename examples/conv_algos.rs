//! Direct (one GEMM) against Winograd (F(4x4, 3x3), 1-D F(m, 7) and F(m, 3)) on the
//! stride-1 3x3, 1x7 / 7x1 and 1x3 / 3x1 convolutions of Inception-ResNet-v2 and Inception-v4
//! at 299 px, batch 1: median time of each, and the largest difference relative to the
//! largest output.
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
    // (layer, input h = w, cin, cout, kernel, padding)
    let layers = [
        ("stem 2a (valid)", 149, 32, 32, [3, 3], [0, 0]),
        ("stem 2b", 147, 32, 64, [3, 3], [1, 1]),
        ("stem 4a (valid)", 73, 80, 192, [3, 3], [0, 0]),
        ("5b / A 3x3", 35, 64, 96, [3, 3], [1, 1]),
        ("5b / A 3x3", 35, 96, 96, [3, 3], [1, 1]),
        ("block35", 35, 32, 32, [3, 3], [1, 1]),
        ("block35", 35, 32, 48, [3, 3], [1, 1]),
        ("block35", 35, 48, 64, [3, 3], [1, 1]),
        ("6a (IR-v2)", 35, 256, 256, [3, 3], [1, 1]),
        ("6a (v4)", 35, 192, 224, [3, 3], [1, 1]),
        ("7a (IR-v2)", 17, 256, 288, [3, 3], [1, 1]),
        ("block17 1x7", 17, 128, 160, [1, 7], [0, 3]),
        ("block17 7x1", 17, 160, 192, [7, 1], [3, 0]),
        ("B 1x7 (v4)", 17, 192, 224, [1, 7], [0, 3]),
        ("B 7x1 (v4)", 17, 224, 256, [7, 1], [3, 0]),
        ("B 7x1 (v4)", 17, 192, 192, [7, 1], [3, 0]),
        ("reduction-B 7x1 (v4)", 17, 256, 320, [7, 1], [3, 0]),
        ("block8 1x3", 8, 192, 224, [1, 3], [0, 1]),
        ("block8 3x1", 8, 224, 256, [3, 1], [1, 0]),
    ];
    println!("| layer | input | direct ms | Winograd ms | speed-up | rel. error |");
    println!("|---|---|---|---|---|---|");
    for (name, hw, cin, cout, [kh, kw], pad) in layers {
        let w = data(cout * cin * kh * kw, cin as u32, -1.0);
        let ones = vec![1.0; cout];
        let wino = Conv::new(&w, [cout, cin, kh, kw], 1, pad, &ones, vec![0.0; cout], false);
        let direct = wino.clone().without_winograd();
        let mut x = Act::zeros(1, hw, hw, cin);
        x.data = data(x.data.len(), 5, 0.0);
        let (a, b) = (direct.run(&x), wino.run(&x));
        let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.data.iter().zip(&b.data).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        let td = median_ms(runs, || drop(direct.run(&x)));
        let tw = median_ms(runs, || drop(wino.run(&x)));
        let used = if wino.is_winograd() { "" } else { " (not chosen)" };
        println!("| {name}{used} | {hw}x{hw}x{cin} -> {cout} | {td:.2} | {tw:.2} | {:.2}x | {err:.1e} |", td / tw);
    }
}
