//! `axl plugin new | check | list`, `axl config-schema`, and running a plugin's own
//! subcommand.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use axl_plugin_api::payload::CommandCall;
use axl_plugin_api::API_VERSION;
use serde_json::{json, Value};

use crate::config::LoadedConfig;
use crate::model::resolve::HubSettings;
use crate::model::tokenizer::ModelTokenizer;
use crate::model::{lora, CausalLm, LoadOptions};
use crate::plugins::services::{LoadedModel, ModelServices};
use crate::plugins::spec::{parse_entry, Source};
use crate::plugins::{PluginManager, Services};
use crate::setup::{self, ModelOverrides};
use axl_plugin_api::payload::{GenerateRequest, Score, ScoreRequest};

/// `axl plugin check FILE`: what the plugin says of itself, and whether this axl loads it.
pub fn check(file: &Path) -> anyhow::Result<()> {
    let entry = serde_yaml::Value::String(file.display().to_string());
    let spec = parse_entry(&entry, &|p| PathBuf::from(p)).map_err(|e| anyhow::anyhow!(e))?;
    let scratch = std::env::temp_dir().join("axl-plugin-check");
    println!("file:        {}", file.display());
    match PluginManager::load(std::slice::from_ref(&spec), Path::new("."), &scratch) {
        Ok(manager) => {
            let loaded = &manager.plugins()[0];
            let m = &loaded.manifest;
            println!("name:        {}", m.name);
            println!("version:     {}", m.version);
            println!("api version: {} (this axl: {API_VERSION})", m.api_version);
            println!("kind:        {}", loaded.transport.name());
            if !m.description.is_empty() {
                println!("description: {}", m.description);
            }
            let hooks: Vec<&str> = m.hooks.iter().map(|h| h.name()).collect();
            println!("hooks:       {}", hooks.join(", "));
            let keys: Vec<&str> = m.config_schema.keys().map(String::as_str).collect();
            println!(
                "config keys: {}",
                if keys.is_empty() {
                    "none".into()
                } else {
                    keys.join(", ")
                }
            );
            for (what, names) in [
                ("dataset types", &m.provides.strategies),
                ("rewards", &m.provides.rewards),
                ("losses", &m.provides.losses),
                ("commands", &m.provides.commands),
            ] {
                if !names.is_empty() {
                    println!("{what}: {}", names.join(", "));
                }
            }
            manager
                .config_keys()
                .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
            println!("loads:       yes");
            Ok(())
        }
        Err(errors) => {
            println!("loads:       no");
            bail!(errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }
}

/// `axl plugin list CONFIG`: the plugins a config loads, in order.
pub fn list(config: &Path) -> anyhow::Result<()> {
    let (cfg, manager) = super::plugins::load_config(config, &[], "plugin list")?;
    if manager.is_empty() {
        println!("{}: no plugins listed", cfg.path.display());
    }
    for loaded in manager.plugins() {
        let m = &loaded.manifest;
        let source = match &loaded.spec.source {
            Source::Builtin(name) => name.clone(),
            Source::Native(p) | Source::Wasm(p) => p.display().to_string(),
        };
        let hooks: Vec<&str> = m.hooks.iter().map(|h| h.name()).collect();
        println!(
            "{} {} ({}, API {}) from {source}\n  hooks: {}",
            m.name,
            m.version,
            loaded.transport.name(),
            m.api_version,
            hooks.join(", ")
        );
    }
    if !manager
        .plugins()
        .iter()
        .any(|p| p.manifest.name == crate::plugins::BUILTIN_STRATEGIES)
    {
        println!(
            "{} (built in, loaded for every run after the listed plugins): axl's own dataset types",
            crate::plugins::BUILTIN_STRATEGIES
        );
    }
    Ok(())
}

/// `axl config-schema [CONFIG]`: the JSON schema of a config: axl's keys, and the keys of
/// the plugins CONFIG loads.
pub fn config_schema(config: Option<&Path>) -> anyhow::Result<()> {
    let mut properties = serde_json::Map::new();
    let mut host_keys: Vec<&str> = crate::config::host_keys().collect();
    host_keys.sort();
    for key in host_keys {
        properties.insert(key.to_string(), json!({"x-axl-owner": "axl"}));
    }
    if let Some(path) = config {
        let (_, manager) = super::plugins::load_config(path, &[], "config-schema")?;
        let keys = manager
            .config_keys()
            .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
        for (key, (plugin, schema)) in keys {
            let mut schema = schema;
            if let Value::Object(map) = &mut schema {
                map.insert("x-axl-owner".into(), json!(format!("plugin:{plugin}")));
            }
            properties.insert(key, schema);
        }
    }
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "axl configuration",
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
    });
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}

/// Runs a subcommand a plugin provides: `axl NAME CONFIG [ARGS...]`.
pub fn external(args: &[String]) -> anyhow::Result<()> {
    let Some((name, rest)) = args.split_first() else {
        bail!("no command given");
    };
    let Some(config) = rest.first() else {
        bail!("unknown command `{name}` (a plugin's command takes the config file first: axl {name} config.yml ...)");
    };
    let (cfg, mut manager) = super::plugins::load_config(Path::new(config), &[], name)?;
    if !manager.commands().iter().any(|(c, _)| c == name) {
        bail!("unknown command `{name}`: neither axl nor the plugins of {config} provide it");
    }
    let call = CommandCall {
        name: name.clone(),
        args: rest.to_vec(),
    };
    let model = CommandModel::new(&cfg);
    let mut services = Services::default();
    services.model = Some(&model);
    manager
        .run_command(&call, &mut services)
        .with_context(|| format!("axl {name}"))?;
    Ok(())
}

/// The model a plugin's command reaches through the host services, loaded on first use: the
/// model the plugin chose (`use_model`), else the run's trained model (the full weights
/// `axl train` wrote to `output_dir`, or the base model with the adapter there or in
/// `lora_model_dir`), else the base model.
struct CommandModel<'c> {
    cfg: &'c LoadedConfig,
    choice: std::cell::RefCell<Option<String>>,
    loaded: std::cell::OnceCell<Result<(CausalLm, ModelTokenizer), String>>,
}

impl<'c> CommandModel<'c> {
    fn new(cfg: &'c LoadedConfig) -> Self {
        Self {
            cfg,
            choice: Default::default(),
            loaded: Default::default(),
        }
    }

    fn load(&self) -> anyhow::Result<(CausalLm, ModelTokenizer)> {
        let cfg = self.cfg;
        let hub = HubSettings::from_env();
        let output_dir = cfg.output_dir();
        let full_model =
            output_dir.join("config.json").is_file() && !setup::is_adapter_dir(&output_dir);
        let mut overrides = ModelOverrides::default();
        if let Some(choice) = self.choice.borrow().clone() {
            overrides.base_model = Some(choice);
        } else if full_model {
            overrides.base_model = Some(output_dir.display().to_string());
        }
        let sources = setup::model_sources(cfg, &overrides, &hub)?;
        let tokenizer = setup::load_configured_tokenizer(cfg, &sources)?;
        let mut model = setup::load_base(&sources, &LoadOptions::default())?;
        if overrides.base_model.is_none() {
            if let Some(dir) = setup::trained_adapter_dir(cfg, &overrides) {
                if setup::is_adapter_dir(&dir) {
                    lora::load_adapter(&mut model, &dir, false)
                        .with_context(|| format!("loading the adapter of {}", dir.display()))?;
                }
            }
        }
        eprintln!("model: {}", sources.base_model);
        Ok((model, tokenizer))
    }

    fn get(&self) -> Result<LoadedModel<'_>, String> {
        let loaded = self
            .loaded
            .get_or_init(|| self.load().map_err(|e| format!("{e:#}")));
        match loaded {
            Ok((model, tokenizer)) => Ok(LoadedModel { model, tokenizer }),
            Err(e) => Err(e.clone()),
        }
    }
}

impl ModelServices for CommandModel<'_> {
    fn parameter(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
        self.get()?.parameter(name)
    }

    fn score(&self, requests: &[ScoreRequest]) -> Result<Vec<Score>, String> {
        self.get()?.score(requests)
    }

    fn generate(&self, request: &GenerateRequest) -> Result<String, String> {
        self.get()?.generate(request)
    }

    fn tokenizer(&self) -> Result<&ModelTokenizer, String> {
        self.get().map(|l| l.tokenizer)
    }

    fn choose(&self, model: &str) -> Result<(), String> {
        if let Some(Err(e)) = self.loaded.get() {
            return Err(format!("the model could not be loaded: {e}"));
        }
        if self.loaded.get().is_some() && self.choice.borrow().as_deref() != Some(model) {
            return Err(format!(
                "cannot switch to `{model}`: the command already used another model"
            ));
        }
        *self.choice.borrow_mut() = Some(model.to_string());
        Ok(())
    }
}
