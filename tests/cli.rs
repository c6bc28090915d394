//! The `inception` binary end to end: summary, check, classify and embed, with bad inputs.

mod common;

use common::{bin, run, text};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::weights;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("inception-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A random IR-v1 with 1000 classes (so ImageNet labels apply), saved once.
fn model_file() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let m = Model::new(&ModelConfig::new(ModelKind::InceptionResnetV1, 1000), &Device::flex());
        let p = dir().join("v1.safetensors");
        weights::save_model(&m, &p, &ModelKind::InceptionResnetV1.pretrained().pre, &[]).unwrap();
        p
    })
}

fn images() -> (PathBuf, Vec<PathBuf>) {
    let d = dir().join("images");
    std::fs::create_dir_all(&d).unwrap();
    let rgba = image::RgbaImage::from_fn(200, 120, |x, y| image::Rgba([x as u8, y as u8, 90, 128]));
    rgba.save(d.join("a_rgba.png")).unwrap();
    let gray = image::GrayImage::from_fn(90, 170, |x, y| image::Luma([(x * y) as u8]));
    gray.save(d.join("b_gray.jpg")).unwrap();
    std::fs::write(d.join("c_corrupt.jpg"), b"\xff\xd8\xff not really a jpeg").unwrap();
    let files = ["a_rgba.png", "b_gray.jpg", "c_corrupt.jpg"].map(|f| d.join(f)).to_vec();
    (d, files)
}

#[test]
fn summary_prints_totals() {
    let o = run(&["summary", "--model", "inception-v4", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total_params"], 42_679_816);
    assert_eq!(v["total_macs"], 12_253_974_624u64);
    let o = run(&["summary", "--model", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("'nope'") && text(&o).contains("inception_resnet_v2"), "{}", text(&o));
}

#[test]
fn check_passes_on_own_outputs_and_fails_on_perturbed() {
    let device = Device::flex();
    let m = weights::load(
        Model::new(&ModelConfig::new(ModelKind::InceptionResnetV1, 1000), &device),
        model_file(),
        &Default::default(),
    )
    .unwrap();
    let x = Tensor::<4>::random([1, 3, 96, 96], burn::tensor::Distribution::Uniform(-1.0, 1.0), &device);
    let logits = m.forward(x.clone());
    let vec = |t: Tensor<2>| (t.dims().to_vec(), t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
    let (xs, xd) = (x.dims().to_vec(), x.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
    let (ls, ld) = vec(logits);
    let mut t = std::collections::BTreeMap::from([
        ("input".to_string(), (xs, xd)),
        ("logits".to_string(), (ls.clone(), ld.clone())),
    ]);
    let io = dir().join("io.safetensors");
    weights::save_tensors(&io, &t, None).unwrap();
    let args = [
        "check",
        "--model",
        "inception_resnet_v1",
        "--weights",
        model_file().to_str().unwrap(),
        "--inputs",
        io.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("logits max_abs_diff="));
    let mut bad = ld;
    bad[3] += 0.01;
    t.insert("logits".into(), (ls, bad));
    weights::save_tensors(&io, &t, None).unwrap();
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FAIL"));
}

#[test]
fn bad_weights_exit_with_a_message() {
    let p = dir().join("garbage.safetensors");
    std::fs::write(&p, b"garbage").unwrap();
    let o =
        run(&["check", "--model", "inception_v4", "--weights", p.to_str().unwrap(), "--inputs", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("garbage.safetensors"), "{}", text(&o));
}

#[test]
fn classify_reports_bad_images_and_goes_on() {
    let (_, files) = images();
    let mut args = vec![
        "classify",
        "--model",
        "inception_resnet_v1",
        "--weights",
        model_file().to_str().unwrap(),
        "--top",
        "3",
        "--json",
    ];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(|s| s.as_str()));
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1), "one image is corrupt: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3, "one row per image, the corrupt one with its error");
    assert_eq!(rows.iter().filter(|r| r["error"].is_string()).count(), 1);
    assert_eq!(v[0]["top"].as_array().unwrap().len(), 3);
    let p: f64 = v[0]["top"][0]["prob"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("c_corrupt.jpg"));
}

#[test]
fn embed_writes_embeddings_with_paths() {
    let (d, _) = images();
    let out = dir().join("emb.safetensors");
    let o = run(&[
        "embed",
        "--model",
        "inception_resnet_v1",
        "--weights",
        model_file().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        d.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "one image skipped: {}", text(&o));
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap();
    let paths: Vec<String> = serde_json::from_str(&meta["paths"]).unwrap();
    assert_eq!(paths.len(), 2);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("embeddings").unwrap().shape(), &[2, 512]);
    // a stage's feature map
    let o = run(&[
        "embed",
        "--model",
        "inception_resnet_v1",
        "--weights",
        model_file().to_str().unwrap(),
        "--layer",
        "repeat_2",
        "--out",
        out.to_str().unwrap(),
        d.join("a_rgba.png").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("embeddings").unwrap().shape(), &[1, 896, 8, 8]);
}

#[test]
fn demo_model_classifies_the_shipped_samples_offline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    let names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"];
    let mut args = vec!["classify".to_string(), "--json".into(), "--top".into(), "1".into()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut correct = 0;
    for (f, pred) in files.iter().zip(v.as_array().unwrap()) {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = names.iter().position(|n| stem.rsplit_once('_').map(|(a, _)| a) == Some(*n)).unwrap();
        correct += (pred["top"][0]["index"].as_u64() == Some(truth as u64)) as usize;
    }
    assert!(correct >= 8, "only {correct} of {} samples right: {}", files.len(), text(&o));
}

#[test]
fn preprocess_writes_what_the_network_sees() {
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/portrait_coffee.png");
    let out = dir().join("x.safetensors");
    let o = run(&["preprocess", "--model", "inception_v4", photo.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&out).unwrap();
    let x = weights::tensor_f32(&out, &weights::parse(&out, &bytes).unwrap(), "input").unwrap();
    assert_eq!(x.shape, vec![1, 3, 299, 299]);
    let pre = ModelKind::InceptionV4.pretrained().pre;
    assert_eq!(x.data, pre.load(&photo).unwrap());
    // --size / --crop-pct override; out-of-range values are refused
    let o = run(&[
        "preprocess",
        "--model",
        "inception_v4",
        "--size",
        "80",
        photo.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "preprocess",
        "--model",
        "inception_v4",
        "--crop-pct",
        "0",
        photo.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// A model file that describes itself: 2 classes with names, 80 px, grayscale.
fn described_model() -> PathBuf {
    let cfg = ModelConfig { width: 0.1, ..ModelConfig::new(ModelKind::InceptionResnetV1, 2) };
    let m = Model::new(&cfg, &Device::flex());
    let pre = inception::Preprocess { input_size: 80, grayscale: true, ..inception::Preprocess::facenet() };
    let p = dir().join("described.safetensors");
    weights::save_model(&m, &p, &pre, &["cat".to_string(), "dog".to_string()]).unwrap();
    p
}

#[test]
fn classify_uses_the_files_own_description() {
    let p = described_model();
    let (_, files) = images();
    let o = run(&["classify", "--weights", p.to_str().unwrap(), "--json", files[0].to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v[0]["top"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"cat") && names.contains(&"dog"), "{names:?}");
    let o = run(&[
        "preprocess",
        "--weights",
        p.to_str().unwrap(),
        files[0].to_str().unwrap(),
        "--out",
        dir().join("d.safetensors").to_str().unwrap(),
    ]);
    assert!(text(&o).contains("[1, 3, 80, 80]"), "{}", text(&o));
    // a contradicting --model names both
    let o = run(&["classify", "--model", "inception_v4", "--weights", p.to_str().unwrap(), files[0].to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("inception_v4") && text(&o).contains("inception_resnet_v1"), "{}", text(&o));
}
