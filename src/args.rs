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
