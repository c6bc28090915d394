//! Whole-model parity against timm / facenet-pytorch (max abs diff <= 1e-4 on logits,
//! pre-logits, embeddings and the timm feature maps) at two input sizes per model.
//! The fixtures are large and generated on demand:
//!
//!     python3 scripts/reference/make_full.py --out fixtures/full
//!     cargo test --release --test parity_full -- --ignored

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use inception::models::{Model, ModelConfig, ModelKind, l2_normalize};
use inception::weights::{self, LoadOptions};

const ATOL: f32 = 1e-4;

fn full(kind: ModelKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/full").join(kind.name())
}

fn parity(kind: ModelKind, classes: usize, sizes: [usize; 2]) {
    let device = Device::flex();
    let dir = full(kind);
    assert!(dir.exists(), "{} missing: run python3 scripts/reference/make_full.py", dir.display());
    let m = Model::new(&ModelConfig { model: kind, num_classes: classes }, &device);
    let m = weights::load(m, &dir.join("model.safetensors"), &LoadOptions::default()).unwrap();
    for size in sizes {
        let io = dir.join(format!("io_{size}.safetensors"));
        let x = common::read_tensor::<4>(&io, "input", &device);
        let stages = m.forward_stages(x.clone());
        let feats = stages.last().unwrap().clone();
        let pre = m.forward_head(feats.clone(), true);
        let logits = m.forward_head(feats, false);
        let mut checks: Vec<(String, f32)> = vec![
            ("logits".into(), common::max_abs_diff(logits, common::read_tensor(&io, "logits", &device))),
            ("pre_logits".into(), common::max_abs_diff(pre.clone(), common::read_tensor(&io, "pre_logits", &device))),
        ];
        if kind == ModelKind::InceptionResnetV1 {
            let e = common::read_tensor::<2>(&io, "embedding", &device);
            checks.push(("embedding".into(), common::max_abs_diff(l2_normalize(pre), e)));
        } else {
            for (i, s) in stages.into_iter().enumerate() {
                let want: Tensor<4> = common::read_tensor(&io, &format!("stage{i}"), &device);
                checks.push((format!("stage{i}"), common::max_abs_diff(s, want)));
            }
        }
        for (name, d) in checks {
            println!("{kind} {size} {name} max_abs_diff={d:.3e}");
            assert!(d <= ATOL, "{kind} at {size}: {name} differs by {d:e}");
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
