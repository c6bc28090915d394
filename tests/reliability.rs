//! Bad inputs and faults, from the outside (the release binary): each case exits with a clear
//! message (2) or reports and goes on (1), never panics, aborts, hangs or scores NaN, and
//! never loses or leaves half-written files.

mod common;

use common::{bin, run, s, text};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::weights;

/// Exit code 2 with a message and no panic.
fn refused(o: &Output) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked") && !t.contains("RUST_BACKTRACE"), "{t}");
    t
}

/// A small random IR-v1 (width 0.1, 10 classes) with its tensors, for corrupting.
fn small_model() -> (ModelConfig, weights::Tensors) {
    let cfg = ModelConfig { width: 0.1, ..ModelConfig::new(ModelKind::InceptionResnetV1, 10) };
    let m = Model::new(&cfg, &Device::flex());
    (cfg, weights::export_tensors(&m))
}

fn save(path: &Path, cfg: &ModelConfig, t: &weights::Tensors) {
    let pre = inception::Preprocess { input_size: 75, ..inception::Preprocess::facenet() };
    let classes: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    weights::save_tensors(path, t, Some(inception::bundle::metadata(cfg, &pre, &classes))).unwrap();
}

#[test]
fn nan_is_never_a_right_answer() {
    // a tie or a NaN row is not a hit
    let (t1, t5, bad) = inception::train::hits(&[1.0, 1.0, 0.0, f32::NAN, 0.0, 0.0], 3, &[0, 0]);
    assert_eq!((t1, t5, bad), (0, 1, 1));
    // eval with a NaN classifier bias: reported, counted wrong, non-zero exit
    let dir = common::unique_temp_dir("rel-nan");
    let (cfg, mut t) = small_model();
    t.get_mut("logits.bias").unwrap().1[0] = f32::NAN;
    let p = dir.join("nan.safetensors");
    save(&p, &cfg, &t);
    let o = run(&["classify", "--weights", s(&p), "tests/fixtures/preprocess/small_astronaut.png"]);
    let msg = text(&o);
    assert!(msg.contains("non-finite") || msg.contains("NaN"), "{msg}");
    assert_ne!(o.status.code(), Some(0));
}

#[test]
fn non_finite_or_negative_variance_weights_are_refused_by_name() {
    let dir = common::unique_temp_dir("rel-weights");
    let (cfg, t) = small_model();
    for (key, value, want) in [
        ("conv2d_1a.conv.weight", f32::NAN, "non-finite"),
        ("repeat_1.0.conv2d.bias", f32::INFINITY, "non-finite"),
        ("conv2d_2a.bn.running_var", -0.5, "negative"),
        ("conv2d_2b.bn.running_var", f32::NAN, "non-finite"),
    ] {
        let mut t = t.clone();
        t.get_mut(key).unwrap().1[1] = value;
        let p = dir.join("bad.safetensors");
        save(&p, &cfg, &t);
        let msg = refused(&run(&["classify", "--weights", s(&p), "tests/fixtures/preprocess/small_astronaut.png"]));
        assert!(msg.contains(key) && msg.contains(want), "{key}: {msg}");
    }
}

#[test]
fn check_fails_on_nan_on_either_side() {
    let dir = common::unique_temp_dir("rel-check");
    let (cfg, t) = small_model();
    let w = dir.join("w.safetensors");
    save(&w, &cfg, &t);
    let mut io = BTreeMap::new();
    let n = 3 * 75 * 75;
    io.insert("input".to_string(), (vec![1, 3, 75, 75], (0..n).map(|i| (i % 7) as f32 / 7.0).collect()));
    io.insert("logits".to_string(), (vec![1, 10], vec![f32::NAN; 10]));
    let f = dir.join("io.safetensors");
    weights::save_tensors(&f, &io, None).unwrap();
    let o = run(&["check", "--weights", s(&w), "--inputs", s(&f)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FAIL"));
    // a 10 x 10 input is refused, not a panic
    io.insert("input".to_string(), (vec![1, 3, 10, 10], vec![0.0; 300]));
    weights::save_tensors(&f, &io, None).unwrap();
    assert!(refused(&run(&["check", "--weights", s(&w), "--inputs", s(&f)])).contains("75"));
}

#[test]
fn symlink_loops_are_walked_once() {
    let dir = common::unique_temp_dir("rel-loop").join("imgs");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..3 {
        image::RgbImage::from_pixel(20, 20, image::Rgb([i * 50, 9, 9])).save(dir.join(format!("{i}.png"))).unwrap();
    }
    image::RgbImage::from_pixel(20, 20, image::Rgb([1, 2, 3])).save(dir.join("sub/x.png")).unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(dir.join("sub"), dir.join("sub/loop2")).unwrap();
    std::os::unix::fs::symlink(dir.join("0.png"), dir.join("sub/same.png")).unwrap();
    std::fs::write(dir.join("anim.gif"), b"GIF89a").unwrap();
    let found = inception::preprocess::collect_images(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(found.len(), 4, "{found:?}");
    let out = dir.parent().unwrap().join("e.safetensors");
    let t0 = Instant::now();
    let o = run(&["embed", "--weights", s(&model_file()), "--out", s(&out), s(&dir)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("wrote 4 embeddings"), "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(60));
}

fn model_file() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let (cfg, t) = small_model();
        let p = common::unique_temp_dir("rel-model").join("m.safetensors");
        save(&p, &cfg, &t);
        p
    })
    .clone()
}

/// A gray PNG of `w x h` zeros, written without holding the pixels.
fn huge_png(path: &Path, w: u32, h: u32) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(f, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().unwrap().into_stream_writer().unwrap();
    let row = vec![0u8; w as usize];
    for _ in 0..h {
        std::io::Write::write_all(&mut wr, &row).unwrap();
    }
    wr.finish().unwrap();
}

#[test]
fn huge_images_are_one_error_line_and_the_others_go_on() {
    let dir = common::unique_temp_dir("rel-huge");
    std::fs::create_dir_all(&dir).unwrap();
    huge_png(&dir.join("big.png"), 12_000, 12_000);
    huge_png(&dir.join("long.png"), 1, 100_000);
    huge_png(&dir.join("longer.png"), 1, 2_000_000);
    huge_png(&dir.join("wide.png"), 30_000, 2); // fits the limits: resampled within bounds
    let good = "tests/fixtures/preprocess/small_astronaut.png";
    let t0 = Instant::now();
    let o = run(&[
        "classify",
        "--weights",
        s(&model_file()),
        "--json",
        s(&dir.join("big.png")),
        good,
        s(&dir.join("long.png")),
        s(&dir.join("longer.png")),
        s(&dir.join("wide.png")),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("memory allocation") && !t.contains("panicked"), "{t}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows[1]["top"].as_array().is_some_and(|a| !a.is_empty()), "the good image still has its result");
    assert!(rows[4]["top"].as_array().is_some_and(|a| !a.is_empty()), "30000 x 2 is decodable: {t}");
    for i in [0, 2, 3] {
        assert!(rows[i]["error"].as_str().unwrap().contains("larger than we decode"), "{t}");
    }
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
}

#[test]
fn out_of_range_values_are_refused_up_front() {
    let data = common::tiny_folder("rel-range");
    let out = data.parent().unwrap().join("run");
    let d = s(&data);
    let o = s(&out);
    let cases: Vec<Vec<&str>> = vec![
        vec!["train", "--data", d, "--out", o, "--batch", "0"],
        vec!["train", "--data", d, "--out", o, "--epochs", "0"],
        vec!["train", "--data", d, "--out", o, "--width", "0"],
        vec!["train", "--data", d, "--out", o, "--width", "-1"],
        vec!["train", "--data", d, "--out", o, "--width", "NaN"],
        vec!["train", "--data", d, "--out", o, "--width", "1000"],
        vec!["train", "--data", d, "--out", o, "--size", "100000"],
        vec!["train", "--data", d, "--out", o, "--lr", "inf"],
        vec!["eval", "--weights", "x", "--data", d, "--size", "10"],
        vec!["eval", "--weights", "x", "--data", d, "--crop-pct", "0"],
        vec!["eval", "--weights", "x", "--data", d, "--crops", "7"],
        vec!["bench", "--mode", "train", "--batch", "0"],
        vec!["bench", "--size", "100000"],
        vec!["summary", "--size", "100000"],
        vec!["summary", "--size", "10"],
        vec!["classify", "--top", "0", "x.png"],
        vec!["embed", "--batch", "0", "--out", "x", "y"],
    ];
    for c in cases {
        let t0 = Instant::now();
        let msg = refused(&run(&c));
        assert!(t0.elapsed() < Duration::from_secs(20), "{c:?} took {:?}", t0.elapsed());
        assert!(!msg.is_empty(), "{c:?}");
    }
    assert!(!out.exists(), "nothing was written for refused runs");
}

#[test]
fn bad_training_setups_are_errors() {
    let root = common::unique_temp_dir("rel-setup");
    // every image unreadable
    let bad = root.join("bad");
    for c in ["a", "b"] {
        std::fs::create_dir_all(bad.join(c)).unwrap();
        std::fs::write(bad.join(c).join("x.png"), b"nope").unwrap();
    }
    let msg =
        refused(&run(&["train", "--data", s(&bad), "--out", s(&root.join("r1")), "--width", "0.1", "--size", "75"]));
    assert!(msg.contains("could be read"), "{msg}");
    // a single class
    let one = root.join("one/only");
    std::fs::create_dir_all(&one).unwrap();
    image::RgbImage::from_pixel(20, 20, image::Rgb([1, 2, 3])).save(one.join("a.png")).unwrap();
    let msg = refused(&run(&["train", "--data", s(one.parent().unwrap()), "--out", s(&root.join("r2"))]));
    assert!(msg.contains("at least 2"), "{msg}");
    // a missing folder: the reason once
    let msg = refused(&run(&["train", "--data", "/no/such/dir", "--out", s(&root.join("r3"))]));
    assert_eq!(msg.matches("not found").count(), 1, "{msg}");
    let msg = refused(&run(&["classify", "--weights", "/no/such.safetensors", "x.png"]));
    assert_eq!(msg.matches("No such file").count(), 1, "{msg}");
}

fn tiny_train<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--data", data, "--out", out, "--width", "0.1", "--size", "75", "--batch", "6"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_run_folder_has_one_owner() {
    let data = common::tiny_folder("rel-lock");
    let out = data.parent().unwrap().join("run");
    std::fs::create_dir_all(&out).unwrap();
    // held by a live process (this test): refused, naming the pid
    std::fs::write(out.join(".lock"), format!("{}\n", std::process::id())).unwrap();
    let msg = refused(&run(&tiny_train(s(&data), s(&out), &["--epochs", "1", "--max-steps", "1"])));
    assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
    // left by a dead process: taken over, and released at the end
    std::fs::write(out.join(".lock"), "4194000\n").unwrap();
    let o = run(&tiny_train(s(&data), s(&out), &["--epochs", "1", "--max-steps", "1"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join(".lock").exists());
}

#[test]
fn temp_files_never_pile_up() {
    let dir = common::unique_temp_dir("rel-tmp");
    std::fs::create_dir_all(&dir).unwrap();
    // a stale temp file of a dead writer is swept by the next write in that folder
    std::fs::write(dir.join(".x.safetensors.4194001.tmp"), b"partial").unwrap();
    weights::write_atomic(&dir.join("x.safetensors"), b"data").unwrap();
    // a folder as the output: an error, and no temp file left
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    assert!(weights::write_atomic(&sub, b"data").is_err());
    let o = run(&[
        "embed",
        "--weights",
        s(&model_file()),
        "--out",
        &format!("{}/", sub.display()),
        "tests/fixtures/preprocess/small_astronaut.png",
    ]);
    refused(&o);
    let left: Vec<String> = walk(&dir).into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(left.is_empty(), "{left:?}");
}

fn walk(d: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        if e.path().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path().display().to_string());
        }
    }
    v
}

fn model_tensors(p: &Path) -> weights::Tensors {
    let b = inception::Bundle::load(None, Some(p), &Device::flex()).unwrap();
    weights::export_tensors(&b.model)
}

#[test]
fn kill_9_then_resume_is_bit_identical() {
    let data = common::tiny_folder("rel-kill");
    let root = data.parent().unwrap();
    let extra = ["--epochs", "6", "--checkpoint-every", "1", "--seed", "3"];
    let a = root.join("a");
    let o = run(&tiny_train(s(&data), s(&a), &extra));
    assert!(o.status.success(), "{}", text(&o));
    // kill at a step that varies from run to run, after the first checkpoint
    let b = root.join("b");
    let mut child = bin().args(tiny_train(s(&data), s(&b), &extra)).spawn().unwrap();
    let ck = b.join("checkpoint.safetensors");
    let t0 = Instant::now();
    while !ck.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis((std::process::id() % 7) as u64 * 30));
    let _ = child.kill();
    let _ = child.wait();
    assert!(!b.join("model.safetensors").exists(), "killed too late: the run had finished");
    let at: serde_json::Value =
        serde_json::from_str(&weights::read_metadata_entry(&ck, "progress").unwrap().unwrap()).unwrap();
    eprintln!("killed after checkpoint at global step {}", at["global_step"]);
    let o = run(&tiny_train(s(&data), s(&b), &[&extra[..], &["--resume"]].concat()));
    assert!(o.status.success(), "{}", text(&o));
    let (ta, tb) = (model_tensors(&a.join("model.safetensors")), model_tensors(&b.join("model.safetensors")));
    let differ: Vec<&String> = ta.keys().filter(|k| ta[*k] != tb[*k]).collect();
    assert!(differ.is_empty(), "{} of {} tensors differ after kill + resume", differ.len(), ta.len());
    // the metrics agree too, except the timings (images/s, seconds)
    let cols = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| {
                l.split(',')
                    .enumerate()
                    .filter(|(i, _)| *i != 7 && *i != 8)
                    .map(|(_, c)| c)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    };
    assert_eq!(cols(&a), cols(&b));
    let left: Vec<String> = walk(&b).into_iter().filter(|n| n.ends_with(".tmp") || n.ends_with(".lock")).collect();
    assert!(left.is_empty(), "{left:?}");
}
