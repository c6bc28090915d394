//! The frozen `fast` engine against the burn path, every model, two sizes, with the
//! deterministic weights of the block tests (non-trivial BatchNorm, biases). Whole-model
//! parity of the fast engine against timm / facenet is in `parity_full.rs`.

mod common;

use burn::tensor::Device;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::predict::{EngineKind, Predictor};

fn agree(kind: ModelKind, size: usize) {
    agree_cfg(ModelConfig::new(kind, 11), size)
}

fn agree_cfg(cfg: ModelConfig, size: usize) {
    let kind = cfg.model;
    let device = Device::flex();
    let make = || common::deterministic(Model::new(&cfg, &device));
    let burn = Predictor::new(make(), EngineKind::Burn, &device);
    let fast = Predictor::new(make(), EngineKind::Fast, &device);
    let shape = [2, 3, size, size];
    let x: Vec<f32> =
        common::det_uniform("engine.input", shape.iter().product()).iter().map(|v| (v * 2.0 - 1.0) as f32).collect();
    let (a, b) = (burn.run(&x, shape, true), fast.run(&x, shape, true));
    let pairs = a.stages.iter().zip(&b.stages).chain([
        (&a.pre_logits, &b.pre_logits),
        (&a.logits, &b.logits),
        (&a.embedding, &b.embedding),
    ]);
    for (i, (p, q)) in pairs.enumerate() {
        assert_eq!(p.shape, q.shape, "{kind} output {i}");
        let d = p.data.iter().zip(&q.data).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
        let scale = p.data.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4 * scale.max(1.0), "{kind} {size}px output {i}: diff {d:e} (max |x| {scale})");
        assert!(scale > 1e-3, "{kind} output {i} is trivially small ({scale})");
    }
}

#[test]
fn fast_engine_matches_burn_inception_v4() {
    agree(ModelKind::InceptionV4, 75);
    agree(ModelKind::InceptionV4, 107);
    // any width: 0.37 rounds 192 and 2 x 96 differently, so block inputs differ from outputs
    for width in [0.37, 0.5] {
        agree_cfg(ModelConfig { width, ..ModelConfig::new(ModelKind::InceptionV4, 7) }, 75);
    }
}

#[test]
fn fast_engine_matches_burn_inception_resnet_v2() {
    agree(ModelKind::InceptionResnetV2, 75);
    agree(ModelKind::InceptionResnetV2, 128);
}

#[test]
fn fast_engine_matches_burn_inception_resnet_v1() {
    agree(ModelKind::InceptionResnetV1, 80);
    agree(ModelKind::InceptionResnetV1, 160);
}

#[test]
fn fast_engine_matches_burn_paper_layouts() {
    agree(ModelKind::InceptionResnetV2Paper, 75);
    agree(ModelKind::InceptionResnetV1Paper, 75);
}

#[test]
fn fast_engine_matches_burn_at_other_widths_and_without_shortcuts() {
    for kind in [ModelKind::InceptionResnetV2, ModelKind::InceptionResnetV1, ModelKind::InceptionResnetV2Paper] {
        agree_cfg(ModelConfig { width: 0.37, ..ModelConfig::new(kind, 7) }, 75);
        agree_cfg(ModelConfig { width: 0.5, plain: true, ..ModelConfig::new(kind, 7) }, 80);
    }
    agree_cfg(
        ModelConfig { width: 1.3, residual_scale: Some(0.3), ..ModelConfig::new(ModelKind::InceptionResnetV1Paper, 5) },
        75,
    );
}

#[test]
fn fast_engine_batch_rows_equal_each_image_alone() {
    // a batch runs image by image (whole rounds one per thread, the rest with parallel GEMMs):
    // every row is bit-identical to the image run alone, stage maps included
    let device = Device::flex();
    let cfg = ModelConfig { width: 0.3, ..ModelConfig::new(ModelKind::InceptionResnetV2, 3) };
    let fast = Predictor::new(common::deterministic(Model::new(&cfg, &device)), EngineKind::Fast, &device);
    let (n, s) = (5, 75);
    let per = 3 * s * s;
    let x: Vec<f32> = common::det_uniform("engine.batch", n * per).iter().map(|v| (v * 2.0 - 1.0) as f32).collect();
    let all = fast.run(&x, [n, 3, s, s], true);
    for i in 0..n {
        let one = fast.run(&x[i * per..(i + 1) * per], [1, 3, s, s], true);
        let pairs = one.stages.iter().zip(&all.stages).chain([(&one.logits, &all.logits)]);
        for (k, (a, b)) in pairs.enumerate() {
            let len = a.data.len();
            assert_eq!(a.data, b.data[i * len..(i + 1) * len], "image {i} output {k}");
        }
    }
}
