//! Value parsers shared by the command line's flags: every user-controlled number is checked
//! against its range here, before anything is allocated.

use clap::builder::TypedValueParser;

use crate::models::ModelKind;

/// A model name, listed in `--help` (timm names; dashes and a `timm/` prefix or `.tag`
/// suffix accepted as in `ModelKind::from_str`).
pub fn model() -> impl TypedValueParser<Value = ModelKind> {
    ModelParser
}

#[derive(Clone)]
struct ModelParser;

impl TypedValueParser for ModelParser {
    type Value = ModelKind;
    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ModelKind, clap::Error> {
        let s = value.to_string_lossy();
        s.parse::<ModelKind>().map_err(|_| {
            let names = ModelKind::ALL.map(|k| k.name().to_string()).to_vec();
            let mut e = clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd);
            use clap::error::{ContextKind, ContextValue};
            e.insert(ContextKind::InvalidArg, ContextValue::String(arg.map_or("--model".into(), |a| a.to_string())));
            e.insert(ContextKind::InvalidValue, ContextValue::String(s.to_string()));
            e.insert(ContextKind::ValidValue, ContextValue::Strings(names));
            e
        })
    }
    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(ModelKind::ALL.into_iter().map(|k| clap::builder::PossibleValue::new(k.name()))))
    }
}

fn float(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("'{s}' is not a finite number")) }
}

/// A channel multiplier in (0, 4].
pub fn width(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 && v <= 4.0 { Ok(v) } else { Err(format!("{v} is outside (0, 4]")) }
}

/// A finite number > 0.
pub fn positive(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("{v} must be > 0")) }
}

/// A crop fraction in (0, 1].
pub fn crop_pct(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{v} is outside (0, 1]")) }
}

/// A tolerance >= 0.
pub fn tolerance(s: &str) -> Result<f32, String> {
    let v = float(s)?;
    if v >= 0.0 { Ok(v as f32) } else { Err(format!("{v} must be >= 0")) }
}

/// A number in [lo, hi].
fn in_range(s: &str, lo: f64, hi: f64) -> Result<f64, String> {
    let v = float(s)?;
    if (lo..=hi).contains(&v) { Ok(v) } else { Err(format!("{v} is outside [{lo}, {hi}]")) }
}

/// A probability in [0, 1].
pub fn unit(s: &str) -> Result<f32, String> {
    in_range(s, 0.0, 1.0).map(|v| v as f32)
}

/// MTCNN's three stage thresholds, `P,R,O`, each in [0, 1].
pub fn thresholds(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s.split(',').map(unit).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("'{s}': give three thresholds, e.g. 0.6,0.7,0.7"))
}

/// The image pyramid's scale factor, in [0.1, 0.95].
pub fn pyramid_factor(s: &str) -> Result<f32, String> {
    in_range(s, 0.1, 0.95).map(|v| v as f32)
}

/// Smallest face searched for, 12 to 10000 px.
pub fn min_face(s: &str) -> Result<f32, String> {
    in_range(s, 12.0, 10_000.0).map(|v| v as f32)
}

/// A face margin in output pixels, 0 to 100.
pub fn margin(s: &str) -> Result<f32, String> {
    in_range(s, 0.0, 100.0).map(|v| v as f32)
}

/// A distance threshold between unit embeddings, in [0, 2].
pub fn distance(s: &str) -> Result<f32, String> {
    in_range(s, 0.0, 2.0).map(|v| v as f32)
}

/// A calibration percentile in (50, 100].
pub fn percentile(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 50.0 && v <= 100.0 { Ok(v) } else { Err(format!("{v} is outside (50, 100]")) }
}

/// A fraction in (0, 1].
pub fn unit_interval(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{v} is outside (0, 1]")) }
}
