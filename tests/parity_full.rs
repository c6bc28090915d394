//! Whole-model parity against timm / facenet-pytorch (max abs diff <= 1e-4 on logits,
//! pre-logits, embeddings and the timm feature maps) at two input sizes per model.
//! The fixtures are large and generated on demand:
//!
//!     python3 scripts/reference/make_full.py --out fixtures/full
//!     cargo test --release --test parity_full -- --ignored

use std::path::PathBuf;

use burn::tensor::Device;
use inception::models::ModelKind;
use inception::predict::{EngineKind, Predictor};
use inception::{Bundle, commands};

const ATOL: f32 = 1e-4;

fn full(kind: ModelKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/full").join(kind.name())
}

/// Through the library's `check` (the same loading and naming as `inception check`): the
/// weight file is recognised by its keys, every reference tensor present is compared.
fn parity(kind: ModelKind, sizes: [usize; 2]) {
    for engine in [EngineKind::Burn, EngineKind::Fast] {
        let device = Device::flex();
        let dir = full(kind);
        assert!(dir.exists(), "{} missing: run python3 scripts/reference/make_full.py", dir.display());
        let b = Bundle::load(None, Some(&dir.join("model.safetensors")), &device).unwrap();
        assert_eq!(b.model.kind(), kind);
        let p = Predictor::new(b.model, engine, &device);
        for size in sizes {
            let rows = commands::check(&p, &dir.join(format!("io_{size}.safetensors")), ATOL).unwrap();
            for r in &rows {
                println!("{kind} {engine:?} {size} {} max_abs_diff={:.3e}", r.name, r.max_abs_diff);
                assert!(r.ok, "{kind} {engine:?} at {size}: {} differs by {:e}", r.name, r.max_abs_diff);
            }
            assert!(rows.len() >= 3, "{kind}: too few reference tensors");
        }
    }
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_v4_matches_timm() {
    parity(ModelKind::InceptionV4, [299, 224]);
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_resnet_v2_matches_timm() {
    parity(ModelKind::InceptionResnetV2, [299, 224]);
}

#[test]
#[ignore = "needs fixtures/full (python3 scripts/reference/make_full.py)"]
fn inception_resnet_v1_matches_facenet() {
    parity(ModelKind::InceptionResnetV1, [160, 299]);
}
