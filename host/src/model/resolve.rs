//! Finds the directory of a model named by `base_model`: a local directory, a Hub id already
//! in the Hugging Face cache (so models Python tools downloaded are reused), or, when online, a
//! download from the Hub into that cache.

use std::path::{Path, PathBuf};

use super::error::{ModelError, Result};

/// Where to look for models and whether the Hub may be contacted.
#[derive(Clone, Debug, Default)]
pub struct HubSettings {
    /// Hugging Face hub caches, searched in order; downloads go to the first.
    pub cache_dirs: Vec<PathBuf>,
    /// Whether downloads are forbidden (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The Hub's address (`HF_ENDPOINT`), if not the default.
    pub endpoint: Option<String>,
    /// Access token (`HF_TOKEN`).
    pub token: Option<String>,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubSettings {
    /// The settings Python's `huggingface_hub` would use, from the environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let mut cache_dirs = Vec::new();
        if let Some(d) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
            cache_dirs.push(PathBuf::from(d));
        }
        if let Some(d) = var("HF_HOME") {
            cache_dirs.push(PathBuf::from(d).join("hub"));
        }
        if let Some(d) = var("XDG_CACHE_HOME") {
            cache_dirs.push(PathBuf::from(d).join("huggingface/hub"));
        }
        if let Some(h) = &home {
            cache_dirs.push(h.join(".cache/huggingface/hub"));
        }
        let mut seen = Vec::new();
        cache_dirs.retain(|d| {
            let new = !seen.contains(d);
            seen.push(d.clone());
            new
        });
        Self {
            cache_dirs,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v))
                || var("TRANSFORMERS_OFFLINE").is_some_and(|v| truthy(&v)),
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
        }
    }
}

/// Whether a reference can only be a path (not a Hub id).
fn is_path_like(reference: &str) -> bool {
    reference.starts_with('.')
        || reference.starts_with('/')
        || reference.starts_with('~')
        || reference.contains('\\')
        || reference.matches('/').count() > 1
}

fn expand_home(reference: &str) -> PathBuf {
    match reference.strip_prefix("~/") {
        Some(rest) => std::env::var("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|_| PathBuf::from(reference)),
        None => PathBuf::from(reference),
    }
}

/// The snapshot directory of `repo_id` in one hub cache, if it holds a `config.json`.
pub fn cached_snapshot(cache: &Path, repo_id: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    let by_ref = std::fs::read_to_string(repo_dir.join("refs/main"))
        .ok()
        .map(|commit| snapshots.join(commit.trim()))
        .filter(|d| d.join("config.json").is_file());
    if by_ref.is_some() {
        return by_ref;
    }
    // Without refs/main, the newest snapshot that is a complete model directory.
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("config.json").is_file())
        .map(|d| {
            (
                d.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                d,
            )
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, d)| d)
}

/// Resolves `reference` to a local model directory.
pub fn resolve_model(reference: &str, hub: &HubSettings) -> Result<PathBuf> {
    let local = expand_home(reference);
    if local.is_dir() {
        return Ok(local);
    }
    let mut looked_in = vec![format!("{} (no such directory)", local.display())];
    if is_path_like(reference) {
        return Err(ModelError::NotFound {
            reference: reference.to_string(),
            looked_in,
        });
    }
    for cache in &hub.cache_dirs {
        if let Some(dir) = cached_snapshot(cache, reference) {
            return Ok(dir);
        }
        looked_in.push(format!(
            "{} (Hugging Face cache)",
            cache
                .join(format!("models--{}", reference.replace('/', "--")))
                .display()
        ));
    }
    if hub.offline {
        looked_in.push("the Hugging Face Hub: not contacted, HF_HUB_OFFLINE is set".into());
        return Err(ModelError::NotFound {
            reference: reference.to_string(),
            looked_in,
        });
    }
    match download(reference, hub) {
        Ok(dir) => Ok(dir),
        Err(e) => {
            looked_in.push(format!("the Hugging Face Hub: {e}"));
            Err(ModelError::NotFound {
                reference: reference.to_string(),
                looked_in,
            })
        }
    }
}

/// Files fetched besides the weights; each is optional.
const OPTIONAL_FILES: [&str; 7] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
];

/// A Hub client that downloads into the first cache directory, with the endpoint and token
/// of `hub`.
pub fn hub_api(hub: &HubSettings) -> std::result::Result<hf_hub::api::sync::Api, String> {
    let cache_dir = hub
        .cache_dirs
        .first()
        .cloned()
        .ok_or("no cache directory to download into")?;
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir))
        .with_progress(false)
        .with_token(hub.token.clone());
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder.build().map_err(|e| e.to_string())
}

fn download(repo_id: &str, hub: &HubSettings) -> std::result::Result<PathBuf, String> {
    let repo = hub_api(hub)?.model(repo_id.to_string());
    let config = repo
        .get("config.json")
        .map_err(|e| format!("config.json: {e}"))?;
    let dir = config
        .parent()
        .ok_or("downloaded file has no directory")?
        .to_path_buf();
    match repo.get(super::safetensors_io::INDEX_FILE) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
            let mut shards: Vec<String> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                repo.get(&shard).map_err(|e| format!("{shard}: {e}"))?;
            }
        }
        Err(_) => {
            repo.get(super::safetensors_io::SINGLE_FILE)
                .map_err(|e| format!("{}: {e}", super::safetensors_io::SINGLE_FILE))?;
        }
    }
    for name in OPTIONAL_FILES {
        let _ = repo.get(name);
    }
    Ok(dir)
}
