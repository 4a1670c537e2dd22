//! A run written to disk (`swanlab_mode: local` or `offline`), in the layout of SwanLab's
//! run directories, readable as plain files:
//!
//! ```text
//! <logdir>/run-<YYYYmmdd_HHMMSS>-<run id>/
//!   files/config.yaml             the hyperparameters, {key: {desc, sort, value}}
//!   files/swanlab-metadata.json   project, experiment, description, workspace, mode, times
//!   logs/<metric>/<n>.log         JSON lines {"index", "data", "create_time"}, 1000 steps a file
//!   logs/<metric>/_summary.json   {"max", "min", "max_step", "min_step", "num"}
//!   files/state.json              {"state": "FINISHED" | "CRASHED", "finished_at", "error"}
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use axl_sdk::prelude::*;

/// Steps per metric log file, as SwanLab slices them.
const STEPS_PER_FILE: u64 = 1000;

/// A running summary of one metric.
#[derive(Clone, Copy, Debug)]
struct Summary {
    max: f64,
    min: f64,
    max_step: u64,
    min_step: u64,
    num: u64,
}

/// A run directory being written.
#[derive(Debug)]
pub struct LocalRun {
    /// The run's directory.
    pub dir: PathBuf,
    summaries: BTreeMap<String, Summary>,
}

fn io(path: &Path, e: std::io::Error) -> PluginError {
    PluginError::new(format!("{}: {e}", path.display()))
}

fn write_atomic(path: &Path, text: &str) -> Result<(), PluginError> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text)
        .and_then(|_| std::fs::rename(&partial, path))
        .map_err(|e| io(path, e))
}

/// A metric's name as a directory name (`eval/loss` → `eval-loss`).
fn metric_dir(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl LocalRun {
    /// Creates the run directory with its hyperparameters and metadata.
    pub fn start(
        logdir: &Path,
        run_name: &str,
        metadata: serde_json::Value,
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, PluginError> {
        let dir = logdir.join(run_name);
        std::fs::create_dir_all(dir.join("files")).map_err(|e| io(&dir, e))?;
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| io(&dir, e))?;
        let profile: BTreeMap<String, serde_json::Value> = config
            .iter()
            .enumerate()
            .map(|(sort, (k, v))| (k.clone(), json!({"desc": "", "sort": sort, "value": v})))
            .collect();
        let yaml = serde_yaml::to_string(&profile).map_err(|e| PluginError::new(e.to_string()))?;
        write_atomic(&dir.join("files/config.yaml"), &yaml)?;
        let metadata =
            serde_json::to_string_pretty(&metadata).map_err(|e| PluginError::new(e.to_string()))?;
        write_atomic(&dir.join("files/swanlab-metadata.json"), &metadata)?;
        Ok(Self {
            dir,
            summaries: BTreeMap::new(),
        })
    }

    /// Appends one step's values.
    pub fn log(
        &mut self,
        step: u64,
        metrics: &[(String, f64)],
        created_at: &str,
    ) -> Result<(), PluginError> {
        for (key, value) in metrics {
            let dir = self.dir.join("logs").join(metric_dir(key));
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let file = dir.join(format!("{}.log", step / STEPS_PER_FILE));
            let data = if value.is_finite() {
                json!(value)
            } else {
                json!("nan")
            };
            let line = json!({"index": step, "data": data, "create_time": created_at});
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .and_then(|mut f| writeln!(f, "{line}"))
                .map_err(|e| io(&file, e))?;
            if value.is_finite() {
                let s = self.summaries.entry(key.clone()).or_insert(Summary {
                    max: *value,
                    min: *value,
                    max_step: step,
                    min_step: step,
                    num: 0,
                });
                if *value > s.max {
                    (s.max, s.max_step) = (*value, step);
                }
                if *value < s.min {
                    (s.min, s.min_step) = (*value, step);
                }
                s.num += 1;
                let summary = json!({"max": s.max, "min": s.min, "max_step": s.max_step, "min_step": s.min_step, "num": s.num});
                write_atomic(&dir.join("_summary.json"), &summary.to_string())?;
            }
        }
        Ok(())
    }

    /// Records how the run ended.
    pub fn finish(
        &self,
        state: &str,
        finished_at: &str,
        error: Option<&str>,
    ) -> Result<(), PluginError> {
        let state = json!({"state": state, "finished_at": finished_at, "error": error});
        write_atomic(&self.dir.join("files/state.json"), &state.to_string())
    }
}
