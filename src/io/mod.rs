//! Files users bring: Hugging Face model folders (config.json, safetensors weights, single or
//! sharded), tokenizers and chat templates. Every error names the file and the tensor, field or
//! line that was wrong.

pub mod config;
pub mod dataset;
pub mod safetensors;
pub mod tokenizer;

use std::path::Path;

use crate::{Error, Result};

/// Reads a file to a string, naming it in the error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))
}

/// Parses a JSON file, naming it (and the line and column) in the error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}
