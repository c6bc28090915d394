//! Whole-model parity against timm / facenet-pytorch (max abs diff <= 1e-4 on logits,
//! pre-logits, embeddings and the timm feature maps) at two input sizes per model.
//! The fixtures are large and generated on demand:
//!
//!     python3 scripts/reference/make_full.py --out fixtures/full
//!     cargo test --release --test parity_full -- --ignored

mod common;

use std::path::PathBuf;

use burn::tensor::Device;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::predict::{EngineKind, Predictor};
use inception::weights::{self, LoadOptions};

const ATOL: f32 = 1e-4;

fn full(kind: ModelKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/full").join(kind.name())
}

fn parity(kind: ModelKind, classes: usize, sizes: [usize; 2]) {
    for engine in [EngineKind::Burn, EngineKind::Fast] {
        let device = Device::flex();
        let dir = full(kind);
        assert!(dir.exists(), "{} missing: run python3 scripts/reference/make_full.py", dir.display());
        let m = Model::new(&ModelConfig::new(kind, classes), &device);
        let m = weights::load(m, &dir.join("model.safetensors"), &LoadOptions::default()).unwrap();
        let p = Predictor::new(m, engine, &device);
        for size in sizes {
            let io = dir.join(format!("io_{size}.safetensors"));
            let bytes = weights::read_file(&io).unwrap();
            let st = weights::parse(&io, &bytes).unwrap();
            let x = weights::tensor_f32(&io, &st, "input").unwrap();
            let out = p.run(&x.data, [x.shape[0], x.shape[1], x.shape[2], x.shape[3]], true);
            let mut got: Vec<(String, &inception::predict::Output)> =
                out.stages.iter().enumerate().map(|(i, o)| (format!("stage{i}"), o)).collect();
            got.extend([("logits".to_string(), &out.logits), ("pre_logits".to_string(), &out.pre_logits)]);
            got.push(("embedding".to_string(), &out.embedding));
            let mut compared = 0;
            for (name, o) in got {
                let Ok(want) = weights::tensor_f32(&io, &st, &name) else { continue };
                assert_eq!(o.shape, want.shape, "{kind} {name}");
                let d = o.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                println!("{kind} {engine:?} {size} {name} max_abs_diff={d:.3e}");
                assert!(d <= ATOL, "{kind} {engine:?} at {size}: {name} differs by {d:e}");
                compared += 1;
            }
            assert!(compared >= 3, "{kind}: too few reference tensors");
        }
    }
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_v4_matches_timm() {
    parity(ModelKind::InceptionV4, 1000, [299, 224]);
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_resnet_v2_matches_timm() {
    parity(ModelKind::InceptionResnetV2, 1000, [299, 224]);
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_resnet_v1_matches_facenet() {
    parity(ModelKind::InceptionResnetV1, 100, [160, 299]);
}
