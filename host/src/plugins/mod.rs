//! The plugin host: loads the config's `plugins:` (built-in, native library, WebAssembly
//! component) into one list of [`Plugin`] trait objects, calls them at each hook in list
//! order, and combines their results by the hook's rule, naming the plugin in every error.

pub mod http;
pub mod native;
pub mod services;
pub mod spec;
pub mod wasm;

use std::collections::BTreeMap;

use axl_plugin_api::hooks::{self, Combine, CombineError, Contribution};
use axl_plugin_api::payload::{
    CommandCall, Control, DatasetEntry, Event, Formatted, KernelChoices, LossBatch, ModelInfo,
    OptimizerContext, OptimizerSpec, RewardBatch, Row, RunContext, ScheduleContext,
};
use axl_plugin_api::registry::{builtins, BuiltinPlugin};
use axl_plugin_api::wire::Remote;
use axl_plugin_api::{
    Gradient, Hook, Manifest, Plugin, PluginError, TensorView, TensorViewMut, API_VERSION,
};

pub use services::{ModelServices, PluginHost, Services};
pub use spec::{OnError, PluginSpec, Sandbox, Source};

/// A plugin's failure, or two plugins' results that cannot both hold.
#[derive(Debug, thiserror::Error)]
pub enum PluginFailure {
    /// A plugin failed in a hook.
    #[error("plugin `{plugin}` failed in `{hook}`: {message}", hook = .hook.name())]
    Failed {
        /// The plugin.
        plugin: String,
        /// The hook.
        hook: Hook,
        /// What went wrong.
        message: String,
    },
    /// The results of two plugins conflict.
    #[error(transparent)]
    Combine(Box<CombineError>),
    /// No loaded plugin provides what was asked for.
    #[error("no plugin in `plugins:` provides the {what} `{name}`")]
    NoProvider {
        /// What kind of thing (`dataset type`, `reward function`, `command`).
        what: &'static str,
        /// Its name.
        name: String,
    },
}

impl From<CombineError> for PluginFailure {
    fn from(error: CombineError) -> Self {
        Self::Combine(Box::new(error))
    }
}

/// A plugin that could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{entry}` {message}")]
pub struct LoadError {
    /// The `plugins:` entry as written.
    pub entry: String,
    /// Why.
    pub message: String,
}

/// Where a loaded plugin came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Linked into axl.
    Builtin,
    /// A native library.
    Native,
    /// A WebAssembly component.
    Wasm,
}

impl Transport {
    /// The word `axl plugin list` shows.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Builtin => "built-in",
            Transport::Native => "native library",
            Transport::Wasm => "wasm component",
        }
    }
}

/// A loaded plugin.
pub struct Loaded {
    /// Its `plugins:` entry.
    pub spec: PluginSpec,
    /// Its manifest.
    pub manifest: Manifest,
    /// How it is reached.
    pub transport: Transport,
    /// A hash of its code: the file's SHA-256, or the built-in's name and axl's version.
    pub content_hash: String,
    plugin: Box<dyn Plugin>,
}

/// The loaded plugins, in `plugins:` order.
#[derive(Default)]
pub struct PluginManager {
    plugins: Vec<Loaded>,
}

/// The built-in plugin `name` selects, by name or alias.
pub fn find_builtin(name: &str) -> Result<&'static BuiltinPlugin, String> {
    if let Some(found) = builtins().find(|b| b.name == name || b.aliases.contains(&name)) {
        return Ok(found);
    }
    if let Some(rest) = name.strip_prefix("axolotl.integrations.") {
        let module = rest.split('.').next().unwrap_or(rest);
        return Err(format!(
            "is Axolotl's `{module}` integration, which axl does not have as a built-in plugin"
        ));
    }
    let names: Vec<&str> = builtins().map(|b| b.name).collect();
    let nearest = names
        .iter()
        .map(|n| (strsim::levenshtein(n, name), *n))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, n)| format!("; did you mean `{n}`?"))
        .unwrap_or_default();
    let known = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    };
    Err(format!(
        "is not a built-in plugin (built-ins: {known}){nearest}; a plugin file is given by its path (.wasm, .so)"
    ))
}

fn load_one(
    spec: &PluginSpec,
    base_dir: &std::path::Path,
    output_dir: &std::path::Path,
) -> Result<Loaded, String> {
    let (plugin, transport, content_hash): (Box<dyn Plugin>, _, _) = match &spec.source {
        Source::Builtin(name) => {
            let builtin = find_builtin(name)?;
            let hash = format!("builtin:{}:{}", builtin.name, env!("CARGO_PKG_VERSION"));
            ((builtin.create)(), Transport::Builtin, hash)
        }
        Source::Native(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
            let plugin = native::NativePlugin::load(path)?;
            (
                Box::new(Remote(plugin)),
                Transport::Native,
                wasm::content_hash(&bytes),
            )
        }
        Source::Wasm(path) => {
            let (plugin, hash) = wasm::WasmPlugin::load(path, &spec.sandbox, base_dir, output_dir)?;
            (Box::new(Remote(plugin)), Transport::Wasm, hash)
        }
    };
    let manifest = plugin.manifest();
    if !API_VERSION.loads(manifest.api_version) {
        return Err(format!(
            "was built against plugin API {}, and this axl implements {API_VERSION}; rebuild it against axl-sdk {}.{}",
            manifest.api_version, API_VERSION.major, API_VERSION.minor
        ));
    }
    manifest
        .validate()
        .map_err(|e| format!("has an invalid manifest: {e}"))?;
    Ok(Loaded {
        spec: spec.clone(),
        manifest,
        transport,
        content_hash,
        plugin,
    })
}

impl PluginManager {
    /// Loads every plugin of `specs`, in order. Every failure is reported, not just the first;
    /// any failure stops the run before work starts.
    pub fn load(
        specs: &[PluginSpec],
        base_dir: &std::path::Path,
        output_dir: &std::path::Path,
    ) -> Result<Self, Vec<LoadError>> {
        let mut plugins: Vec<Loaded> = Vec::new();
        let mut errors = Vec::new();
        for spec in specs {
            match load_one(spec, base_dir, output_dir) {
                Ok(loaded) => {
                    if let Some(earlier) = plugins
                        .iter()
                        .find(|p| p.manifest.name == loaded.manifest.name)
                    {
                        errors.push(LoadError {
                            entry: spec.entry.clone(),
                            message: format!(
                                "is the plugin `{}` again (already loaded from `{}`); list each plugin once",
                                loaded.manifest.name, earlier.spec.entry
                            ),
                        });
                    } else {
                        plugins.push(loaded);
                    }
                }
                Err(message) => errors.push(LoadError {
                    entry: spec.entry.clone(),
                    message,
                }),
            }
        }
        if errors.is_empty() {
            Ok(Self { plugins })
        } else {
            Err(errors)
        }
    }

    /// The loaded plugins, in order.
    pub fn plugins(&self) -> &[Loaded] {
        &self.plugins
    }

    /// Whether no plugin is loaded.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Whether any plugin implements `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.plugins
            .iter()
            .any(|p| p.manifest.hooks.contains(&hook))
    }

    /// The config keys the plugins own, each with its plugin and schema. A key claimed by
    /// two plugins, or a schema using what axl does not check, is an error.
    pub fn config_keys(&self) -> Result<crate::config::PluginKeys, Vec<String>> {
        let mut keys = crate::config::PluginKeys::new();
        let mut errors = Vec::new();
        for p in &self.plugins {
            let name = &p.manifest.name;
            for (key, schema) in &p.manifest.config_schema {
                if let Err(e) = crate::config::schema::check_schema(schema, key) {
                    errors.push(format!("plugin `{name}`: {e}"));
                }
                match keys.get(key) {
                    Some((first, _)) => errors.push(format!(
                        "plugins `{first}` and `{name}` both claim the config key `{key}`"
                    )),
                    None => {
                        keys.insert(key.clone(), (name.clone(), schema.clone()));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(keys)
        } else {
            Err(errors)
        }
    }

    /// Instances of their own of the plugins that provide dataset types, followed by axl's
    /// built-in [`BUILTIN_STRATEGIES`] (unless listed), configured for `run`, to format rows:
    /// one set per preprocessing thread, so that rows are formatted in parallel. A listed
    /// plugin that provides a built-in type's name formats it instead.
    pub fn strategy_plugins(
        &self,
        base_dir: &std::path::Path,
        output_dir: &std::path::Path,
        run: &RunContext,
    ) -> Result<StrategyPlugins, String> {
        let mut specs: Vec<PluginSpec> = self
            .plugins
            .iter()
            .filter(|p| !p.manifest.provides.strategies.is_empty())
            .map(|p| p.spec.clone())
            .collect();
        if !self
            .plugins
            .iter()
            .any(|p| p.manifest.name == BUILTIN_STRATEGIES)
        {
            specs.push(PluginSpec {
                entry: BUILTIN_STRATEGIES.to_string(),
                source: Source::Builtin(BUILTIN_STRATEGIES.to_string()),
                sandbox: Sandbox::default(),
                on_error: OnError::Abort,
            });
        }
        let mut sets = Vec::new();
        for _ in 0..rayon::current_num_threads().max(1) {
            let mut manager =
                PluginManager::load(&specs, base_dir, output_dir).map_err(|errors| {
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                })?;
            manager
                .configure(run, &mut Services::default())
                .map_err(|e| e.to_string())?;
            sets.push(std::sync::Mutex::new(manager));
        }
        let dataset_types = sets[0]
            .get_mut()
            .map_err(|_| "a plugin failed while loading".to_string())?
            .plugins
            .iter()
            .flat_map(|p| p.manifest.provides.strategies.iter().cloned())
            .collect();
        Ok(StrategyPlugins {
            sets,
            dataset_types,
        })
    }

    /// A hash of the code of the plugins that shape prepared data (those that provide
    /// dataset types or load datasets), in order, for the preprocessing cache.
    pub fn data_fingerprint(&self) -> String {
        self.plugins
            .iter()
            .filter(|p| {
                !p.manifest.provides.strategies.is_empty()
                    || p.manifest.hooks.contains(&Hook::LoadDatasets)
            })
            .map(|p| format!("{}={}", p.manifest.name, p.content_hash))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Calls `f` on each plugin implementing `hook`, in order, collecting its answer.
    fn each<T>(
        &mut self,
        hook: Hook,
        services: &mut Services<'_>,
        mut f: impl FnMut(&mut dyn Plugin, &mut PluginHost<'_, '_>) -> Result<T, PluginError>,
    ) -> Result<Vec<Contribution<T>>, PluginFailure> {
        let mut out = Vec::new();
        for loaded in &mut self.plugins {
            if !loaded.manifest.hooks.contains(&hook) {
                continue;
            }
            let name = loaded.manifest.name.clone();
            let net = loaded.spec.net_grants();
            let mut host = services.for_plugin(&name, net);
            match f(loaded.plugin.as_mut(), &mut host) {
                Ok(value) => out.push(Contribution {
                    plugin: name,
                    value,
                }),
                Err(e) if !hook.fatal() && loaded.spec.on_error == OnError::Skip => {
                    eprintln!(
                        "warning: plugin `{name}` failed in `{}` (on_error: skip, going on): {}",
                        hook.name(),
                        e.message
                    );
                }
                Err(e) => {
                    return Err(PluginFailure::Failed {
                        plugin: name,
                        hook,
                        message: e.message,
                    })
                }
            }
        }
        Ok(out)
    }

    /// `configure`: every plugin checks the run; any error stops it.
    pub fn configure(
        &mut self,
        run: &RunContext,
        services: &mut Services<'_>,
    ) -> Result<(), PluginFailure> {
        self.each(Hook::Configure, services, |p, h| p.configure(run, h))?;
        Ok(())
    }

    /// `load_datasets`: the rows of the one plugin that supplies them, if any.
    pub fn load_datasets(
        &mut self,
        run: &RunContext,
        services: &mut Services<'_>,
    ) -> Result<Option<Contribution<Vec<Row>>>, PluginFailure> {
        let answers = self.each(Hook::LoadDatasets, services, |p, h| p.load_datasets(run, h))?;
        Ok(hooks::at_most_one(Hook::LoadDatasets, answers)?)
    }

    /// The plugin that provides the dataset `type:` `name`, if any.
    pub fn strategy_provider(&self, name: &str) -> Option<&str> {
        self.plugins
            .iter()
            .find(|p| p.manifest.provides.strategies.iter().any(|s| s == name))
            .map(|p| p.manifest.name.as_str())
    }

    fn provider_index(&self, hook: Hook, what: impl Fn(&Manifest) -> bool) -> Option<usize> {
        self.plugins
            .iter()
            .position(|p| p.manifest.hooks.contains(&hook) && what(&p.manifest))
    }

    /// `format_example`: the row formatted by the plugin that provides the dataset's type.
    pub fn format_example(
        &mut self,
        dataset: &DatasetEntry,
        row: &Row,
        services: &mut Services<'_>,
    ) -> Result<Formatted, PluginFailure> {
        let Some(i) = self.provider_index(Hook::FormatExample, |m| {
            m.provides.strategies.contains(&dataset.dataset_type)
        }) else {
            return Err(PluginFailure::NoProvider {
                what: "dataset type",
                name: dataset.dataset_type.clone(),
            });
        };
        self.call_one(i, Hook::FormatExample, services, |p, h| {
            p.format_example(dataset, row, h)
        })
    }

    fn call_one<T>(
        &mut self,
        index: usize,
        hook: Hook,
        services: &mut Services<'_>,
        f: impl FnOnce(&mut dyn Plugin, &mut PluginHost<'_, '_>) -> Result<T, PluginError>,
    ) -> Result<T, PluginFailure> {
        let loaded = &mut self.plugins[index];
        let name = loaded.manifest.name.clone();
        let net = loaded.spec.net_grants();
        let mut host = services.for_plugin(&name, net);
        f(loaded.plugin.as_mut(), &mut host).map_err(|e| PluginFailure::Failed {
            plugin: name,
            hook,
            message: e.message,
        })
    }

    /// `pre_model_load`: the kernel choices of every plugin, merged.
    pub fn pre_model_load(
        &mut self,
        model: &ModelInfo,
        services: &mut Services<'_>,
    ) -> Result<BTreeMap<String, Contribution<serde_json::Value>>, PluginFailure> {
        let answers = self.each(Hook::PreModelLoad, services, |p, h| {
            p.pre_model_load(model, h)
        })?;
        Ok(hooks::merge(Hook::PreModelLoad, answers)?)
    }

    /// `post_model_build`, `pre_lora_load`, `post_lora_load`.
    pub fn model_event(
        &mut self,
        hook: Hook,
        model: &ModelInfo,
        services: &mut Services<'_>,
    ) -> Result<(), PluginFailure> {
        self.each(hook, services, |p, h| p.model_event(hook, model, h))?;
        Ok(())
    }

    /// `post_model_load`: which parameters train, merged over every plugin.
    pub fn post_model_load(
        &mut self,
        model: &ModelInfo,
        services: &mut Services<'_>,
    ) -> Result<BTreeMap<String, Contribution<serde_json::Value>>, PluginFailure> {
        let answers = self.each(Hook::PostModelLoad, services, |p, h| {
            p.post_model_load(model, h).map(|policy| {
                policy
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::Bool(v)))
                    .collect::<KernelChoices>()
            })
        })?;
        Ok(hooks::merge(Hook::PostModelLoad, answers)?)
    }

    /// `create_optimizer`: the first plugin's optimizer, if any answers.
    pub fn create_optimizer(
        &mut self,
        context: &OptimizerContext,
        services: &mut Services<'_>,
    ) -> Result<Option<Contribution<OptimizerSpec>>, PluginFailure> {
        self.first(Hook::CreateOptimizer, services, |p, h| {
            p.create_optimizer(context, h)
        })
    }

    /// `lr_schedule`: the first plugin's learning rate, if any answers.
    pub fn lr_schedule(
        &mut self,
        context: &ScheduleContext,
        services: &mut Services<'_>,
    ) -> Result<Option<Contribution<f64>>, PluginFailure> {
        self.first(Hook::LrSchedule, services, |p, h| p.lr_schedule(context, h))
    }

    /// Asks plugins in order until one answers.
    fn first<T>(
        &mut self,
        hook: Hook,
        services: &mut Services<'_>,
        mut f: impl FnMut(&mut dyn Plugin, &mut PluginHost<'_, '_>) -> Result<Option<T>, PluginError>,
    ) -> Result<Option<Contribution<T>>, PluginFailure> {
        debug_assert_eq!(hook.combine(), Combine::First);
        for i in 0..self.plugins.len() {
            if !self.plugins[i].manifest.hooks.contains(&hook) {
                continue;
            }
            let plugin = self.plugins[i].manifest.name.clone();
            if let Some(value) = self.call_one(i, hook, services, &mut f)? {
                return Ok(Some(Contribution { plugin, value }));
            }
        }
        Ok(None)
    }

    /// `compute_loss`: the first plugin's loss, its gradient written into `grad`.
    pub fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: &mut [f32],
        batch: &LossBatch,
        services: &mut Services<'_>,
    ) -> Result<Option<Contribution<f64>>, PluginFailure> {
        self.first(Hook::ComputeLoss, services, |p, h| {
            grad.fill(0.0);
            let view = TensorViewMut {
                shape: logits.shape,
                data: &mut *grad,
            };
            p.compute_loss(logits, view, batch, h)
        })
    }

    /// `on_gradients`: every plugin edits the gradients, in order.
    pub fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        services: &mut Services<'_>,
    ) -> Result<(), PluginFailure> {
        self.each(Hook::OnGradients, services, |p, h| {
            p.on_gradients(gradients, h)
        })?;
        Ok(())
    }

    /// A loop event: every plugin is told; training stops if any asks.
    pub fn event(
        &mut self,
        event: &Event,
        services: &mut Services<'_>,
    ) -> Result<Control, PluginFailure> {
        let answers = self.each(event.hook, services, |p, h| p.on_event(event, h))?;
        Ok(Control {
            stop_training: answers.iter().any(|c| c.value.stop_training),
        })
    }

    /// `reward`: the scores of the reward function `name`.
    pub fn reward(
        &mut self,
        name: &str,
        batch: &RewardBatch,
        services: &mut Services<'_>,
    ) -> Result<Vec<Option<f64>>, PluginFailure> {
        let Some(i) = self.provider_index(Hook::Reward, |m| {
            m.provides.rewards.iter().any(|r| r == name)
        }) else {
            return Err(PluginFailure::NoProvider {
                what: "reward function",
                name: name.to_string(),
            });
        };
        let scores = self.call_one(i, Hook::Reward, services, |p, h| p.reward(name, batch, h))?;
        if scores.len() != batch.completions.len() {
            return Err(PluginFailure::Failed {
                plugin: self.plugins[i].manifest.name.clone(),
                hook: Hook::Reward,
                message: format!(
                    "returned {} scores for {} completions",
                    scores.len(),
                    batch.completions.len()
                ),
            });
        }
        Ok(scores)
    }

    /// The subcommands plugins provide, with their plugin.
    pub fn commands(&self) -> Vec<(String, String)> {
        self.plugins
            .iter()
            .filter(|p| p.manifest.hooks.contains(&Hook::Commands))
            .flat_map(|p| {
                p.manifest
                    .provides
                    .commands
                    .iter()
                    .map(|c| (c.clone(), p.manifest.name.clone()))
            })
            .collect()
    }

    /// Runs the plugin subcommand `call.name`.
    pub fn run_command(
        &mut self,
        call: &CommandCall,
        services: &mut Services<'_>,
    ) -> Result<(), PluginFailure> {
        let Some(i) =
            self.provider_index(Hook::Commands, |m| m.provides.commands.contains(&call.name))
        else {
            return Err(PluginFailure::NoProvider {
                what: "command",
                name: call.name.clone(),
            });
        };
        self.call_one(i, Hook::Commands, services, |p, h| p.run_command(call, h))
    }
}

/// The built-in plugin that provides axl's own dataset types; every run loads it after the
/// config's `plugins:`.
pub const BUILTIN_STRATEGIES: &str = "prompt_strategies";

/// axl's built-in dataset types alone, as a run without `plugins:` formats rows.
pub fn builtin_strategy_plugins(train_on_inputs: bool) -> Result<StrategyPlugins, String> {
    let run = RunContext {
        command: "preprocess".into(),
        config: serde_json::json!({ "train_on_inputs": train_on_inputs }),
        ..RunContext::default()
    };
    let here = std::path::Path::new(".");
    PluginManager::default().strategy_plugins(here, here, &run)
}

/// The plugins that provide dataset types, as the data pipeline reaches them.
pub struct StrategyPlugins {
    sets: Vec<std::sync::Mutex<PluginManager>>,
    dataset_types: Vec<String>,
}

impl StrategyPlugins {
    /// A free set of instances (or, when every set is busy, the calling thread's own).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, PluginManager>, String> {
        for set in &self.sets {
            if let Ok(guard) = set.try_lock() {
                return Ok(guard);
            }
        }
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::thread::current().id().hash(&mut hasher);
        self.sets[hasher.finish() as usize % self.sets.len()]
            .lock()
            .map_err(|_| "a plugin failed while formatting another row".to_string())
    }
}

impl crate::data::strategy::PluginFormat for StrategyPlugins {
    fn provides(&self, dataset_type: &str) -> bool {
        self.dataset_types.iter().any(|t| t == dataset_type)
    }

    fn dataset_types(&self) -> Vec<String> {
        self.dataset_types.clone()
    }

    fn format(
        &self,
        dataset: &DatasetEntry,
        row: &Row,
        tokenizer: &crate::model::tokenizer::ModelTokenizer,
    ) -> Result<Formatted, String> {
        self.lock()?
            .format_example(dataset, row, &mut Services::with_tokenizer(tokenizer))
            .map_err(|e| match e {
                PluginFailure::Failed {
                    plugin, message, ..
                } => format!(
                    "{message} (dataset type `{}` of plugin `{plugin}`)",
                    dataset.dataset_type
                ),
                other => other.to_string(),
            })
    }
}
