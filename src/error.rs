//! Library errors. Each names the file, key or tensor concerned and, for shapes, what was
//! expected against what was found.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown model '{name}' (known: {known})")]
    UnknownModel { name: String, known: String },

    /// The OS error is part of the message (not a `source`), so it is printed once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: does not fit {model} ({} problem(s)):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    WeightMismatch { path: PathBuf, model: String, problems: Vec<KeyProblem> },

    #[error("{path}: tensor '{key}' not found")]
    MissingTensor { path: PathBuf, key: String },

    #[error("{path}: tensor '{key}': expected shape {expected:?}, found {found:?}")]
    Shape { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: cannot decode image: {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("image size {size} px is below the minimum of 75 px for these networks")]
    InputTooSmall { size: usize },

    #[error("no weights for {model} on the hub: {reason}")]
    NoHubWeights { model: String, reason: String },

    #[error("download of {repo}/{file} failed: {reason}\n  offline? pass a local file with --weights FILE")]
    Hub { repo: String, file: String, reason: String },

    #[error("{0}")]
    Invalid(String),
}

/// One offending key of a weight file.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyProblem {
    Missing {
        key: String,
        expected: Vec<usize>,
    },
    Unexpected {
        key: String,
        found: Vec<usize>,
    },
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    Dtype {
        key: String,
        dtype: String,
    },
    /// NaN or infinite values (`count` of them, the first at flat index `first`).
    NonFinite {
        key: String,
        count: usize,
        first: usize,
    },
    /// A BatchNorm `running_var` with a negative entry.
    NegativeVariance {
        key: String,
        value: f32,
        index: usize,
    },
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::Missing { key, expected } => write!(f, "missing    {key}: expected {expected:?}"),
            KeyProblem::Unexpected { key, found } => write!(f, "unexpected {key}: found {found:?}"),
            KeyProblem::Shape { key, expected, found } => {
                write!(f, "shape      {key}: expected {expected:?}, found {found:?}")
            }
            KeyProblem::Dtype { key, dtype } => write!(f, "dtype      {key}: {dtype} is not a float type"),
            KeyProblem::NonFinite { key, count, first } => {
                write!(f, "non-finite {key}: {count} NaN/inf value(s), first at index {first}")
            }
            KeyProblem::NegativeVariance { key, value, index } => {
                write!(f, "negative   {key}: variance {value} at index {index}")
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
