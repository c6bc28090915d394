//! What the `inception` commands do, as library functions returning data (the binary only
//! parses flags, calls these and prints). Each takes a `Bundle`, so every command reads a
//! model file the same way and preprocesses with the same code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::predict::{Output, Predictor, softmax};
use crate::preprocess;
use crate::weights;

/// One class of a prediction.
#[derive(Clone, Debug, Serialize)]
pub struct Class {
    pub index: usize,
    pub name: String,
    pub prob: f32,
}

/// The top classes of one image, or why it failed.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub image: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<Class>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `k` most probable classes of one logits row (named from `classes`, else `class i`);
/// non-finite logits are an error.
pub fn top_k(classes: &[String], logits: &[f32], k: usize) -> Result<Vec<Class>> {
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid("the model produced non-finite scores (NaN / inf) for this input".into()));
    }
    let p = softmax(logits);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &c| p[c].total_cmp(&p[a]).then(a.cmp(&c)));
    let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| format!("class {i}"));
    Ok(idx.into_iter().take(k).map(|i| Class { index: i, name: name(i), prob: p[i] }).collect())
}

/// Classify each image on its own: a bad image is an error entry, the others go on.
pub fn classify(b: &Bundle, p: &Predictor, images: &[PathBuf], k: usize) -> Vec<Prediction> {
    let s = b.pre.input_size;
    images
        .iter()
        .map(|path| {
            let image = path.display().to_string();
            let r = b.pre.load(path).and_then(|x| top_k(&b.classes, &p.run(&x, [1, 3, s, s], false).logits.data, k));
            match r {
                Ok(top) => Prediction { image, top, error: None },
                Err(e) => Prediction { image, top: Vec::new(), error: Some(e.to_string()) },
            }
        })
        .collect()
}

/// What `embed` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct EmbedReport {
    pub out: PathBuf,
    pub shape: Vec<usize>,
    pub embedded: usize,
    pub skipped: Vec<(String, String)>,
}

/// Embed images and folders (pooled features, or a stage's map) into one safetensors file
/// (`embeddings`, with the image paths and skipped files in its metadata).
pub fn embed(
    b: &Bundle,
    p: &Predictor,
    layer: &str,
    inputs: &[PathBuf],
    out: &Path,
    batch: usize,
    on_image: &mut dyn FnMut(usize),
) -> Result<EmbedReport> {
    let stage = if layer == "pooled" {
        None
    } else {
        let info = crate::models::feature_info(p.kind(), p.width());
        Some(info.iter().position(|f| f.module == layer).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown layer '{layer}' (pooled, {})",
                info.iter().map(|f| f.module.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?)
    };
    let paths = preprocess::collect_images(inputs)?;
    let (mut done, mut skipped, mut data, mut shape) = (Vec::new(), Vec::new(), Vec::new(), Vec::<usize>::new());
    let s = b.pre.input_size;
    for chunk in paths.chunks(batch.max(1)) {
        let mut imgs = Vec::new();
        for path in chunk {
            match b.pre.load(path) {
                Ok(v) => {
                    imgs.push(v);
                    done.push(path.display().to_string());
                }
                Err(e) => skipped.push((path.display().to_string(), e.to_string())),
            }
        }
        on_image(chunk.len());
        if imgs.is_empty() {
            continue;
        }
        let mut o = p.run(&imgs.concat(), [imgs.len(), 3, s, s], stage.is_some());
        let t = match stage {
            None => o.embedding,
            Some(i) => o.stages.swap_remove(i),
        };
        if t.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid("the model produced non-finite embeddings (NaN / inf)".into()));
        }
        shape = t.shape;
        data.extend(t.data);
    }
    if done.is_empty() {
        return Err(Error::Invalid(format!("no image could be read ({} skipped)", skipped.len())));
    }
    shape[0] = done.len();
    let meta = HashMap::from([
        ("paths".to_string(), js(&done)),
        ("skipped".to_string(), js(&skipped.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>())),
        ("model".to_string(), p.kind().name().to_string()),
        ("layer".to_string(), layer.to_string()),
        ("source".to_string(), b.source.clone()),
        ("preprocess".to_string(), js(&b.pre)),
    ]);
    let tensors = BTreeMap::from([("embeddings".to_string(), (shape.clone(), data))]);
    weights::save_tensors(out, &tensors, Some(meta))?;
    Ok(EmbedReport { out: out.to_path_buf(), shape, embedded: done.len(), skipped })
}

fn js<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The exact tensor the network sees for `image` (`input`, `[1, 3, H, W]`), written to `out`
/// with the preprocessing config in the metadata.
pub fn preprocess_file(pre: &preprocess::Preprocess, image: &Path, out: &Path) -> Result<Vec<usize>> {
    pre.validate()?;
    let x = pre.load(image)?;
    let s = pre.input_size;
    let shape = vec![1, 3, s, s];
    let meta = HashMap::from([
        ("image".to_string(), image.display().to_string()),
        ("preprocess".to_string(), serde_json::to_string(pre).unwrap_or_default()),
    ]);
    weights::save_tensors(out, &BTreeMap::from([("input".to_string(), (shape.clone(), x))]), Some(meta))?;
    Ok(shape)
}

/// One compared tensor of `check`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    pub name: String,
    pub max_abs_diff: f32,
    pub ok: bool,
}

/// `(within atol, max |a - b|)`: a shape mismatch, or NaN / inf on either side, fails.
pub fn compare(got: &Output, expected: &weights::FileTensor, atol: f32) -> (bool, f32) {
    if got.shape != expected.shape {
        return (false, f32::INFINITY);
    }
    let mut diff = 0f32;
    for (a, b) in got.data.iter().zip(&expected.data) {
        if !a.is_finite() || !b.is_finite() {
            return (false, f32::NAN);
        }
        diff = diff.max((a - b).abs());
    }
    (diff <= atol, diff)
}

/// Compare an eval forward on `input` of a reference file with its `logits`, `pre_logits`,
/// `embedding` and `stage0..4`, whichever are present.
pub fn check(p: &Predictor, inputs: &Path, atol: f32) -> Result<Vec<CheckRow>> {
    let bytes = weights::read_file(inputs)?;
    let st = weights::parse(inputs, &bytes)?;
    let x = weights::tensor_f32(inputs, &st, "input")?;
    let bad = || Error::Invalid(format!("{}: 'input' must be [N, 3, H, W], found {:?}", inputs.display(), x.shape));
    let [n, c, h, w] = x.shape[..] else { return Err(bad()) };
    if c != 3 || n == 0 {
        return Err(bad());
    }
    preprocess::check_size(h.min(w))?;
    preprocess::check_size(h.max(w))?;
    let has_stages = st.names().iter().any(|k| k.starts_with("stage"));
    let out = p.run(&x.data, [n, c, h, w], has_stages);
    let mut got: Vec<(String, &Output)> =
        out.stages.iter().enumerate().map(|(i, o)| (format!("stage{i}"), o)).collect();
    got.push(("logits".into(), &out.logits));
    got.push(("pre_logits".into(), &out.pre_logits));
    got.push(("embedding".into(), &out.embedding));
    let mut rows = Vec::new();
    for (name, o) in got {
        let Ok(expected) = weights::tensor_f32(inputs, &st, &name) else { continue };
        let (ok, max_abs_diff) = compare(o, &expected, atol);
        rows.push(CheckRow { name, max_abs_diff, ok });
    }
    if rows.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: none of logits, pre_logits, embedding, stage0..4 present",
            inputs.display()
        )));
    }
    Ok(rows)
}

/// Top-1 / top-5 of `b` on a dataset with 1, 12 or 144 crops, preprocessed as `b.pre` says.
pub fn eval(
    b: &Bundle,
    p: &Predictor,
    ds: &crate::train::data::Dataset,
    crops: usize,
    limit: Option<usize>,
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<crate::train::EvalReport> {
    if ![1, 12, 144].contains(&crops) {
        return Err(Error::Invalid(format!("--crops must be 1, 12 or 144, not {crops}")));
    }
    if p.num_classes() != ds.classes.len() {
        return Err(Error::Invalid(format!(
            "the model has {} classes, {} has {}",
            p.num_classes(),
            ds.name,
            ds.classes.len()
        )));
    }
    b.pre.validate()?;
    let per_forward = if crops == 1 { batch } else { crops };
    crate::bench::check_memory(p.kind(), per_forward, b.pre.input_size, false)?;
    let r = crate::train::evaluate(p, ds, &b.pre, crops, limit, batch, on_batch);
    if r.images == 0 {
        return Err(Error::Invalid(format!("no image of {} could be read ({} skipped)", ds.name, r.skipped)));
    }
    Ok(r)
}

/// What `quantize` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    pub out: PathBuf,
    pub config: crate::quant::QuantConfig,
    pub skipped: Vec<(String, String)>,
    pub bytes: u64,
}

/// Calibrate the model of `b` on up to `images` images of `calib` (a dataset name such as
/// `fashion-mnist` — its training split, a fixed random draw — or a folder of images, in path
/// order), preprocessed as the model says, and write the int8 model to `out`.
pub fn quantize(
    b: &Bundle,
    calib: &str,
    images: usize,
    percentile: f64,
    out: &Path,
    on_image: &mut dyn FnMut(usize),
) -> Result<QuantizeReport> {
    use crate::engine::Act;
    use crate::train::data::{Dataset, SplitMix};
    if b.int8.is_some() {
        return Err(Error::Invalid(format!("{} is already an int8 model", b.source)));
    }
    if images == 0 {
        return Err(Error::Invalid("--images must be at least 1".into()));
    }
    let pre = &b.pre;
    let s = pre.input_size;
    crate::bench::check_memory(b.model.kind(), 8, s, false)?;
    let folder = Path::new(calib).is_dir()
        && crate::preprocess::collect_images(&[PathBuf::from(calib)]).is_ok_and(|v| !v.is_empty());
    // each calibration image as the tensor the network sees, or why it could not be read
    let mut inputs: Vec<std::result::Result<Vec<f32>, (String, String)>> = Vec::new();
    if folder && Dataset::open(calib, true).is_err() {
        for path in crate::preprocess::collect_images(&[PathBuf::from(calib)])?.into_iter().take(images) {
            inputs.push(pre.load(&path).map_err(|e| (path.display().to_string(), e.to_string())));
        }
    } else {
        let ds = Dataset::open(calib, true)?;
        let mut order = SplitMix::new(0xCA11B).permutation(ds.len());
        order.truncate(images);
        for i in order {
            inputs
                .push(ds.image(i).map(|img| pre.apply(&img)).map_err(|e| (format!("{}[{i}]", ds.name), e.to_string())));
        }
    }
    let skipped: Vec<(String, String)> = inputs.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    let good: Vec<Vec<f32>> = inputs.into_iter().filter_map(|r| r.ok()).collect();
    let mut engine = crate::lower::lower(b.model.clone());
    let mut batches = good.chunks(8).map(|c| {
        let flat: Vec<f32> = c.iter().flatten().copied().collect();
        Act::from_nchw(&flat, [c.len(), 3, s, s])
    });
    let mut done = 0;
    let tables = crate::quant::quantize_engine(&mut engine, &mut batches, percentile, &mut || {
        done += 1;
        on_image(done);
    })?;
    let (int8_convs, convs) = engine.int8_convs();
    let config = crate::quant::QuantConfig {
        percentile,
        images: good.len(),
        calibration: calib.to_string(),
        convs,
        int8_convs,
        scheme: crate::quant::SCHEME.to_string(),
        layout: crate::quant::LAYOUT,
    };
    let meta = crate::bundle::metadata(&b.model.config(), pre, &b.classes);
    crate::quant::save(out, &mut engine, &tables, &config, meta)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(QuantizeReport { out: out.to_path_buf(), config, skipped, bytes })
}
