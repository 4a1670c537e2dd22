//! Builds what a configuration names: the base model directory, the model (with its adapter)
//! and the tokenizer, shared by every command.

use std::path::{Path, PathBuf};

use crate::config::LoadedConfig;
use crate::model::hf_config::ModelConfig;
use crate::model::resolve::{self, HubSettings};
use crate::model::safetensors_io;
use crate::model::tokenizer::ModelTokenizer;
use crate::model::{CausalLm, LoadOptions, ModelError, Result};

/// Command-line replacements for configuration keys.
#[derive(Clone, Debug, Default)]
pub struct ModelOverrides {
    /// Replaces `base_model`.
    pub base_model: Option<String>,
    /// Replaces `lora_model_dir`.
    pub lora_model_dir: Option<String>,
}

/// The directories a run reads its model from.
#[derive(Clone, Debug)]
pub struct ModelSources {
    /// What the user named as the base model.
    pub base_model: String,
    /// The directory of the weights.
    pub weights_dir: PathBuf,
    /// The directory of `config.json`.
    pub config_dir: PathBuf,
    /// The directory of the tokenizer files.
    pub tokenizer_dir: PathBuf,
}

/// Resolves `base_model`, `base_model_config` and `tokenizer_config`.
pub fn model_sources(
    cfg: &LoadedConfig,
    overrides: &ModelOverrides,
    hub: &HubSettings,
) -> Result<ModelSources> {
    let base_model = overrides
        .base_model
        .clone()
        .or_else(|| cfg.config.base_model.clone())
        .ok_or_else(|| {
            ModelError::Invalid(format!("{}: base_model is required", cfg.path.display()))
        })?;
    let find = |reference: &str| -> Result<PathBuf> {
        let as_path = cfg.resolve_path(reference);
        if as_path.is_dir() {
            return Ok(as_path);
        }
        resolve::resolve_model(reference, hub)
    };
    let weights_dir = find(&base_model)?;
    let config_dir = match &cfg.config.base_model_config {
        Some(r) if overrides.base_model.is_none() => find(r)?,
        _ => weights_dir.clone(),
    };
    let tokenizer_dir = match &cfg.config.tokenizer_config {
        Some(r) if overrides.base_model.is_none() => find(r)?,
        _ => weights_dir.clone(),
    };
    Ok(ModelSources {
        base_model,
        weights_dir,
        config_dir,
        tokenizer_dir,
    })
}

/// Loads the base model of `sources`.
pub fn load_base(sources: &ModelSources, options: &LoadOptions) -> Result<CausalLm> {
    let config = ModelConfig::from_dir(&sources.config_dir)?;
    let mut weights =
        safetensors_io::load_model_weights(&sources.weights_dir, options.dtype, &options.device)?;
    CausalLm::from_weights(config, &mut weights, options)
}

/// Loads the tokenizer of `sources`.
pub fn load_tokenizer(sources: &ModelSources) -> Result<ModelTokenizer> {
    ModelTokenizer::load(&sources.tokenizer_dir)
}

/// Loads the tokenizer of `sources` with the configuration's `special_tokens` applied. A
/// special token must already be in the vocabulary (adding tokens, which means resizing the
/// embeddings, is not implemented yet).
pub fn load_configured_tokenizer(
    cfg: &LoadedConfig,
    sources: &ModelSources,
) -> Result<ModelTokenizer> {
    let mut tokenizer = load_tokenizer(sources)?;
    let Some(special) = &cfg.config.special_tokens else {
        return Ok(tokenizer);
    };
    if special
        .additional_special_tokens
        .as_ref()
        .is_some_and(|t| !t.is_empty())
    {
        return Err(ModelError::Invalid(format!(
            "{}: special_tokens.additional_special_tokens: adding tokens is not implemented yet",
            cfg.path.display()
        )));
    }
    let lookup = |key: &str, token: &Option<String>| -> Result<Option<(String, u32)>> {
        let Some(text) = token else { return Ok(None) };
        match tokenizer.inner.token_to_id(text) {
            Some(id) => Ok(Some((text.clone(), id))),
            None => Err(ModelError::Invalid(format!(
                "{}: special_tokens.{key}: `{text}` is not in the vocabulary of {}; adding tokens is not implemented yet",
                cfg.path.display(),
                sources.tokenizer_dir.display()
            ))),
        }
    };
    if let Some(t) = lookup("bos_token", &special.bos_token)? {
        tokenizer.bos = Some(t);
    }
    if let Some(t) = lookup("eos_token", &special.eos_token)? {
        tokenizer.eos = Some(t);
    }
    if let Some(t) = lookup("pad_token", &special.pad_token)? {
        tokenizer.pad = Some(t);
    }
    lookup("unk_token", &special.unk_token)?;
    Ok(tokenizer)
}

/// Whether a directory holds a PEFT adapter.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(crate::model::lora::ADAPTER_CONFIG).is_file()
}

/// The trained adapter a command should use: `--lora-model-dir`, else `lora_model_dir`, else
/// `output_dir` when it holds an adapter (where `axl train` writes it).
pub fn trained_adapter_dir(cfg: &LoadedConfig, overrides: &ModelOverrides) -> Option<PathBuf> {
    if let Some(d) = overrides
        .lora_model_dir
        .as_deref()
        .or(cfg.config.lora_model_dir.as_deref())
    {
        return Some(cfg.resolve_path(d));
    }
    let out = cfg.output_dir();
    is_adapter_dir(&out).then_some(out)
}
