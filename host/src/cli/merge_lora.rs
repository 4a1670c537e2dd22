//! `axl merge-lora`: folds a trained LoRA adapter into the base weights and writes an HF model
//! directory to `<output_dir>/merged/`.

use anyhow::{bail, Context};

use super::MergeLoraArgs;
use crate::model::resolve::HubSettings;
use crate::model::{lora, save, LoadOptions};
use crate::setup;

pub fn run(args: MergeLoraArgs) -> anyhow::Result<()> {
    let (cfg, _plugins) = super::plugins::load_config(&args.config, &[], "merge-lora")?;
    let overrides = args.model.overrides();
    let adapter_dir = setup::trained_adapter_dir(&cfg, &overrides)
        .context("no adapter to merge: set lora_model_dir or pass --lora-model-dir")?;
    if !setup::is_adapter_dir(&adapter_dir) {
        bail!(
            "{}: no {} here; is this a LoRA adapter directory?",
            adapter_dir.display(),
            lora::ADAPTER_CONFIG
        );
    }
    let sources = setup::model_sources(&cfg, &overrides, &HubSettings::from_env())?;
    let mut model = setup::load_base(&sources, &LoadOptions::default())?;
    lora::load_adapter(&mut model, &adapter_dir, false)?;
    let merged = lora::merge(&mut model)?;
    let out = cfg.output_dir().join("merged");
    let dtype = save::stored_dtype(&model);
    save::save_pretrained(
        &model,
        &out,
        Some(&sources.tokenizer_dir),
        dtype,
        save::DEFAULT_MAX_SHARD_BYTES,
    )?;
    eprintln!(
        "merged {merged} adapted module(s) of {} into {} ({dtype:?})",
        adapter_dir.display(),
        out.display()
    );
    Ok(())
}
