//! Bad weight files: every problem is reported with its key and shapes, hostile or broken files
//! give errors, never panics. Also f16 input and class-count changes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;
use inception::error::{Error, KeyProblem};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::weights::{self, LoadOptions};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("inception-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn v1(classes: usize) -> Model {
    Model::new(&ModelConfig::new(ModelKind::InceptionResnetV1, classes), &Device::flex())
}

/// The tensors of a 5-class IR-v1, computed once.
fn reference() -> &'static Tensors {
    static T: OnceLock<Tensors> = OnceLock::new();
    T.get_or_init(|| weights::export_tensors(&v1(5)))
}

fn load(path: &Path, classes: usize, new_classifier: bool) -> Result<Model, Error> {
    weights::load(v1(classes), path, &LoadOptions { new_classifier })
}

fn problems(e: Error) -> Vec<KeyProblem> {
    match e {
        Error::WeightMismatch { problems, .. } => problems,
        other => panic!("expected a weight mismatch, got {other}"),
    }
}

#[test]
fn round_trip_loads_and_ignores_num_batches_tracked() {
    let path = tmp("ok.safetensors");
    // a file as torch writes it: with int64 num_batches_tracked
    let mut owned: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = reference()
        .iter()
        .map(|(k, (s, d))| (k.clone(), s.clone(), Dtype::F32, d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    owned.push(("conv2d_1a.bn.num_batches_tracked".into(), vec![], Dtype::I64, 7i64.to_le_bytes().to_vec()));
    write(&path, &owned);
    let m = load(&path, 5, false).expect("valid file loads");
    let back = weights::export_tensors(&m);
    assert_eq!(back.get("logits.weight").unwrap().1, reference().get("logits.weight").unwrap().1);
    assert_eq!(back.get("repeat_3.4.conv2d.bias").unwrap().1, reference().get("repeat_3.4.conv2d.bias").unwrap().1);
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(k, s, dt, b)| (k.clone(), TensorView::new(*dt, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn every_problem_is_listed_with_key_and_shapes() {
    let mut t: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = reference()
        .iter()
        .filter(|(k, _)| k.as_str() != "block8.conv2d.bias")
        .map(|(k, (s, d))| {
            let shape = if k == "mixed_6a.branch0.conv.weight" { vec![384, 256, 1, 9] } else { s.clone() };
            let dtype = if k == "last_bn.running_mean" { Dtype::I32 } else { Dtype::F32 };
            (k.clone(), shape, dtype, d.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    t.push(("extra.weight".into(), vec![2, 3], Dtype::F32, vec![0; 24]));
    let path = tmp("bad.safetensors");
    write(&path, &t);
    let err = load(&path, 5, false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad.safetensors") && msg.contains("4 problem"), "{msg}");
    let p = problems(err);
    assert!(p.contains(&KeyProblem::Missing { key: "block8.conv2d.bias".into(), expected: vec![1792] }), "{p:?}");
    assert!(p.contains(&KeyProblem::Unexpected { key: "extra.weight".into(), found: vec![2, 3] }), "{p:?}");
    assert!(
        p.contains(&KeyProblem::Shape {
            key: "mixed_6a.branch0.conv.weight".into(),
            expected: vec![384, 256, 3, 3],
            found: vec![384, 256, 1, 9]
        }),
        "{p:?}"
    );
    assert!(p.contains(&KeyProblem::Dtype { key: "last_bn.running_mean".into(), dtype: "I32".into() }), "{p:?}");
    assert_eq!(p.len(), 4);
}

#[test]
fn other_class_count_needs_to_be_asked_for() {
    let path = tmp("classes.safetensors");
    weights::save_tensors(&path, reference(), None).unwrap();
    let p = problems(load(&path, 3, false).unwrap_err());
    assert!(p.iter().all(|p| matches!(p, KeyProblem::Shape { key, .. } if key.starts_with("logits."))), "{p:?}");
    let m = load(&path, 3, true).expect("new classifier requested");
    assert_eq!(m.num_classes(), 3);
}

#[test]
fn half_precision_files_are_converted() {
    let t: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = reference()
        .iter()
        .map(|(k, (s, d))| {
            let bytes = d.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            (k.clone(), s.clone(), Dtype::F16, bytes)
        })
        .collect();
    let path = tmp("half.safetensors");
    write(&path, &t);
    let m = load(&path, 5, false).expect("f16 loads");
    let got = &weights::export_tensors(&m)["logits.weight"].1;
    let want: Vec<f32> = reference()["logits.weight"].1.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_eq!(got, &want);
}

fn expect_invalid(name: &str, bytes: &[u8]) {
    let path = tmp(name);
    std::fs::write(&path, bytes).unwrap();
    match load(&path, 5, false) {
        Err(Error::Safetensors { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("{name}: expected a safetensors error, got {other}"),
        Ok(_) => panic!("{name}: loaded"),
    }
}

#[test]
fn hostile_and_broken_files_are_errors() {
    expect_invalid("empty.safetensors", b"");
    expect_invalid("garbage.safetensors", b"this is not a weight file at all");
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    expect_invalid("huge_header.safetensors", &huge);
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut overlap = (header.len() as u64).to_le_bytes().to_vec();
    overlap.extend_from_slice(header);
    overlap.extend_from_slice(&[0u8; 12]);
    expect_invalid("overlap.safetensors", &overlap);
    // a real file cut short
    let path = tmp("full.safetensors");
    weights::save_tensors(&path, reference(), None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    expect_invalid("truncated.safetensors", &bytes[..bytes.len() / 2]);
    // missing file
    match load(&tmp("does-not-exist.safetensors"), 5, false) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("does-not-exist.safetensors")),
        other => panic!("expected an io error, got {:?}", other.err().map(|e| e.to_string())),
    }
}
