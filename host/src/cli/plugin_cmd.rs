//! `axl plugin new | check | list`, `axl config-schema`, and running a plugin's own
//! subcommand.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use axl_plugin_api::payload::CommandCall;
use axl_plugin_api::API_VERSION;
use serde_json::{json, Value};

use crate::plugins::spec::{parse_entry, Source};
use crate::plugins::{PluginManager, Services};

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
        println!("{}: no plugins", cfg.path.display());
        return Ok(());
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
    let (_, mut manager) = super::plugins::load_config(Path::new(config), &[], name)?;
    if !manager.commands().iter().any(|(c, _)| c == name) {
        bail!("unknown command `{name}`: neither axl nor the plugins of {config} provide it");
    }
    let call = CommandCall {
        name: name.clone(),
        args: rest.to_vec(),
    };
    manager
        .run_command(&call, &mut Services::default())
        .with_context(|| format!("axl {name}"))?;
    Ok(())
}
