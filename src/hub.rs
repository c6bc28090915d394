//! Published weights from the Hugging Face hub (`hf-hub`, its standard cache), or a clear
//! error telling the user to pass a local file.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::models::ModelKind;

/// Where the weights of `kind` come from.
pub fn hub_repo(kind: ModelKind) -> Result<String> {
    kind.pretrained().hub_id.ok_or_else(|| Error::NoHubWeights {
        model: kind.name().to_string(),
        reason: "facenet-pytorch publishes .pt files only: convert one with \
                 scripts/convert_facenet.py and pass it with --weights"
            .to_string(),
    })
}

/// Path of `model.safetensors` for `kind`, downloading it into the hub cache if needed.
#[cfg(feature = "hub")]
pub fn fetch(kind: ModelKind) -> Result<PathBuf> {
    let repo = hub_repo(kind)?;
    let file = "model.safetensors";
    let hub_err = |reason: String| Error::Hub { repo: repo.clone(), file: file.to_string(), reason };
    let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build().map_err(|e| hub_err(e.to_string()))?;
    api.model(repo.clone()).get(file).map_err(|e| hub_err(e.to_string()))
}

#[cfg(not(feature = "hub"))]
pub fn fetch(kind: ModelKind) -> Result<PathBuf> {
    let repo = hub_repo(kind)?;
    Err(Error::Hub {
        repo,
        file: "model.safetensors".to_string(),
        reason: "this build has no hub support (feature `hub`)".to_string(),
    })
}
