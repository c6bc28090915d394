//! Structure against the references: parameter counts, the exact key / shape lists of the
//! timm and facenet-pytorch state dicts, feature shapes at two input sizes, the classifier API.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::summary::summarize;
use inception::weights::param_shapes;

fn model(kind: ModelKind, num_classes: usize) -> Model {
    Model::new(&ModelConfig::new(kind, num_classes), &Device::flex())
}

#[test]
fn parameter_counts_equal_the_references() {
    assert_eq!(model(ModelKind::InceptionV4, 1000).num_params(), 42_679_816);
    assert_eq!(model(ModelKind::InceptionResnetV2, 1000).num_params(), 55_843_464);
    // facenet-pytorch InceptionResnetV1(classify=True, num_classes=100): 23,482,624 + 51,300
    assert_eq!(model(ModelKind::InceptionResnetV1, 100).num_params(), 23_533_924);
}

/// `key -> shape` of a reference key list (`num_batches_tracked` dropped: it is not a float).
fn reference_keys(file: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(common::fixtures().join("keys").join(file)).unwrap();
    text.lines()
        .filter_map(|l| {
            let mut cols = l.split('\t');
            let key = cols.next()?.to_string();
            let shape: Vec<usize> = serde_json::from_str(cols.next()?).ok()?;
            (!key.ends_with("num_batches_tracked")).then_some((key, shape))
        })
        .collect()
}

fn assert_keys(kind: ModelKind, classes: usize, file: &str) {
    let ours: BTreeMap<String, Vec<usize>> = param_shapes(&model(kind, classes)).into_iter().collect();
    let theirs = reference_keys(file);
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{kind}: missing {missing:?}, extra {extra:?}");
    for (k, s) in &theirs {
        assert_eq!(&ours[k], s, "{kind}: shape of {k}");
    }
}

#[test]
fn keys_and_shapes_equal_timm_inception_v4() {
    assert_keys(ModelKind::InceptionV4, 1000, "keys_inception_v4.txt");
}

#[test]
fn keys_and_shapes_equal_timm_inception_resnet_v2() {
    assert_keys(ModelKind::InceptionResnetV2, 1000, "keys_inception_resnet_v2.txt");
}

#[test]
fn keys_and_shapes_equal_facenet_inception_resnet_v1() {
    assert_keys(ModelKind::InceptionResnetV1, 100, "keys_inception_resnet_v1_facenet.txt");
}

fn stage_shapes(kind: ModelKind, size: usize) -> Vec<Vec<usize>> {
    let s = summarize(&model(kind, 10), size).unwrap();
    s.stages.iter().map(|r| r.output.clone()).collect()
}

#[test]
fn feature_shapes_at_two_sizes() {
    // 299: the published size; 75: the smallest every network accepts.
    assert_eq!(
        stage_shapes(ModelKind::InceptionV4, 299),
        vec![
            vec![1, 64, 147, 147],
            vec![1, 160, 73, 73],
            vec![1, 384, 35, 35],
            vec![1, 1024, 17, 17],
            vec![1, 1536, 8, 8],
            vec![1, 10]
        ]
    );
    assert_eq!(
        stage_shapes(ModelKind::InceptionResnetV2, 75),
        vec![
            vec![1, 64, 35, 35],
            vec![1, 192, 15, 15],
            vec![1, 320, 7, 7],
            vec![1, 1088, 3, 3],
            vec![1, 1536, 1, 1],
            vec![1, 10]
        ]
    );
    assert_eq!(
        stage_shapes(ModelKind::InceptionResnetV1, 160),
        vec![
            vec![1, 64, 77, 77],
            vec![1, 192, 36, 36],
            vec![1, 256, 17, 17],
            vec![1, 896, 8, 8],
            vec![1, 1792, 3, 3],
            vec![1, 10]
        ]
    );
    assert!(summarize(&model(ModelKind::InceptionV4, 10), 74).is_err());
}

#[test]
fn feature_info_matches_timm() {
    let info = model(ModelKind::InceptionResnetV2, 0).feature_info();
    let got: Vec<(String, usize, usize)> = info.into_iter().map(|f| (f.module, f.channels, f.reduction)).collect();
    let want = [
        ("conv2d_2b", 64, 2),
        ("conv2d_4a", 192, 4),
        ("repeat", 320, 8),
        ("repeat_1", 1088, 16),
        ("conv2d_7b", 1536, 32),
    ];
    assert_eq!(got, want.map(|(m, c, r)| (m.to_string(), c, r)));
    let v4: Vec<String> = model(ModelKind::InceptionV4, 0).feature_info().into_iter().map(|f| f.module).collect();
    assert_eq!(v4, ["features.2", "features.3", "features.9", "features.17", "features.21"]);
}

#[test]
fn classifier_reset_pre_logits_and_embedding() {
    let device = Device::flex();
    let m = model(ModelKind::InceptionResnetV1, 0);
    assert_eq!(m.num_classes(), 0);
    let x = Tensor::<4>::ones([2, 3, 80, 80], &device);
    let e = m.embed(x.clone());
    assert_eq!(e.dims(), [2, 512]);
    let norms: Vec<f32> = e.powi_scalar(2).sum_dim(1).sqrt().into_data().convert::<f32>().try_into_vec().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
    let m = m.reset_classifier(7, &device);
    assert_eq!(m.num_classes(), 7);
    assert_eq!(m.forward(x.clone()).dims(), [2, 7]);
    let f = m.forward_features(x);
    assert_eq!(m.forward_head(f, true).dims(), [2, 512]);
}

#[test]
fn model_names_parse_like_timm() {
    for (s, k) in [
        ("inception_v4", ModelKind::InceptionV4),
        ("inception-resnet-v2", ModelKind::InceptionResnetV2),
        ("timm/inception_resnet_v2.tf_in1k", ModelKind::InceptionResnetV2),
        ("Inception_ResNet_v1", ModelKind::InceptionResnetV1),
    ] {
        assert_eq!(s.parse::<ModelKind>().unwrap(), k);
    }
    let err = "resnet50".parse::<ModelKind>().unwrap_err().to_string();
    assert!(err.contains("resnet50") && err.contains("inception_v4"), "{err}");
}

#[test]
fn paper_layouts_follow_the_figures() {
    // Fig. 3 stem + 5/10/5 blocks; Inception-ResNet-C at 2144 (see IrConfig::paper_v2)
    let v2: Vec<Vec<usize>> = stage_shapes(ModelKind::InceptionResnetV2Paper, 299);
    assert_eq!(
        v2,
        vec![
            vec![1, 64, 147, 147],
            vec![1, 192, 71, 71],
            vec![1, 384, 35, 35],
            vec![1, 1152, 17, 17],
            vec![1, 2144, 8, 8],
            vec![1, 10]
        ]
    );
    let v1 = stage_shapes(ModelKind::InceptionResnetV1Paper, 299);
    assert_eq!(v1[2..5], [vec![1, 256, 35, 35], vec![1, 896, 17, 17], vec![1, 1792, 8, 8]]);
    let m = model(ModelKind::InceptionResnetV2Paper, 10);
    let Model::Ir(ir) = &m else { panic!("not an Inception-ResNet") };
    assert_eq!((ir.repeat.len(), ir.repeat_1.len(), ir.repeat_2.len()), (5, 10, 5));
    assert!(ir.block8.is_none() && ir.conv2d_7b.is_none());
}

#[test]
fn width_multiplier_scales_channels_consistently() {
    for kind in [ModelKind::InceptionResnetV2, ModelKind::InceptionResnetV1, ModelKind::InceptionResnetV2Paper] {
        for width in [0.1, 0.25, 0.5] {
            let m = Model::new(&ModelConfig { width, ..ModelConfig::new(kind, 3) }, &Device::flex());
            let s = summarize(&m, 75).unwrap();
            assert_eq!(s.stages.last().unwrap().output, vec![1, 3], "{kind} at width {width}");
            assert!(m.num_params() < model(kind, 3).num_params() / 2);
        }
    }
}
