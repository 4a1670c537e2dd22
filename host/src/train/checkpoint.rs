//! Checkpoints: `output_dir/checkpoint-N/` with the weights (adapter or full model), the
//! optimizer state, the schedule and data-order position, and `trainer_state.json` in the
//! schema of transformers' Trainer.
//!
//! A checkpoint is written into `checkpoint-N.partial/` and renamed into place only when
//! complete, so a process killed while saving leaves every earlier checkpoint whole; partial
//! directories are never read and are removed by the next save.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::fsio;
use crate::model::safetensors_io::{self, SaveDtype};
use crate::model::ModelError;

use super::optimizer::Optimizer;

/// The file holding the optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The file holding the step, epoch and data position.
pub const PROGRESS_FILE: &str = "progress.json";
/// transformers' trainer state.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Where a run stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// The seed the data order is drawn from.
    pub seed: u64,
    /// The `log_history` of `trainer_state.json`.
    pub log_history: Vec<Value>,
}

/// `checkpoint-N` of a directory name.
fn checkpoint_step(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// The complete checkpoints of `output_dir`, oldest first.
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(PROGRESS_FILE).is_file())
        .filter_map(|p| checkpoint_step(&p).map(|s| (s, p)))
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint of `output_dir`.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    checkpoints(output_dir).pop().map(|(_, p)| p)
}

/// Writes `checkpoint-<step>`: `write_weights` fills the directory with the weights, then the
/// optimizer state, progress and trainer state follow, and the directory is renamed into
/// place. Older checkpoints beyond `keep` are deleted afterwards.
pub fn save(
    output_dir: &Path,
    progress: &Progress,
    optimizer: &Optimizer,
    trainer_state: &Value,
    keep: Option<usize>,
    write_weights: &dyn Fn(&Path) -> Result<(), ModelError>,
) -> Result<PathBuf, ModelError> {
    let name = format!("checkpoint-{}", progress.global_step);
    let done = output_dir.join(&name);
    let partial = output_dir.join(format!("{name}.partial"));
    if let Ok(entries) = std::fs::read_dir(output_dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    std::fs::create_dir_all(&partial).map_err(|e| ModelError::file(&partial, e))?;
    write_weights(&partial)?;
    let (steps, state) = optimizer.state_tensors();
    let tensors: Vec<(String, Tensor)> = state
        .into_iter()
        .map(|(n, v)| {
            let len = v.len();
            Tensor::from_vec(v, len, &Device::Cpu).map(|t| (n, t))
        })
        .collect::<candle_core::Result<_>>()?;
    safetensors_io::save_file(&partial.join(OPTIMIZER_FILE), &tensors, SaveDtype::F32)?;
    let progress_json = json!({
        "global_step": progress.global_step,
        "epoch": progress.epoch,
        "seed": progress.seed,
        "optimizer_steps": steps,
    });
    for (file, value) in [
        (PROGRESS_FILE, &progress_json),
        (TRAINER_STATE_FILE, trainer_state),
    ] {
        let path = partial.join(file);
        fsio::write_json_atomic(&path, value).map_err(|e| ModelError::file(&path, e))?;
    }
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(|e| ModelError::file(&done, e))?;
    }
    std::fs::rename(&partial, &done).map_err(|e| ModelError::file(&done, e))?;
    if let Some(keep) = keep {
        let all = checkpoints(output_dir);
        let excess = all.len().saturating_sub(keep.max(1));
        for (_, old) in all.into_iter().take(excess) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(done)
}

/// Reads a checkpoint's progress and restores its optimizer state into `optimizer`.
pub fn restore(dir: &Path, optimizer: &mut Optimizer) -> Result<Progress, ModelError> {
    let progress_path = dir.join(PROGRESS_FILE);
    let text = std::fs::read_to_string(&progress_path).map_err(|e| {
        ModelError::file(
            &progress_path,
            format!("{e}; is this a complete axl checkpoint?"),
        )
    })?;
    let p: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(&progress_path, format!("invalid JSON: {e}")))?;
    let field = |k: &str| {
        p.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::key(&progress_path, k, "missing or not a whole number"))
    };
    let global_step = field("global_step")? as usize;
    let seed = field("seed")?;
    let optimizer_steps = field("optimizer_steps")?;
    let epoch = p.get("epoch").and_then(Value::as_f64).unwrap_or(0.0);
    let state_path = dir.join(OPTIMIZER_FILE);
    let mut set = safetensors_io::load_file(&state_path, candle_core::DType::F32, &Device::Cpu)?;
    let mut tensors = Vec::new();
    for (name, tensor, _) in set.drain() {
        tensors.push((name, tensor.flatten_all()?.to_vec1::<f32>()?));
    }
    optimizer
        .restore(optimizer_steps, tensors)
        .map_err(|e| ModelError::file(&state_path, e))?;
    let state_path = dir.join(TRAINER_STATE_FILE);
    let log_history = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|s| s.get("log_history").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    Ok(Progress {
        global_step,
        epoch,
        seed,
        log_history,
    })
}
