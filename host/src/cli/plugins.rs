//! Plugins on the command line: loading a config with its plugins (and their `configure`
//! hook), the training loop's hooks, the model hooks, and the `axl plugin` and
//! `axl config-schema` commands.

use anyhow::{bail, Context};
use axl_plugin_api::payload::{
    Control, Event, LossBatch, ModelInfo, OptimizerContext, ParameterInfo, RunContext,
    ScheduleContext,
};
use axl_plugin_api::{Gradient, Hook, TensorView};

use crate::config::{LoadedConfig, PluginKeys};
use crate::data::strategy::PluginFormats;
use crate::model::hf_config::ModelConfig;
use crate::model::kernels::KernelSelection;
use crate::model::tokenizer::ModelTokenizer;
use crate::model::{CausalLm, ModelError};
use crate::plugins::services::LoadedModel;
use crate::plugins::{PluginFailure, PluginManager, Services};
use crate::train::hooks::LoopHooks;
use crate::train::optimizer::OptimizerSettings;

/// Reads and validates a configuration with its plugins loaded, prints its warnings, and runs
/// the plugins' `configure` hook for `command`.
pub fn load_config(
    path: &std::path::Path,
    overrides: &[String],
    command: &str,
) -> anyhow::Result<(LoadedConfig, PluginManager)> {
    let mut manager = None;
    let mut cfg = LoadedConfig::load_with_plugins(path, overrides, &mut |request| {
        let loaded = PluginManager::load(request.specs, request.base_dir, &request.output_dir)
            .map_err(|errors| errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let keys = loaded.config_keys()?;
        manager = Some(loaded);
        Ok::<PluginKeys, Vec<String>>(keys)
    })?;
    for warning in &cfg.warnings {
        eprintln!("warning: {}: {warning}", cfg.path.display());
    }
    let mut manager = manager.unwrap_or_default();
    if let Some(p) = manager
        .plugins()
        .iter()
        .find(|p| p.manifest.hooks.contains(&Hook::LoadDatasets))
    {
        bail!(
            "{}: plugin `{}` implements `load_datasets`, which this axl does not call yet; its rows would be ignored",
            cfg.path.display(),
            p.manifest.name
        );
    }
    let run = run_context(&cfg, command);
    manager
        .configure(&run, &mut Services::default())
        .with_context(|| format!("{}", cfg.path.display()))?;
    let strategies = manager
        .strategy_plugins(&cfg.base_dir, &cfg.output_dir(), &run)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    cfg.plugin_formats = Some(PluginFormats(std::sync::Arc::new(strategies)));
    // The plugins' code and their settings shape the prepared data.
    cfg.plugin_fingerprint = format!(
        "{}|{}",
        manager.data_fingerprint(),
        serde_json::Value::Object(cfg.plugin_settings.clone())
    );
    Ok((cfg, manager))
}

/// The run as plugins see it.
pub fn run_context(cfg: &LoadedConfig, command: &str) -> RunContext {
    RunContext {
        command: command.to_string(),
        config: cfg.json.clone(),
        config_path: cfg.path.display().to_string(),
        output_dir: cfg.output_dir().display().to_string(),
    }
}

/// The model as the model hooks see it.
pub fn model_info(model: &CausalLm) -> ModelInfo {
    let mut parameters = Vec::new();
    model.visit_params(&mut |name, param| {
        parameters.push(ParameterInfo {
            name: name.to_string(),
            shape: param.tensor().dims().to_vec(),
            trainable: param.var().is_some(),
        })
    });
    ModelInfo {
        model_type: model.config.architecture.model_type().to_string(),
        config: serde_json::Value::Object(model.config.raw.clone()),
        parameters,
    }
}

/// Calls a model hook (`post_model_build`, `pre_lora_load`, `post_lora_load`) with the model
/// reachable through the host services.
pub fn model_event(
    manager: &mut PluginManager,
    hook: Hook,
    model: &CausalLm,
    tokenizer: &ModelTokenizer,
) -> Result<(), PluginFailure> {
    if !manager.has(hook) {
        return Ok(());
    }
    let loaded = LoadedModel { model, tokenizer };
    let mut services = Services::with_tokenizer(tokenizer);
    services.model = Some(&loaded);
    manager.model_event(hook, &model_info(model), &mut services)
}

/// `post_model_load`: applies the plugins' merged trainable policy to the model.
pub fn apply_trainable_policy(
    manager: &mut PluginManager,
    model: &mut CausalLm,
    tokenizer: &ModelTokenizer,
) -> anyhow::Result<()> {
    if !manager.has(Hook::PostModelLoad) {
        return Ok(());
    }
    let info = model_info(model);
    let policy = {
        let loaded = LoadedModel {
            model: &*model,
            tokenizer,
        };
        let mut services = Services::with_tokenizer(tokenizer);
        services.model = Some(&loaded);
        manager.post_model_load(&info, &mut services)?
    };
    let lora = info.parameters.iter().any(|p| p.name.contains("lora_"));
    for (name, choice) in &policy {
        let Some(parameter) = info.parameters.iter().find(|p| &p.name == name) else {
            bail!(
                "plugin `{}` sets whether `{name}` trains, but the model has no such parameter",
                choice.plugin
            );
        };
        let unfreezes = choice.value.as_bool() == Some(true) && !parameter.trainable;
        if lora && unfreezes && !name.contains("lora_") {
            bail!(
                "plugin `{}` makes the base weight `{name}` trainable in a LoRA run, where only the adapter is saved; list its module in lora_modules_to_save instead",
                choice.plugin
            );
        }
    }
    let mut failure = None;
    model.map_params(
        &mut |name, param| match policy.get(name).and_then(|c| c.value.as_bool()) {
            Some(true) if param.var().is_none() => match param.to_trainable() {
                Ok(p) => p,
                Err(e) => {
                    failure.get_or_insert(e);
                    param.clone()
                }
            },
            Some(false) => param.to_frozen(),
            _ => param.clone(),
        },
    );
    if let Some(e) = failure {
        bail!("making a parameter trainable: {e}");
    }
    let changed = policy.len();
    if changed > 0 {
        eprintln!("plugins set whether {changed} parameters train");
    }
    Ok(())
}

/// `create_optimizer`: the first plugin's optimizer over the configured settings.
pub fn optimizer_settings(
    manager: &mut PluginManager,
    configured: &OptimizerSettings,
    context: OptimizerContext,
) -> anyhow::Result<OptimizerSettings> {
    if !manager.has(Hook::CreateOptimizer) {
        return Ok(configured.clone());
    }
    match manager.create_optimizer(&context, &mut Services::default())? {
        Some(answer) => {
            let settings = configured
                .with_spec(&answer.value)
                .map_err(|e| anyhow::anyhow!("plugin `{}` {e}", answer.plugin))?;
            eprintln!(
                "plugin `{}` chose the optimizer {} ({} parameter groups)",
                answer.plugin,
                answer.value.optimizer,
                answer.value.groups.len()
            );
            Ok(settings)
        }
        None => Ok(configured.clone()),
    }
}

/// The training loop's hooks, served by the plugins.
pub struct PluginLoop<'m> {
    /// The plugins.
    pub manager: &'m mut PluginManager,
    /// The tokenizer, if loaded.
    pub tokenizer: Option<&'m ModelTokenizer>,
    metrics: Vec<(String, f64)>,
}

impl<'m> PluginLoop<'m> {
    /// The loop hooks of `manager`.
    pub fn new(manager: &'m mut PluginManager, tokenizer: Option<&'m ModelTokenizer>) -> Self {
        Self {
            manager,
            tokenizer,
            metrics: Vec::new(),
        }
    }

    fn with_services<T>(
        &mut self,
        model: &CausalLm,
        f: impl FnOnce(&mut PluginManager, &mut Services<'_>) -> Result<T, PluginFailure>,
    ) -> Result<T, ModelError> {
        let loaded = self
            .tokenizer
            .map(|tokenizer| LoadedModel { model, tokenizer });
        let mut services = Services::default();
        services.tokenizer = self.tokenizer;
        services.model = loaded
            .as_ref()
            .map(|l| l as &dyn crate::plugins::ModelServices);
        let result = f(self.manager, &mut services);
        self.metrics.append(&mut services.metrics);
        result.map_err(|e| ModelError::Invalid(e.to_string()))
    }
}

impl LoopHooks for PluginLoop<'_> {
    fn wants(&self, hook: Hook) -> bool {
        self.manager.has(hook)
    }

    fn event(&mut self, model: &CausalLm, event: &Event) -> Result<Control, ModelError> {
        if !self.manager.has(event.hook) {
            return Ok(Control::default());
        }
        self.with_services(model, |m, s| m.event(event, s))
    }

    fn learning_rate(
        &mut self,
        model: &CausalLm,
        context: &ScheduleContext,
    ) -> Result<Option<f64>, ModelError> {
        self.with_services(model, |m, s| m.lr_schedule(context, s))
            .map(|answer| answer.map(|c| c.value))
    }

    fn loss(
        &mut self,
        model: &CausalLm,
        logits: TensorView<'_>,
        grad: &mut [f32],
        batch: &LossBatch,
    ) -> Result<Option<f64>, ModelError> {
        self.with_services(model, |m, s| m.compute_loss(logits, grad, batch, s))
            .map(|answer| answer.map(|c| c.value))
    }

    fn gradients(
        &mut self,
        model: &CausalLm,
        gradients: &mut [Gradient<'_>],
    ) -> Result<(), ModelError> {
        self.with_services(model, |m, s| m.on_gradients(gradients, s))
    }

    fn take_metrics(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.metrics)
    }
}

/// `pre_model_load`: the plugins' kernel choices for the model about to load, checked
/// against its architecture (an unusable choice is an error naming the plugin) and against
/// the other plugins (a `compute_loss` plugin needs whole logits).
pub fn choose_kernels(
    manager: &mut PluginManager,
    tokenizer: &ModelTokenizer,
    config: &ModelConfig,
) -> anyhow::Result<KernelSelection> {
    if !manager.has(Hook::PreModelLoad) {
        return Ok(KernelSelection::default());
    }
    let info = ModelInfo {
        model_type: config.architecture.model_type().to_string(),
        config: serde_json::Value::Object(config.raw.clone()),
        parameters: Vec::new(),
    };
    let choices = manager.pre_model_load(&info, &mut Services::with_tokenizer(tokenizer))?;
    let choices = choices
        .into_iter()
        .map(|(kernel, choice)| (kernel, (choice.plugin, choice.value)))
        .collect();
    let selection = KernelSelection::from_choices(&choices, config)?;
    if !selection.loss.makes_logits() && manager.has(Hook::ComputeLoss) {
        bail!(
            "{} was chosen, which never makes the whole logits, but a plugin computes the loss (compute_loss) from them; drop one of the two",
            selection.loss.name()
        );
    }
    Ok(selection)
}
