//! A model with everything it takes to use it: weights, config, preprocessing and class names.
//!
//! Files we write describe themselves in their safetensors metadata (`model`,
//! `inception_config`, `preprocess`, `classes`); a timm or facenet-pytorch file without them
//! gets the registry's pretrained config, with the model recognised from its keys. Every
//! command that loads a model (classify, embed, preprocess, check, eval, serve) goes through
//! `Bundle::load`, so they all agree on how a file is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::models::{Model, ModelConfig, ModelKind};
use crate::predict::{EngineKind, Predictor};
use crate::preprocess::Preprocess;
use crate::quant::{self, QuantConfig};
use crate::weights::{self, LoadOptions};

/// Metadata keys of the files we write.
pub const META_MODEL: &str = "model";
pub const META_CONFIG: &str = "inception_config";
pub const META_PREPROCESS: &str = "preprocess";
pub const META_CLASSES: &str = "classes";

/// What a weight file says about itself (each part `None` when it does not say).
#[derive(Clone, Debug, Default)]
pub struct Description {
    pub config: Option<ModelConfig>,
    pub preprocess: Option<Preprocess>,
    pub classes: Option<Vec<String>>,
}

/// The metadata entries that make a file self-describing.
pub fn metadata(cfg: &ModelConfig, pre: &Preprocess, classes: &[String]) -> HashMap<String, String> {
    let js = |v: serde_json::Result<String>| v.unwrap_or_default();
    HashMap::from([
        (META_MODEL.to_string(), cfg.model.name().to_string()),
        (META_CONFIG.to_string(), js(serde_json::to_string(cfg))),
        (META_PREPROCESS.to_string(), js(serde_json::to_string(pre))),
        (META_CLASSES.to_string(), js(serde_json::to_string(classes))),
        ("format".to_string(), "pt".to_string()),
    ])
}

fn parse_entry<T: serde::de::DeserializeOwned>(
    path: &Path,
    meta: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<T>> {
    let Some(v) = meta.get(key).and_then(|v| v.as_str()) else { return Ok(None) };
    serde_json::from_str(v)
        .map(Some)
        .map_err(|e| Error::Invalid(format!("{}: bad '{key}' metadata: {e}", path.display())))
}

/// Read the description from a safetensors header (`path` names the file in errors).
pub fn describe_header(path: &Path, header: &serde_json::Map<String, serde_json::Value>) -> Result<Description> {
    let empty = serde_json::Map::new();
    let meta = header.get("__metadata__").and_then(|m| m.as_object()).unwrap_or(&empty);
    Ok(Description {
        config: parse_entry(path, meta, META_CONFIG)?,
        preprocess: parse_entry(path, meta, META_PREPROCESS)?,
        classes: parse_entry(path, meta, META_CLASSES)?,
    })
}

/// The description of a file from its header; for a run's `model.safetensors` written before
/// files carried it, the run's `config.json` and `labels.json` beside it fill the gaps.
pub fn describe(path: &Path, header: &serde_json::Map<String, serde_json::Value>) -> Result<Description> {
    let mut d = describe_header(path, header)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if d.preprocess.is_none()
        && let Ok(bytes) = std::fs::read(dir.join("config.json"))
        && let Ok(run) = serde_json::from_slice::<crate::train::TrainConfig>(&bytes)
        && d.config.as_ref().is_none_or(|c| c.model == run.model.model)
    {
        d.preprocess = Some(run.preprocess());
        if d.classes.is_none() {
            d.classes = std::fs::read(dir.join("labels.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        }
    }
    Ok(d)
}

/// Recognise a reference checkpoint by its keys (timm v4 / IR-v2, facenet IR-v1).
pub fn guess_kind(header: &serde_json::Map<String, serde_json::Value>) -> Option<ModelKind> {
    let has = |k: &str| header.contains_key(k);
    if has("features.0.conv.weight") && has("last_linear.weight") || has("features.21.branch0.conv.weight") {
        Some(ModelKind::InceptionV4)
    } else if has("mixed_5b.branch0.conv.weight") && has("conv2d_7b.conv.weight") {
        Some(ModelKind::InceptionResnetV2)
    } else if has("repeat_1.0.branch0.conv.weight") && has("last_bn.weight") {
        Some(ModelKind::InceptionResnetV1)
    } else {
        None
    }
}

fn undescribed(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: no model description and not a recognised reference checkpoint: give --model",
        path.display()
    ))
}

/// The embedded demo's description (its metadata only, no weights read).
fn demo_description() -> Result<Description> {
    let path = Path::new(crate::demo::NAME);
    let (_, header) = safetensors::SafeTensors::read_metadata(crate::demo::MODEL)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::Value::Object(meta.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect()),
    );
    describe_header(path, &header)
}

/// The preprocessing of a model source without loading its weights: the file's description,
/// else the registry's config of `model` (or of the model the file holds), else the demo's.
pub fn preprocess_of(model: Option<ModelKind>, weights_path: Option<&Path>) -> Result<Preprocess> {
    let pre = match (model, weights_path) {
        (_, Some(path)) => {
            let header = weights::read_header(path)?;
            let d = describe(path, &header)?;
            let kind = d.config.as_ref().map(|c| c.model).or(model).or_else(|| guess_kind(&header));
            match (d.preprocess, kind) {
                (Some(p), _) => p,
                (None, Some(k)) => k.pretrained().pre,
                (None, None) => return Err(undescribed(path)),
            }
        }
        (Some(k), None) => k.pretrained().pre,
        (None, None) => demo_description()?
            .preprocess
            .ok_or_else(|| Error::Invalid("the embedded demo model does not describe itself".into()))?,
    };
    pre.validate()?;
    Ok(pre)
}

/// A loaded model and how to feed it.
pub struct Bundle {
    /// The network (for an int8 file only its structure: the weights are in `int8`).
    pub model: Model,
    pub pre: Preprocess,
    /// One name per class (empty: none known; results then say `class i`).
    pub classes: Vec<String>,
    /// Where the weights came from (a path, or the embedded demo).
    pub source: String,
    /// An int8 file (`inception quantize`): its path and quantization config.
    pub int8: Option<(PathBuf, QuantConfig)>,
}

impl Bundle {
    /// `model` and/or `weights` as given on a command line: both absent = the embedded demo;
    /// only `model` = the published weights from the hub; a file = that file, whose own
    /// description wins over the registry (a contradicting `model` is an error).
    pub fn load(model: Option<&str>, weights_path: Option<&Path>, device: &Device) -> Result<Self> {
        match (model, weights_path) {
            (None, None) => Self::demo(device),
            (Some(m), None) => {
                let kind: ModelKind = m.parse()?;
                let path = crate::hub::fetch(kind)?;
                Self::from_file(Some(kind), &path, device)
            }
            (m, Some(path)) => Self::from_file(m.map(str::parse).transpose()?, path, device),
        }
    }

    /// The shipped Fashion-MNIST demo (`assets/demo`), embedded in the binary.
    pub fn demo(device: &Device) -> Result<Self> {
        let path = Path::new(crate::demo::NAME);
        let d = demo_description()?;
        let (Some(cfg), Some(pre), Some(classes)) = (d.config, d.preprocess, d.classes) else {
            return Err(Error::Invalid("the embedded demo model does not describe itself".into()));
        };
        let m = weights::load_bytes(Model::new(&cfg, device), crate::demo::MODEL, path, &LoadOptions::default())?;
        Ok(Self { model: m, pre, classes, source: crate::demo::NAME.to_string(), int8: None })
    }

    fn from_file(asked: Option<ModelKind>, path: &Path, device: &Device) -> Result<Self> {
        let header = weights::read_header(path)?;
        let d = describe(path, &header)?;
        let file_kind = d.config.as_ref().map(|c| c.model).or_else(|| guess_kind(&header));
        let kind = match (asked, file_kind) {
            (Some(a), Some(f)) if a != f => {
                return Err(Error::Invalid(format!(
                    "--model {a} contradicts {}, which holds {f} weights",
                    path.display()
                )));
            }
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) => return Err(undescribed(path)),
        };
        let cfg = match d.config {
            Some(c) => c,
            None => {
                let key = format!("{}bias", weights::classifier_prefix(kind));
                let classes = weights::header_shape(&header, &key).and_then(|s| s.first().copied()).unwrap_or(0);
                ModelConfig::new(kind, classes)
            }
        };
        let pre = d.preprocess.unwrap_or_else(|| kind.pretrained().pre);
        pre.validate().map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        let classes = match d.classes {
            Some(c) => c,
            None if cfg.num_classes == 1000 => crate::labels::imagenet(),
            None => Vec::new(),
        };
        if !classes.is_empty() && classes.len() != cfg.num_classes {
            return Err(Error::Invalid(format!(
                "{}: {} class names for a {}-class model",
                path.display(),
                classes.len(),
                cfg.num_classes
            )));
        }
        let source = path.display().to_string();
        if let Some(q) = quant::config_of(path, &header)? {
            // the weights are read when the engine is built (`predictor`)
            return Ok(Self { model: Model::new(&cfg, device), pre, classes, source, int8: Some((path.into(), q)) });
        }
        let model = weights::load(Model::new(&cfg, device), path, &LoadOptions::default())?;
        Ok(Self { model, pre, classes, source, int8: None })
    }

    /// The executor of this model: `engine` on `device`; an int8 file runs on the fast engine.
    pub fn predictor(&self, engine: EngineKind, device: &Device) -> Result<Predictor> {
        let Some((path, _)) = &self.int8 else { return Ok(Predictor::new(self.model.clone(), engine, device)) };
        if engine != EngineKind::Fast {
            return Err(Error::Invalid(format!("{}: an int8 model runs on the fast (cpu) engine", path.display())));
        }
        let mut e = crate::lower::lower(self.model.clone());
        quant::load_into(&mut e, path, &weights::read_file(path)?)?;
        Ok(Predictor::Fast(Box::new(e)))
    }
}

/// The weight file of a run folder.
pub fn run_weights(run: &Path) -> PathBuf {
    run.join("model.safetensors")
}
