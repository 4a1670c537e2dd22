//! The `lm_eval` plugin (`axolotl.integrations.lm_eval.LMEvalPlugin`): a native harness for
//! lm-evaluation-harness task files whose data are local files, run on the trained model
//! after training (`lm_eval_post_train`, default true) or alone by `axl lm-eval config.yml`.
//!
//! Keys, as Axolotl's `LMEvalArgs`: `lm_eval_tasks` (`task` or `task:N` for N examples),
//! `lm_eval_batch_size` (default 8: score requests per host call), `lm_eval_model` (for
//! `axl lm-eval`: the model to evaluate instead of the trained one), `lm_eval_post_train`;
//! with `apply_chat_template` and `fewshot_as_multiturn` as Axolotl passes them to lm-eval.
//! Task files are found by their `task:` name under `lm_eval_include_path` (lm-eval's
//! `--include_path`; default `lm_eval_tasks/` beside the config), or named by path.
//!
//! Results are written in lm-eval's layout to
//! `output_dir/lm_eval_results/<YYYYmmdd_HHMMSS>/<model>/results_<date>.json`, and the table
//! is logged.

pub mod harness;
pub mod task;

use std::path::{Path, PathBuf};

use axl_sdk::prelude::*;

use harness::PromptStyle;
use task::Task;

/// What `configure` read.
#[derive(Clone, Debug, Default)]
struct Settings {
    tasks: Vec<(PathBuf, Option<usize>)>,
    batch_size: usize,
    model: Option<String>,
    post_train: bool,
    style: PromptStyle,
    output_dir: PathBuf,
}

/// The plugin.
#[derive(Default)]
pub struct LmEvalPlugin {
    settings: Option<Settings>,
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    config_schema(json!({
        "lm_eval_tasks": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            "description": "tasks to evaluate: `name` or `name:N` for N few-shot examples, or a task file's path"
        },
        "lm_eval_batch_size": {"type": ["integer", "null"], "minimum": 1, "default": 8},
        "lm_eval_model": {"type": ["string", "null"], "description": "the model `axl lm-eval` evaluates (default: the trained model of output_dir)"},
        "lm_eval_post_train": {"type": ["boolean", "null"], "default": true},
        "lm_eval_include_path": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}],
            "description": "directories of task files (default: lm_eval_tasks/ beside the config)"
        },
        "apply_chat_template": {"type": ["boolean", "null"], "description": "render prompts with the model's chat template"},
        "fewshot_as_multiturn": {"type": ["boolean", "null"], "description": "with apply_chat_template: few-shot examples as turns"},
    }))
}

fn strings(value: Option<&serde_json::Value>) -> Vec<String> {
    match value {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

impl Settings {
    fn read(run: &RunContext) -> Result<Self, PluginError> {
        let config = &run.config;
        let base = Path::new(&run.config_path)
            .parent()
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let include: Vec<PathBuf> = match strings(config.get("lm_eval_include_path")) {
            dirs if dirs.is_empty() => vec![base.join("lm_eval_tasks")],
            dirs => dirs.iter().map(|d| base.join(d)).collect(),
        };
        let mut index = None;
        let mut tasks = Vec::new();
        for entry in strings(config.get("lm_eval_tasks")) {
            let (name, shots) = match entry.rsplit_once(':') {
                Some((name, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                    (name.to_string(), Some(n.parse::<usize>().unwrap_or(0)))
                }
                _ => (entry.clone(), None),
            };
            let as_path = base.join(&name);
            let path = if name.ends_with(".yaml") || name.ends_with(".yml") {
                as_path
            } else {
                let index = index.get_or_insert_with(|| task::index_tasks(&include));
                match index.get(&name) {
                    Some(path) => path.clone(),
                    None => {
                        let dirs: Vec<String> =
                            include.iter().map(|d| d.display().to_string()).collect();
                        return Err(PluginError::new(format!(
                            "lm_eval_tasks: no task file names the task `{name}` under {} (set lm_eval_include_path, or give the file's path)",
                            dirs.join(", ")
                        )));
                    }
                }
            };
            tasks.push((path, shots));
        }
        let flag = |key: &str| config.get(key).and_then(|v| v.as_bool());
        Ok(Self {
            tasks,
            batch_size: config
                .get("lm_eval_batch_size")
                .and_then(|v| v.as_u64())
                .unwrap_or(8) as usize,
            model: config
                .get("lm_eval_model")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            post_train: flag("lm_eval_post_train").unwrap_or(true),
            style: PromptStyle {
                chat_template: flag("apply_chat_template").unwrap_or(false),
                fewshot_as_multiturn: flag("fewshot_as_multiturn").unwrap_or(false),
            },
            output_dir: PathBuf::from(&run.output_dir),
        })
    }
}

/// The current time as `(seconds since the epoch, "YYYYmmdd_HHMMSS", "YYYY-mm-ddTHH-MM-SS.ffffff")`, UTC.
fn now() -> (f64, String, String) {
    let now = axl_sdk::clock::UtcTime::now();
    let (y, mo, d, h, mi, s) = now.parts();
    (
        now.unix_seconds as f64 + f64::from(now.micros) / 1e6,
        now.compact(),
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}-{mi:02}-{s:02}.{:06}",
            now.micros
        ),
    )
}

/// lm-eval's directory name for a model.
fn sanitize(model: &str) -> String {
    let re = regex::Regex::new(r#"["<>:/|\\?*\[\]]+"#).expect("a valid pattern");
    re.replace_all(model, "__").into_owned()
}

impl LmEvalPlugin {
    fn evaluate(&self, model: &str, host: &mut dyn Host) -> Result<PathBuf, PluginError> {
        let settings = self
            .settings
            .as_ref()
            .ok_or_else(|| PluginError::new("lm-eval ran before configure"))?;
        if settings.tasks.is_empty() {
            return Err(PluginError::new(
                "lm_eval_tasks is empty: name the tasks to evaluate",
            ));
        }
        let mut loaded = Vec::new();
        for (path, shots) in &settings.tasks {
            let task = Task::load(path).map_err(PluginError::new)?;
            let n = shots.unwrap_or(task.num_fewshot);
            loaded.push((task, n));
        }
        let mut results = Vec::new();
        for (task, n) in &loaded {
            host.log(
                LogLevel::Info,
                &format!("{}: {} documents, {n}-shot", task.name, task.docs.len()),
            );
            results.push(harness::run(
                task,
                *n,
                settings.batch_size,
                settings.style,
                host,
            )?);
        }
        let (date, stamp, file_stamp) = now();
        let pairs: Vec<(&Task, harness::TaskResult)> = loaded
            .iter()
            .map(|(t, _)| t)
            .zip(results.iter().cloned())
            .collect();
        let json = harness::results_json(&pairs, model, settings.batch_size, date);
        let dir = settings
            .output_dir
            .join("lm_eval_results")
            .join(stamp)
            .join(sanitize(model));
        std::fs::create_dir_all(&dir)
            .map_err(|e| PluginError::new(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("results_{file_stamp}.json"));
        let partial = path.with_extension("json.partial");
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| PluginError::new(e.to_string()))?;
        std::fs::write(&partial, text)
            .and_then(|_| std::fs::rename(&partial, &path))
            .map_err(|e| PluginError::new(format!("{}: {e}", path.display())))?;
        host.log(
            LogLevel::Info,
            &format!(
                "results in {}\n{}",
                path.display(),
                harness::table(&results)
            ),
        );
        Ok(path)
    }
}

impl Plugin for LmEvalPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "lm_eval",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::PostTrain, Hook::Commands],
        );
        manifest.description =
            "lm-evaluation-harness tasks, after training or by `axl lm-eval`".into();
        manifest.config_schema = schema();
        manifest.provides.commands = vec!["lm-eval".into()];
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        self.settings = Some(Settings::read(run)?);
        Ok(())
    }

    fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {
        let wanted = self
            .settings
            .as_ref()
            .is_some_and(|s| s.post_train && !s.tasks.is_empty());
        if event.hook == Hook::PostTrain && wanted {
            let model = event.dir.clone().unwrap_or_default();
            self.evaluate(&model, host)?;
        }
        Ok(Control::default())
    }

    fn run_command(&mut self, call: &CommandCall, host: &mut dyn Host) -> Result<(), PluginError> {
        if call.name != "lm-eval" {
            return Err(PluginError::new(format!(
                "does not provide command `{}`",
                call.name
            )));
        }
        if call.args.len() > 1 {
            return Err(PluginError::new(format!(
                "axl lm-eval takes the config file only, not {}",
                call.args[1..].join(" ")
            )));
        }
        let settings = self.settings.clone().unwrap_or_default();
        let model = match &settings.model {
            Some(model) => {
                host.use_model(model)?;
                model.clone()
            }
            None => settings.output_dir.display().to_string(),
        };
        self.evaluate(&model, host).map(|_| ())
    }
}

axl_plugin_api::register_builtin!(
    LmEvalPlugin,
    "lm_eval",
    aliases = [
        "axolotl.integrations.lm_eval.LMEvalPlugin",
        "axolotl.integrations.lm_eval"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_as_lm_eval_writes_them() {
        assert_eq!(sanitize("/runs/out"), "__runs__out");
        assert_eq!(sanitize("org/model"), "org__model");
    }
}
