//! The data pipeline: the `datasets:` section of a configuration in, tokenized training
//! examples out.
//!
//! [`source`] reads files into rows, strategies turn rows into text with trainable spans,
//! tokenization turns those into ids and labels, and packing and the cache follow.

pub mod error;
pub mod source;

pub use error::{DataError, Location};
pub mod cache;
pub mod chat;
pub mod config;
pub mod example;
pub mod hub;
pub mod packing;
pub mod pipeline;
pub mod pretraining;
pub mod strategy;

use std::path::PathBuf;

use crate::config::LoadedConfig;
use crate::model::resolve::HubSettings;
use crate::model::tokenizer::ModelTokenizer;

/// Where a prepared dataset came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    /// The cache directory of this exact input.
    pub dir: PathBuf,
    /// Whether it was reused rather than built.
    pub reused: bool,
}

/// The default of `dataset_prepared_path`, as in Axolotl.
pub const DEFAULT_PREPARED_PATH: &str = "last_run_prepared";

/// Prepares the training datasets of a configuration, reusing the cache when nothing that
/// shapes the result has changed.
pub fn prepare_cached(
    cfg: &LoadedConfig,
    tokenizer: &ModelTokenizer,
    hub: &HubSettings,
) -> error::Result<(cache::Prepared, CacheStatus)> {
    let datasets = cfg
        .config
        .datasets
        .as_deref()
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            let message = if cfg.config.pretraining_dataset.is_some() {
                "no datasets to prepare: pretraining_dataset is streamed and tokenized while training"
            } else {
                "no datasets: the configuration needs a `datasets:` list"
            };
            DataError::msg(message).field("datasets")
        })?;
    prepare_cached_list(cfg, datasets, tokenizer, hub)
}

/// Prepares the `test_datasets` of a configuration (cached like the training datasets), or
/// `None` when it has none.
pub fn prepare_test_cached(
    cfg: &LoadedConfig,
    tokenizer: &ModelTokenizer,
    hub: &HubSettings,
) -> error::Result<Option<(cache::Prepared, CacheStatus)>> {
    match cfg
        .config
        .test_datasets
        .as_deref()
        .filter(|d| !d.is_empty())
    {
        Some(datasets) => prepare_cached_list(cfg, datasets, tokenizer, hub).map(Some),
        None => Ok(None),
    }
}

/// Prepares one list of datasets, reusing the cache when nothing that shapes it changed.
pub fn prepare_cached_list(
    cfg: &LoadedConfig,
    datasets: &[config::DatasetConfig],
    tokenizer: &ModelTokenizer,
    hub: &HubSettings,
) -> error::Result<(cache::Prepared, CacheStatus)> {
    let settings = pipeline::DataSettings::from_config(&cfg.config);
    let files = pipeline::resolve_files(datasets, &cfg.base_dir, hub)?;
    let mut key = cache::CacheKey::new(&settings, datasets);
    for file in files.iter().flat_map(|(paths, _)| paths) {
        key.add_file(file)?;
    }
    key.add_tokenizer(&tokenizer.dir)?;
    // The code of the plugins that format rows.
    key.add_bytes(cfg.plugin_fingerprint.as_bytes());
    // Special tokens the configuration set on top of the tokenizer files.
    key.add_bytes(
        format!(
            "{:?}|{:?}|{:?}|{}",
            tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.add_bos_token
        )
        .as_bytes(),
    );
    let root = cfg.resolve_path(
        cfg.config
            .dataset_prepared_path
            .as_deref()
            .unwrap_or(DEFAULT_PREPARED_PATH),
    );
    let dir = root.join(key.finish());
    if let Some(prepared) = cache::load(&dir)? {
        return Ok((prepared, CacheStatus { dir, reused: true }));
    }
    let (examples, reports) = pipeline::prepare_files(
        datasets,
        &files,
        &settings,
        tokenizer,
        &cfg.base_dir,
        cfg.plugin_formats.as_ref(),
    )?;
    let prepared = cache::Prepared { examples, reports };
    cache::store(&dir, &prepared)?;
    Ok((prepared, CacheStatus { dir, reused: false }))
}
