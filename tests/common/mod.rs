//! Test helpers: the deterministic weight generator of `scripts/reference/common.py`
//! (bit-identical), fixture access and comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use inception::weights;

/// The `inception` binary of this build.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_inception"))
}

/// Run the binary with `args` and wait.
pub fn run(args: &[&str]) -> std::process::Output {
    bin().args(args).output().expect("run inception")
}

/// stdout and stderr together.
pub fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fresh temp folder name for each call (`{prefix}-{pid}-{n}`): the tests of one file run in
/// parallel threads of one process, so a per-process folder is shared between them.
pub fn unique_temp_dir(prefix: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}

/// Two classes ("bright", "dark") of 12 small synthetic PNGs each, plus one corrupt file.
pub fn tiny_folder(prefix: &str) -> PathBuf {
    let d = unique_temp_dir(prefix).join("data");
    for (class, v) in [("bright", 220u8), ("dark", 30u8)] {
        let c = d.join(class);
        std::fs::create_dir_all(&c).unwrap();
        for i in 0..12u8 {
            let img = image::RgbImage::from_fn(40, 40, |x, y| {
                let n = ((x as u8).wrapping_mul(7) ^ (y as u8).wrapping_mul(13) ^ i.wrapping_mul(31)) % 40;
                image::Rgb([v.saturating_add(n), v.saturating_sub(n / 2), v])
            });
            img.save(c.join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(d.join("dark").join("broken.png"), b"not a png").unwrap();
    d
}

fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811C9DC5;
    for b in s.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x01000193);
    }
    h
}

/// `n` values in [0, 1), 24-bit resolution: splitmix64 of `fnv1a32(key) << 32 | i`.
pub fn det_uniform(key: &str, n: usize) -> Vec<f64> {
    let h = (fnv1a32(key) as u64) << 32;
    (0..n as u64)
        .map(|i| {
            let mut z = (h | i).wrapping_add(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 40) as f64 / (1u64 << 24) as f64
        })
        .collect()
}

/// Value of tensor `key` with checkpoint shape `shape` (see `det_value` in common.py).
pub fn det_value(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let u = det_uniform(key, n);
    let leaf = key.rsplit('.').next().unwrap_or(key);
    if leaf == "weight" && shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        let s = (fan_in as f64).sqrt();
        u.iter().map(|&v| ((v * 2.0 - 1.0) / s) as f32).collect()
    } else if leaf == "running_var" || (leaf == "weight" && shape.len() == 1) {
        u.iter().map(|&v| (v + 0.5) as f32).collect()
    } else {
        u.iter().map(|&v| ((v - 0.5) * 0.5) as f32).collect()
    }
}

/// Give every tensor of `module` its deterministic value.
pub fn deterministic<M: burn::module::Module>(module: M) -> M {
    weights::fill(module, &mut |key, shape| Some(det_value(key, shape)))
}

/// Read a float tensor from a safetensors file as a burn tensor.
pub fn read_tensor<const D: usize>(path: &Path, key: &str, device: &Device) -> Tensor<D> {
    let bytes = weights::read_file(path).expect("read fixture");
    let st = weights::parse(path, &bytes).expect("parse fixture");
    let t = weights::tensor_f32(path, &st, key).expect("tensor in fixture");
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d: Vec<f32> = (a - b).abs().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    d.into_iter().fold(0.0, |m, v| if v.is_nan() { f32::NAN } else { m.max(v) })
}
