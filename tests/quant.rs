//! int8 inference (`inception quantize`, `crate::quant`): the quantized demo model agrees with
//! its f32 self, its file describes itself and is checked strictly, bad files and flags fail
//! with exit 2.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{run, s, text, unique_temp_dir};
use inception::Bundle;
use inception::predict::EngineKind;

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/samples")
}

/// The demo model quantized on its own sample images (once per test process).
fn int8_demo() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let out = unique_temp_dir("inception-quant").join("demo_int8.safetensors");
        let o = run(&["quantize", "--calib", s(&samples()), "--images", "10", "--out", s(&out)]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("convolutions int8"), "{}", text(&o));
        out
    })
}

fn top1(json: &[u8]) -> Vec<(String, usize)> {
    let v: serde_json::Value = serde_json::from_slice(json).expect("classify --json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["image"].as_str().unwrap().to_string(), r["top"][0]["index"].as_u64().unwrap() as usize))
        .collect()
}

#[test]
fn quantized_demo_agrees_with_f32_and_is_smaller() {
    let q = int8_demo();
    let images: Vec<PathBuf> = std::fs::read_dir(samples()).unwrap().map(|e| e.unwrap().path()).collect();
    let mut args = vec!["classify", "--json", "--top", "1"];
    let paths: Vec<&str> = images.iter().map(|p| s(p)).collect();
    let f32_out = run(&[args.clone(), paths.clone()].concat());
    assert!(f32_out.status.success(), "{}", text(&f32_out));
    args.extend(["--weights", s(q)]);
    let q_out = run(&[args, paths].concat());
    assert!(q_out.status.success(), "{}", text(&q_out));
    let (a, b) = (top1(&f32_out.stdout), top1(&q_out.stdout));
    assert_eq!(a.len(), 10);
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(agree >= 9, "int8 top-1 agrees with f32 on {agree} of 10: {a:?} vs {b:?}");
    // int8 weights: about a quarter of the f32 file
    let f32_bytes =
        std::fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model.safetensors")).unwrap().len();
    let q_bytes = std::fs::metadata(q).unwrap().len();
    assert!(q_bytes * 3 < f32_bytes, "{q_bytes} vs {f32_bytes}");
}

#[test]
fn quantized_logits_stay_close_to_f32() {
    let dev = Device::flex();
    let f = Bundle::demo(&dev).unwrap();
    let q = Bundle::load(None, Some(int8_demo()), &dev).unwrap();
    // the RGB stem (signed input, no padding) takes a zero point: every convolution runs int8
    assert!(q.int8.as_ref().is_some_and(|(_, c)| c.int8_convs == c.convs), "every convolution runs int8");
    assert_eq!(q.classes, f.classes);
    let (pf, pq) = (f.predictor(EngineKind::Fast, &dev).unwrap(), q.predictor(EngineKind::Fast, &dev).unwrap());
    let s = f.pre.input_size;
    for e in std::fs::read_dir(samples()).unwrap() {
        let x = f.pre.load(&e.unwrap().path()).unwrap();
        let (a, b) = (pf.run(&x, [1, 3, s, s], false).logits.data, pq.run(&x, [1, 3, s, s], false).logits.data);
        let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
        let den: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(num / den < 0.1, "relative logit error {}", num / den);
    }
    // the burn engine cannot run an int8 file
    let err = q.predictor(EngineKind::Burn, &dev).err().expect("burn refuses int8").to_string();
    assert!(err.contains("fast"), "{err}");
}

#[test]
fn int8_files_are_checked_strictly() {
    let q = int8_demo();
    let dir = q.parent().unwrap();
    // truncated
    let bytes = std::fs::read(q).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&["classify", "--weights", s(&cut), s(&samples().join("bag_18.png"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // a tensor of the wrong shape: named with both shapes
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let t = owned.iter_mut().find(|t| t.0 == "conv.5.weight_scale").expect("conv.5 is int8");
    t.2 = vec![t.2[0] / 2, 2];
    let views: Vec<_> = owned
        .iter()
        .map(|(k, d, sh, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    let bad = dir.join("bad_shape.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    let o = run(&["classify", "--weights", s(&bad), s(&samples().join("bag_18.png"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("conv.5.weight_scale") && text(&o).contains("expected shape"), "{}", text(&o));
    // quantized for an older engine layout (no `layout` in its config): refused, not run on
    // input grids calibrated for another dataflow
    let mut old = meta.metadata().clone().unwrap();
    let cfg = old.get_mut("quantization").unwrap();
    *cfg = cfg.replace(",\"layout\":2", "");
    assert!(!cfg.contains("layout"), "{cfg}");
    let views = st.tensors();
    let stale = dir.join("old_layout.safetensors");
    std::fs::write(&stale, safetensors::serialize(views, Some(old)).unwrap()).unwrap();
    let o = run(&["classify", "--weights", s(&stale), s(&samples().join("bag_18.png"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("engine layout 1") && text(&o).contains("inception quantize"), "{}", text(&o));
    // burn engine, re-quantizing, out-of-range flags
    let o = run(&["--engine", "burn", "classify", "--weights", s(q), s(&samples().join("bag_18.png"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(&["quantize", "--weights", s(q), "--calib", s(&samples()), "--out", s(&dir.join("again.safetensors"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("already an int8 model"), "{}", text(&o));
    for (flag, v) in [("--percentile", "40"), ("--percentile", "NaN"), ("--images", "0")] {
        let o = run(&["quantize", "--calib", s(&samples()), flag, v, "--out", s(&dir.join("x.safetensors"))]);
        assert_eq!(o.status.code(), Some(2), "{flag} {v}: {}", text(&o));
    }
    let o = run(&["quantize", "--calib", s(&dir.join("nowhere")), "--out", s(&dir.join("x.safetensors"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn int8_embed_and_bench_run() {
    let q = int8_demo();
    let out = q.parent().unwrap().join("emb.safetensors");
    let o = run(&["embed", "--weights", s(q), "--out", s(&out), s(&samples())]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "bench",
        "--model",
        "inception_resnet_v1",
        "--size",
        "75",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--precision",
        "int8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["config"]["precision"], "int8");
}

#[test]
fn u8_dataflow_equals_quantizing_every_input_bit_for_bit() {
    // int8 convolutions hand u8 straight to the int8 convolutions after them (inside branches,
    // from the merged 1x1 to its branches, from the branches to a residual up-projection,
    // along the stem); the result must be the one of each convolution quantizing its own f32
    // input. Other widths leave channel counts that are not multiples of 4 (those stay f32),
    // and `plain` drops the shortcut.
    use inception::engine::Act;
    use inception::models::{Model, ModelConfig, ModelKind};
    let dev = Device::flex();
    let cases = [
        (ModelConfig::new(ModelKind::InceptionV4, 5), 75),
        (ModelConfig::new(ModelKind::InceptionResnetV2, 5), 75),
        (ModelConfig::new(ModelKind::InceptionResnetV1, 5), 80),
        (ModelConfig { width: 0.37, ..ModelConfig::new(ModelKind::InceptionResnetV2, 5) }, 75),
        (ModelConfig { width: 0.5, plain: true, ..ModelConfig::new(ModelKind::InceptionResnetV1Paper, 5) }, 75),
    ];
    for (cfg, size) in cases {
        let mut e = inception::lower::lower(common::deterministic(Model::new(&cfg, &dev)));
        let shape = [2, 3, size, size];
        let x: Vec<f32> =
            common::det_uniform("quant.flow", shape.iter().product()).iter().map(|v| (v * 2.0 - 1.0) as f32).collect();
        let x = Act::from_nchw(&x, shape);
        inception::quant::quantize_engine(&mut e, &mut std::iter::once(x.clone()), 99.9, &mut || {}).unwrap();
        e.set_u8_dataflow(true);
        let a = e.forward_features(x.clone());
        e.set_u8_dataflow(false);
        let b = e.forward_features(x);
        assert!(a.data.iter().any(|v| *v != 0.0), "{} output is all zeros", cfg.model);
        assert_eq!(a.data, b.data, "{} width {}", cfg.model, cfg.width);
    }
}
