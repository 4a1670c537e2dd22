//! `axl train`: the configuration's datasets prepared (or reused), the model loaded with its
//! adapter, trained, and saved to `output_dir`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};

use super::TrainArgs;
use crate::config::training::DEFAULT_TRIGGER_FILE;
use crate::data;
use crate::data::example::Tokenized;
use crate::model::hf_config::ModelConfig;
use crate::model::resolve::HubSettings;
use crate::model::safetensors_io::SaveDtype;
use crate::model::{lora, save, CausalLm, LoadOptions, ModelError};
use crate::setup;
use crate::train::checkpoint;
use crate::train::plan::{split_validation, TrainSettings};
use crate::train::run::{self, RunInputs};
use axl_plugin_api::payload::OptimizerContext;
use axl_plugin_api::Hook;

/// The training examples and the evaluation examples: `test_datasets` when the configuration
/// has them, else the `val_set_size` share of the training datasets.
pub(super) fn training_and_evaluation_examples(
    cfg: &crate::config::LoadedConfig,
    tokenizer: &crate::model::tokenizer::ModelTokenizer,
    hub: &HubSettings,
    settings: &TrainSettings,
) -> anyhow::Result<(Vec<Tokenized>, Vec<Tokenized>)> {
    let (prepared, status) = data::prepare_cached(cfg, tokenizer, hub)?;
    eprintln!(
        "{} the prepared dataset in {}",
        if status.reused { "reused" } else { "built" },
        status.dir.display()
    );
    if let Some((test, status)) = data::prepare_test_cached(cfg, tokenizer, hub)? {
        eprintln!(
            "{} the prepared test datasets in {}",
            if status.reused { "reused" } else { "built" },
            status.dir.display()
        );
        return Ok((prepared.examples, test.examples));
    }
    Ok(split_validation(
        prepared.examples,
        settings.val_set_size,
        settings.seed,
    ))
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let (cfg, mut plugins) = super::plugins::load_config(&args.config, &args.overrides, "train")?;
    if cfg.config.training.learning_rate.is_none() {
        bail!("{}: learning_rate is required to train", cfg.path.display());
    }
    let mut settings = TrainSettings::from_config(&cfg.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    if plugins.has(Hook::ComputeLoss) && settings.gradient_checkpointing {
        bail!(
            "{}: a compute_loss plugin needs the logits of the whole micro-batch; turn gradient_checkpointing off",
            cfg.path.display()
        );
    }
    if let Some(note) = settings.precision_note {
        eprintln!("note: {note}");
    }
    let hub = HubSettings::from_env();
    let overrides = args.model.overrides();
    let sources = setup::model_sources(&cfg, &overrides, &hub)?;
    let tokenizer = setup::load_configured_tokenizer(&cfg, &sources)?;
    let (train, eval) = training_and_evaluation_examples(&cfg, &tokenizer, &hub, &settings)?;
    let output_dir = cfg.output_dir();
    let resume = match &cfg.config.training.resume_from_checkpoint {
        Some(p) => {
            let dir = cfg.resolve_path(p);
            if !dir.join(checkpoint::PROGRESS_FILE).is_file() {
                bail!(
                    "{}: resume_from_checkpoint: {} is not a complete axl checkpoint",
                    cfg.path.display(),
                    dir.display()
                );
            }
            Some(dir)
        }
        None if cfg.config.training.auto_resume_from_checkpoints == Some(true) => {
            checkpoint::latest(&output_dir)
        }
        None => None,
    };
    let lora_settings = cfg.lora_settings();
    let full = lora_settings.is_none();
    let options = LoadOptions {
        trainable: full,
        ..Default::default()
    };
    let model_config = ModelConfig::from_dir(&sources.config_dir)?;
    let kernels = super::plugins::choose_kernels(&mut plugins, &tokenizer, &model_config)?;
    let reinit = cfg.config.reinit_weights == Some(true);
    let mut model = match (&resume, full) {
        (Some(dir), true) => CausalLm::load(dir, &options)?,
        _ if reinit => {
            eprintln!("reinit_weights: starting from randomly initialized weights");
            CausalLm::random_init(model_config, settings.seed, &options)?
        }
        _ => setup::load_base(&sources, &options)?,
    };
    super::plugins::model_event(&mut plugins, Hook::PostModelBuild, &model, &tokenizer)?;
    if let Some(lora_settings) = &lora_settings {
        super::plugins::model_event(&mut plugins, Hook::PreLoraLoad, &model, &tokenizer)?;
        // A run starts from the adapter it resumes, else from `--lora-model-dir` /
        // `lora_model_dir`, else from a new adapter (never from an earlier run's output).
        let starting_adapter = overrides
            .lora_model_dir
            .as_deref()
            .or(cfg.config.lora_model_dir.as_deref())
            .map(|d| cfg.resolve_path(d));
        let adapter_from = resume.clone().or(starting_adapter);
        match adapter_from {
            Some(dir) => {
                lora::load_adapter(&mut model, &dir, true)
                    .with_context(|| format!("loading the adapter of {}", dir.display()))?;
            }
            None => {
                lora::attach_new(&mut model, lora_settings, settings.seed)?;
            }
        }
    }
    if lora_settings.is_some() {
        super::plugins::model_event(&mut plugins, Hook::PostLoraLoad, &model, &tokenizer)?;
    }
    model.set_kernels(kernels);
    model
        .check_head_fusable()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    if plugins.has(Hook::PreModelLoad) {
        eprintln!("kernels: {}", kernels.describe());
    }
    super::plugins::apply_trainable_policy(&mut plugins, &mut model, &tokenizer)?;
    settings.optimizer = super::plugins::optimizer_settings(
        &mut plugins,
        &settings.optimizer,
        OptimizerContext {
            optimizer: cfg.config.training.optimizer.clone(),
            learning_rate: settings.learning_rate,
            weight_decay: settings.optimizer.weight_decay,
            parameters: super::plugins::model_info(&model)
                .parameters
                .into_iter()
                .filter(|p| p.trainable)
                .collect(),
        },
    )?;
    let stored = save::stored_dtype(&model);
    let base_model = sources.base_model.clone();
    let tokenizer_dir = sources.tokenizer_dir.clone();
    let save_weights = |model: &CausalLm, dir: &Path, final_save: bool| -> Result<(), ModelError> {
        match &lora_settings {
            Some(s) => lora::save_adapter(model, s, dir, &base_model).map(|_| ()),
            None => save::save_pretrained(
                model,
                dir,
                Some(&tokenizer_dir),
                if final_save { stored } else { SaveDtype::F32 },
                save::DEFAULT_MAX_SHARD_BYTES,
            )
            .map(|_| ()),
        }
    };
    let pad_id = tokenizer.padding_id();
    let terminal = std::io::stderr().is_terminal();
    let mut log = |line: &str| {
        if terminal {
            eprintln!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    };
    let mut bar = |line: &str| {
        use std::io::Write;
        eprint!("\r\x1b[2K{line}");
        let _ = std::io::stderr().flush();
    };
    static STOP: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let trigger = cfg
        .config
        .training
        .dynamic_checkpoint
        .as_ref()
        .filter(|d| d.enabled)
        .map(|d| {
            let name = d
                .trigger_file_path
                .as_deref()
                .unwrap_or(DEFAULT_TRIGGER_FILE);
            (output_dir.join(name), d.check_interval)
        });
    let mut hooks = super::plugins::PluginLoop::new(&mut plugins, Some(&tokenizer));
    let outcome = run::run(
        &mut model,
        RunInputs {
            train: &train,
            eval: &eval,
            settings: &settings,
            output_dir: &output_dir,
            pad_id,
            resume_from: resume.as_deref(),
            save_weights: &save_weights,
            log: &mut log,
            progress_bar: if terminal { Some(&mut bar) } else { None },
            stop: Some(&STOP),
            trigger,
            hooks: &mut hooks,
        },
    );
    let failure = match &outcome {
        Err(e) => Some(format!("{e}")),
        Ok(report) => report
            .interrupted
            .as_ref()
            .map(|c| format!("interrupted; the run can continue from {}", c.display())),
    };
    if let Some(message) = failure {
        let state = axl_plugin_api::payload::TrainState::default();
        let failed = axl_plugin_api::payload::Event {
            hook: Hook::OnError,
            state,
            metrics: Default::default(),
            dir: Some(output_dir.display().to_string()),
            message: Some(message),
        };
        if let Err(e) = crate::train::hooks::LoopHooks::event(&mut hooks, &model, &failed) {
            eprintln!("warning: {e}");
        }
    }
    let report = outcome?;
    if report.interrupted.is_none() {
        let mut done = axl_plugin_api::payload::Event {
            hook: Hook::PostTrain,
            state: axl_plugin_api::payload::TrainState {
                global_step: report.steps.last().map_or(0, |s| s.step as u64),
                max_steps: report.total_steps as u64,
                epoch: report.steps.last().map_or(0.0, |s| s.epoch),
            },
            metrics: report
                .eval_loss
                .map(|l| ("eval_loss".to_string(), l))
                .into_iter()
                .collect(),
            dir: Some(output_dir.display().to_string()),
            message: None,
        };
        done.metrics
            .extend(report.steps.last().map(|s| ("loss".to_string(), s.loss)));
        // Plugins that score or generate after training see the model as inference does.
        model.set_dropout(None);
        crate::train::hooks::LoopHooks::event(&mut hooks, &model, &done)?;
    }
    if let Some(checkpoint) = &report.interrupted {
        eprintln!(
            "stopped; the run can continue from {} (resume_from_checkpoint, or auto_resume_from_checkpoints: true)",
            checkpoint.display()
        );
        std::process::exit(130);
    }
    let what = if full { "model" } else { "adapter" };
    eprintln!(
        "trained {} steps{}; the {what} is in {}",
        report.total_steps,
        report
            .eval_loss
            .map(|l| format!(", eval_loss {l:.4}"))
            .unwrap_or_default(),
        output_dir.display()
    );
    Ok(())
}
