//! Hub datasets: the raw files of a dataset repository, found in the Hugging Face hub cache
//! (`datasets--ORG--NAME/snapshots/<refs/main>/`) or downloaded into it when online.

use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::source::Format;
use crate::model::resolve::{self, HubSettings};

/// Whether a relative file path of a dataset repository belongs to `split` (and `name`, the
/// dataset configuration, when given): `train.jsonl`, `data/train-00000-of-00001.parquet`,
/// `default/train/0000.parquet`, `NAME/train-*.parquet`, ...
pub fn belongs_to(relative: &str, split: &str, name: Option<&str>) -> bool {
    if Format::from_path(Path::new(relative)).is_none() {
        return false;
    }
    let parts: Vec<&str> = relative.split('/').collect();
    if let Some(n) = name {
        if !parts[..parts.len() - 1].contains(&n) {
            return false;
        }
    }
    let file = parts.last().copied().unwrap_or_default();
    let stem = file.split('.').next().unwrap_or_default();
    parts[..parts.len() - 1].contains(&split)
        || stem == split
        || stem.starts_with(&format!("{split}-"))
        || stem.starts_with(&format!("{split}_"))
}

fn cached_snapshot(cache: &Path, id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("datasets--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo.join("refs/main")).ok()?;
    let dir = repo.join("snapshots").join(commit.trim());
    dir.is_dir().then_some(dir)
}

fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn pick(files: &[String], split: &str, name: Option<&str>, data_files: &[String]) -> Vec<String> {
    if !data_files.is_empty() {
        let patterns: Vec<glob::Pattern> = data_files
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect();
        return files
            .iter()
            .filter(|f| patterns.iter().any(|p| p.matches(f)))
            .cloned()
            .collect();
    }
    let matching: Vec<String> = files
        .iter()
        .filter(|f| belongs_to(f, split, name))
        .cloned()
        .collect();
    if !matching.is_empty() || split != "train" {
        return matching;
    }
    // A repository with data files but no split names holds one split, train.
    files
        .iter()
        .filter(|f| Format::from_path(Path::new(f)).is_some() && !f.starts_with('.'))
        .cloned()
        .collect()
}

/// The local files of a Hub dataset's split, from the cache or downloaded.
pub fn dataset_files(
    id: &str,
    split: &str,
    name: Option<&str>,
    data_files: &[String],
    hub: &HubSettings,
) -> Result<Vec<PathBuf>> {
    let mut looked_in = Vec::new();
    for cache in &hub.cache_dirs {
        match cached_snapshot(cache, id) {
            Some(dir) => {
                let chosen = pick(&files_under(&dir), split, name, data_files);
                if !chosen.is_empty() {
                    return Ok(chosen.iter().map(|f| dir.join(f)).collect());
                }
                looked_in.push(format!("{} (no files of split `{split}`)", dir.display()));
            }
            None => looked_in.push(format!(
                "{} (Hugging Face cache)",
                cache
                    .join(format!("datasets--{}", id.replace('/', "--")))
                    .display()
            )),
        }
    }
    if hub.offline {
        looked_in.push("the Hugging Face Hub: not contacted, HF_HUB_OFFLINE is set".into());
    } else {
        match download(id, split, name, data_files, hub) {
            Ok(files) if !files.is_empty() => return Ok(files),
            Ok(_) => looked_in.push(format!("the Hugging Face Hub: no files of split `{split}`")),
            Err(e) => looked_in.push(format!("the Hugging Face Hub: {e}")),
        }
    }
    Err(DataError::msg(format!(
        "dataset `{id}` not found locally; looked in:\n{}",
        looked_in
            .iter()
            .map(|l| format!("  - {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )))
}

fn download(
    id: &str,
    split: &str,
    name: Option<&str>,
    data_files: &[String],
    hub: &HubSettings,
) -> std::result::Result<Vec<PathBuf>, String> {
    let repo = resolve::hub_api(hub)?.dataset(id.to_string());
    let info = repo.info().map_err(|e| e.to_string())?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    pick(&files, split, name, data_files)
        .iter()
        .map(|f| repo.get(f).map_err(|e| format!("{f}: {e}")))
        .collect()
}
