//! Writes a model as a Hugging Face model directory that transformers loads: `config.json`,
//! safetensors weights (sharded above a size limit), and the tokenizer and generation files of
//! the directory the model came from.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::Value;

use super::error::{ModelError, Result};
use super::safetensors_io::{self, SaveDtype};
use super::transformer::CausalLm;
use crate::fsio;

/// Files copied from the source model directory when a model is saved.
pub const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// transformers' default shard size limit.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5 * 1024 * 1024 * 1024;

/// The dtype a model's `config.json` says its weights are stored in.
pub fn stored_dtype(model: &CausalLm) -> SaveDtype {
    let raw = &model.config.raw;
    let name = raw
        .get("dtype")
        .or_else(|| raw.get("torch_dtype"))
        .and_then(Value::as_str)
        .unwrap_or("float32");
    match name {
        "bfloat16" => SaveDtype::BF16,
        "float16" => SaveDtype::F16,
        _ => SaveDtype::F32,
    }
}

/// The model's weights under transformers' names, frozen copies of their current values. A
/// tied `lm_head` is not written, as transformers does not write it.
pub fn model_tensors(model: &CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut adapted = Vec::new();
    model.visit_params(&mut |name, p| {
        if name.contains(".lora_A.") || name.contains(".lora_B.") {
            adapted.push(name.to_string());
        } else {
            out.push((name.to_string(), p.tensor().detach()));
        }
    });
    if let Some(name) = adapted.first() {
        return Err(ModelError::Invalid(format!(
            "the model still has LoRA adapters ({name}, ...): merge them before saving full weights"
        )));
    }
    Ok(out)
}

/// Saves the model into `dir` in `dtype`, with the tokenizer and generation files of
/// `source_dir`. Returns the files written.
pub fn save_pretrained(
    model: &CausalLm,
    dir: &Path,
    source_dir: Option<&Path>,
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    let tensors = model_tensors(model)?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let mut written = safetensors_io::save_model_weights(dir, &tensors, dtype, max_shard_bytes)?;
    let mut config = model.config.raw.clone();
    let dtype_name = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::BF16 => "bfloat16",
        SaveDtype::F16 => "float16",
    };
    config.remove("torch_dtype");
    config.insert("dtype".into(), Value::String(dtype_name.into()));
    config.insert(
        "tie_word_embeddings".into(),
        Value::Bool(model.lm_head_is_tied()),
    );
    let config_path = dir.join("config.json");
    fsio::write_json_atomic(&config_path, &Value::Object(config))
        .map_err(|e| ModelError::file(&config_path, e))?;
    written.push(config_path);
    if let Some(src) = source_dir {
        written.extend(copy_tokenizer_files(src, dir)?);
    }
    Ok(written)
}

/// Copies the tokenizer and generation files present in `src` into `dst`, atomically each.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if same_dir(src, dst) {
        return Ok(written);
    }
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::file(&from, e))?;
            let to = dst.join(name);
            fsio::write_atomic(&to, &bytes).map_err(|e| ModelError::file(&to, e))?;
            written.push(to);
        }
    }
    Ok(written)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
