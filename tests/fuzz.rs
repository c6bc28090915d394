//! A seeded mutation fuzzer on stable Rust: valid files (safetensors with our metadata, images
//! in every decoded format, configs) are mutated (bit flips, interesting bytes, splices,
//! truncation, inserted runs, large numbers in headers) and fed to the readers. Every case
//! must return `Ok` or `Err`: a panic fails the run and the input is saved under
//! `target/fuzz-crashes/`. `cargo test` runs a few thousand cases; `scripts/fuzz.sh N` runs
//! N (`FUZZ_CASES`), reporting cases per second.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::preprocess::{self, Preprocess};
use inception::train::TrainConfig;
use inception::train::data::SplitMix;
use inception::weights;

/// The inputs every mutation starts from.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let dir = common::unique_temp_dir("fuzz-corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = Vec::new();
    // safetensors: a tiny self-describing model file and a mixed-dtype file
    let cfg = ModelConfig { width: 0.05, ..ModelConfig::new(ModelKind::InceptionResnetV1, 3) };
    let m = Model::new(&cfg, &Device::flex());
    let p = dir.join("m.safetensors");
    weights::save_model(&m, &p, &Preprocess::facenet(), &["a".into(), "b".into(), "c".into()]).unwrap();
    out.push(("safetensors", std::fs::read(&p).unwrap()));
    let mut t = weights::Tensors::new();
    t.insert("input".into(), (vec![1, 3, 2, 2], (0..12).map(|i| i as f32).collect()));
    t.insert("logits".into(), (vec![1, 2], vec![0.5, -1.0]));
    weights::save_tensors(&p, &t, None).unwrap();
    out.push(("safetensors", std::fs::read(&p).unwrap()));
    // images: PNG (RGB, gray, RGBA, 16-bit), JPEG, BMP, WebP
    let rgb = image::RgbImage::from_fn(23, 17, |x, y| image::Rgb([(x * 11) as u8, (y * 13) as u8, (x ^ y) as u8]));
    for (ext, img) in [
        ("png", image::DynamicImage::ImageRgb8(rgb.clone())),
        ("png", image::DynamicImage::ImageLuma8(image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8())),
        ("png", image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(rgb.clone()).to_rgba8())),
        ("png", image::DynamicImage::ImageRgb16(image::DynamicImage::ImageRgb8(rgb.clone()).to_rgb16())),
        ("jpg", image::DynamicImage::ImageRgb8(rgb.clone())),
        ("bmp", image::DynamicImage::ImageRgb8(rgb.clone())),
        ("webp", image::DynamicImage::ImageRgb8(rgb.clone())),
    ] {
        let f = dir.join(format!("i.{ext}"));
        img.save(&f).unwrap();
        out.push(("image", std::fs::read(&f).unwrap()));
    }
    // JPEG as libjpeg-turbo decodes it: grayscale, and CMYK (Adobe) from the fixtures
    let f = dir.join("g.jpg");
    image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8().save(&f).unwrap();
    out.push(("image", std::fs::read(&f).unwrap()));
    out.push(("image", std::fs::read(common::fixtures().join("preprocess/cmyk_chelsea.jpg")).unwrap()));
    // configs
    let tc = TrainConfig::new(ModelKind::InceptionResnetV1, "fashion-mnist");
    out.push(("train_config", serde_json::to_vec(&tc).unwrap()));
    out.push(("preprocess", serde_json::to_vec(&Preprocess::inception(80, 0.875)).unwrap()));
    out
}

/// One mutation of `base` (`others`: splice sources).
fn mutate(base: &[u8], others: &[(&str, Vec<u8>)], rng: &mut SplitMix) -> Vec<u8> {
    let mut v = base.to_vec();
    let rounds = 1 + (rng.next_u64() % 4) as usize;
    for _ in 0..rounds {
        let n = v.len().max(1);
        let at = (rng.next_u64() as usize) % n;
        match rng.next_u64() % 9 {
            0 => {
                if !v.is_empty() {
                    v[at] ^= 1 << (rng.next_u64() % 8);
                }
            }
            1 => {
                const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'9', b'-', b'"'];
                if !v.is_empty() {
                    v[at] = INTERESTING[(rng.next_u64() % 8) as usize];
                }
            }
            2 => v.truncate(at),
            3 => {
                let len = 1 + (rng.next_u64() % 64) as usize;
                let b = (rng.next_u64() & 0xff) as u8;
                v.splice(at..at, std::iter::repeat_n(b, len));
            }
            4 => {
                let end = (at + 1 + (rng.next_u64() % 64) as usize).min(v.len());
                v.drain(at.min(v.len())..end);
            }
            5 => {
                // splice a piece of another corpus entry
                let (_, o) = &others[(rng.next_u64() as usize) % others.len()];
                if !o.is_empty() {
                    let s = (rng.next_u64() as usize) % o.len();
                    let e = (s + 1 + (rng.next_u64() % 256) as usize).min(o.len());
                    v.splice(at.min(v.len())..at.min(v.len()), o[s..e].iter().copied());
                }
            }
            6 => {
                // a large or odd number where a digit was (header sizes, offsets, JSON values)
                if let Some(p) = v.iter().skip(at).position(|c| c.is_ascii_digit()) {
                    const NUMS: [&str; 7] =
                        ["99999999999", "0", "-1", "1e308", "4294967296", "NaN", "18446744073709551615"];
                    let s = NUMS[(rng.next_u64() % 7) as usize];
                    v.splice(at + p..at + p + 1, s.bytes());
                }
            }
            7 => {
                // little-endian u64 at the front (safetensors header length)
                if v.len() >= 8 {
                    let x = [0u64, 1, 7, 1 << 20, u64::MAX, (v.len() as u64).wrapping_sub(8), 100_000_001];
                    v[..8].copy_from_slice(&x[(rng.next_u64() % 7) as usize].to_le_bytes());
                }
            }
            _ => {
                let len = (rng.next_u64() % 16) as usize;
                for i in 0..len.min(v.len().saturating_sub(at)) {
                    v[at + i] = (rng.next_u64() & 0xff) as u8;
                }
            }
        }
    }
    v
}

fn detector() -> &'static inception::faces::Mtcnn {
    static M: std::sync::OnceLock<inception::faces::Mtcnn> = std::sync::OnceLock::new();
    M.get_or_init(|| inception::faces::Mtcnn::new(Default::default()).unwrap())
}

/// Feed one input to the reader of its kind; errors are fine, panics are not.
fn exercise(kind: &str, bytes: &[u8], model: &Model) {
    let path = Path::new("<fuzz>");
    match kind {
        "safetensors" => {
            if let Ok(st) = weights::parse(path, bytes) {
                for name in st.names() {
                    let _ = weights::tensor_f32(path, &st, name);
                }
                if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(bytes) {
                    let mut header = serde_json::Map::new();
                    let m = meta.metadata().clone().unwrap_or_default();
                    header.insert(
                        "__metadata__".into(),
                        serde_json::Value::Object(
                            m.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect(),
                        ),
                    );
                    let _ = inception::bundle::describe_header(path, &header);
                }
                let _ = weights::load_bytes(model.clone(), bytes, path, &Default::default());
            }
        }
        "image" => {
            if let Ok(img) = preprocess::decode_rgb(bytes) {
                let _ = Preprocess::inception(75, 0.875).apply(&img);
                if img.width() * img.height() <= 64 * 64 {
                    let _ = detector().detect(&img);
                }
            }
        }
        "train_config" => {
            if let Ok(c) = serde_json::from_slice::<TrainConfig>(bytes) {
                let _ = c.validate();
            }
        }
        _ => {
            if let Ok(p) = serde_json::from_slice::<Preprocess>(bytes)
                && p.validate().is_ok()
                && p.input_size <= 160
            {
                let img = image::RgbImage::from_pixel(31, 9, image::Rgb([5, 6, 7]));
                let _ = p.apply(&img);
            }
        }
    }
}

fn fuzz(cases: u64, seed: u64) -> (u64, Vec<String>) {
    let corpus = corpus();
    let cfg = ModelConfig { width: 0.05, ..ModelConfig::new(ModelKind::InceptionResnetV1, 3) };
    let model = Model::new(&cfg, &Device::flex());
    let mut crashes = Vec::new();
    let mut rng = SplitMix::new(seed);
    for i in 0..cases {
        let (kind, base) = &corpus[(rng.next_u64() as usize) % corpus.len()];
        let input = mutate(base, &corpus, &mut rng);
        if catch_unwind(AssertUnwindSafe(|| exercise(kind, &input, &model))).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let f = dir.join(format!("{kind}-{seed}-{i}.bin"));
            let _ = std::fs::write(&f, &input);
            crashes.push(f.display().to_string());
        }
    }
    (cases, crashes)
}

#[test]
fn mutated_inputs_never_panic() {
    let cases: u64 = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xF022);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // quiet panics of caught cases; report them at the end
    std::panic::set_hook(Box::new(|_| {}));
    let t0 = Instant::now();
    let results: Vec<(u64, Vec<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || fuzz(cases / threads + u64::from(t < cases % threads), seed.wrapping_add(t))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or((0, vec!["thread died".into()]))).collect()
    });
    let _ = std::panic::take_hook();
    let done: u64 = results.iter().map(|r| r.0).sum();
    let crashes: Vec<&String> = results.iter().flat_map(|r| &r.1).collect();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "fuzz: {done} cases in {secs:.1} s ({:.0} cases/s, {threads} threads, seed {seed}), {} crash(es)",
        done as f64 / secs,
        crashes.len()
    );
    assert!(crashes.is_empty(), "panics on: {crashes:?}");
}
