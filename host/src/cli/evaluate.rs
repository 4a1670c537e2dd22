//! `axl evaluate`: the evaluation loss of the configured model (with its trained adapter) on
//! the evaluation set, written to `<output_dir>/eval_results.json` with transformers' names.

use anyhow::{bail, Context};
use serde_json::json;

use super::TrainArgs;
use crate::fsio;
use crate::model::resolve::HubSettings;
use crate::model::{lora, LoadOptions};
use crate::setup;
use crate::train::plan::{micro_batches, TrainSettings};

/// The file `axl evaluate` writes in `output_dir`.
pub const EVAL_RESULTS_FILE: &str = "eval_results.json";

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let (cfg, mut plugins) =
        super::plugins::load_config(&args.config, &args.overrides, "evaluate")?;
    let settings = TrainSettings::from_config(&cfg.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    let hub = HubSettings::from_env();
    let overrides = args.model.overrides();
    let sources = setup::model_sources(&cfg, &overrides, &hub)?;
    let tokenizer = setup::load_configured_tokenizer(&cfg, &sources)?;
    let (_, eval) =
        super::train::training_and_evaluation_examples(&cfg, &tokenizer, &hub, &settings)?;
    if eval.is_empty() {
        bail!(
            "{}: nothing to evaluate: set val_set_size or test_datasets",
            cfg.path.display()
        );
    }
    let model_config = crate::model::hf_config::ModelConfig::from_dir(&sources.config_dir)?;
    let kernels = super::plugins::choose_kernels(&mut plugins, &tokenizer, &model_config)?;
    let mut model = setup::load_base(&sources, &LoadOptions::default())?;
    model.set_precision(settings.precision);
    if let Some(dir) = setup::trained_adapter_dir(&cfg, &overrides) {
        if setup::is_adapter_dir(&dir) {
            lora::load_adapter(&mut model, &dir, false)
                .with_context(|| format!("loading the adapter of {}", dir.display()))?;
            eprintln!("evaluating with the adapter of {}", dir.display());
        }
    }
    model.set_kernels(kernels);
    model
        .check_head_fusable()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    let pad_id = tokenizer.padding_id();
    let refs: Vec<_> = eval.iter().collect();
    let batches = micro_batches(&refs, &settings, settings.eval_sample_packing, pad_id);
    let mut hooks = super::plugins::PluginLoop::new(&mut plugins, Some(&tokenizer));
    let (eval_loss, eval_tokens) = crate::train::hooks::evaluate(&mut hooks, &model, &batches)?;
    let output_dir = cfg.output_dir();
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;
    let path = output_dir.join(EVAL_RESULTS_FILE);
    fsio::write_json_atomic(
        &path,
        &json!({
            "eval_loss": eval_loss,
            "eval_perplexity": eval_loss.exp(),
            "eval_tokens": eval_tokens,
            "eval_samples": eval.len(),
        }),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "eval_loss {eval_loss:.4} | perplexity {:.3} | {eval_tokens} tokens of {} examples; written to {}",
        eval_loss.exp(),
        eval.len(),
        path.display()
    );
    Ok(())
}
