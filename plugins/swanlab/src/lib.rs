//! The `swanlab` plugin (`axolotl.integrations.swanlab.SwanLabPlugin`): tracks a run in
//! SwanLab. It records the hyperparameters once and every logged and evaluated metric by
//! step, and it can send Lark notifications when training starts, finishes or fails.
//!
//! - `swanlab_mode: cloud` (the default; `SWANLAB_MODE` otherwise) talks to the API host
//!   through the host's `http` service ([`cloud`]). Built as a WebAssembly component
//!   (`cargo build -p axl-plugin-swanlab --target wasm32-wasip2`), the same code runs
//!   sandboxed and reaches only the hosts its `allow_net` grants.
//! - `local` and `offline` write the run to disk, under `SWANLAB_LOGDIR` or
//!   `output_dir/swanlog` ([`local`]).
//! - `disabled` does nothing.
//!
//! Keys, as Axolotl's `SwanLabConfig`: `use_swanlab` (on when `swanlab_project` is set),
//! `swanlab_project` (required when on), `swanlab_experiment_name`, `swanlab_description`,
//! `swanlab_workspace`, `swanlab_mode`, `swanlab_api_key` (or `SWANLAB_API_KEY`),
//! `swanlab_web_host`, `swanlab_api_host` (or `SWANLAB_WEB_HOST`, `SWANLAB_API_HOST`),
//! `swanlab_log_model`, `swanlab_lark_webhook_url`, `swanlab_lark_secret`, and the RL
//! completion-table keys, which are accepted. The API key and the Lark secret are never
//! logged, written to disk or sent as hyperparameters.

pub mod cloud;
pub mod lark;
pub mod local;

use std::path::PathBuf;

use axl_sdk::clock::UtcTime;
use axl_sdk::prelude::*;

/// The SwanLab cloud's API host.
pub const DEFAULT_API_HOST: &str = "https://api.swanlab.cn";
/// The SwanLab cloud's web host.
pub const DEFAULT_WEB_HOST: &str = "https://swanlab.cn";

/// Where a run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The SwanLab server.
    Cloud,
    /// Files on disk, to look at locally.
    Local,
    /// Files on disk, to upload later.
    Offline,
    /// Nowhere.
    Disabled,
}

/// What `configure` read.
#[derive(Clone, Debug)]
struct Settings {
    mode: Mode,
    project: String,
    experiment: Option<String>,
    description: String,
    workspace: Option<String>,
    api_key: Option<String>,
    api_host: String,
    web_host: String,
    lark_webhook: Option<String>,
    lark_secret: Option<String>,
    logdir: PathBuf,
    hyperparameters: serde_json::Map<String, serde_json::Value>,
}

/// A run in progress.
#[derive(Debug)]
enum Tracking {
    Cloud(cloud::CloudRun),
    Local(local::LocalRun),
}

/// The plugin.
#[derive(Default)]
pub struct SwanLabPlugin {
    settings: Option<Settings>,
    run: Option<Tracking>,
    info: lark::RunInfo,
    failed_uploads: usize,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `scheme://host[:port]` of a host setting (`https://` when none is written).
fn normalize_host(host: &str) -> String {
    let with_scheme = if host.contains("://") {
        host.to_string()
    } else {
        format!("https://{host}")
    };
    let (scheme, rest) = with_scheme
        .split_once("://")
        .unwrap_or(("https", &with_scheme));
    let authority = rest.split('/').next().unwrap_or_default();
    format!("{scheme}://{authority}")
}

/// Config keys never sent as hyperparameters.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["api_key", "secret", "token", "password", "webhook"]
        .iter()
        .any(|s| key.contains(s))
}

/// `value` without its secret keys, at any depth.
fn without_secrets(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .filter(|(k, _)| !is_secret(k))
                .map(|(k, v)| (k.clone(), without_secrets(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(without_secrets).collect())
        }
        other => other.clone(),
    }
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    let text = |d: &str| json!({"type": ["string", "null"], "description": d});
    config_schema(json!({
        "use_swanlab": {"type": ["boolean", "null"], "description": "track the run in SwanLab (on when swanlab_project is set)"},
        "swanlab_project": text("the project (required when use_swanlab is on)"),
        "swanlab_experiment_name": text("the run's name"),
        "swanlab_description": text("the run's description"),
        "swanlab_workspace": text("the workspace (user or organization); default: the API key's user"),
        "swanlab_mode": {"enum": ["cloud", "local", "offline", "disabled", null], "description": "cloud (default), local, offline or disabled"},
        "swanlab_api_key": text("the API key (else SWANLAB_API_KEY); never logged"),
        "swanlab_web_host": text("the web host of a private SwanLab deployment"),
        "swanlab_api_host": text("the API host of a private SwanLab deployment"),
        "swanlab_log_model": {"type": ["boolean", "null"], "description": "accepted; SwanLab's API has no model upload"},
        "swanlab_lark_webhook_url": text("a Lark bot webhook notified on start, finish and error"),
        "swanlab_lark_secret": text("the Lark bot's signing secret"),
        "swanlab_log_completions": {"type": ["boolean", "null"], "description": "RL completion tables (accepted)"},
        "swanlab_completion_log_interval": {"type": ["integer", "null"], "description": "RL completion tables (accepted)"},
        "swanlab_completion_max_buffer": {"type": ["integer", "null"], "description": "RL completion tables (accepted)"},
    }))
}

impl Settings {
    /// The settings, or `None` when tracking is off.
    fn read(run: &RunContext, host: &mut dyn Host) -> Result<Option<Self>, PluginError> {
        let config = &run.config;
        let text = |key: &str| config.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let project = text("swanlab_project");
        let enabled = config
            .get("use_swanlab")
            .and_then(|v| v.as_bool())
            .unwrap_or(project.is_some());
        if !enabled {
            return Ok(None);
        }
        let project = project.ok_or_else(|| {
            PluginError::new("swanlab_project is required when use_swanlab is on")
        })?;
        let mode = match text("swanlab_mode")
            .or_else(|| env("SWANLAB_MODE"))
            .as_deref()
        {
            None | Some("cloud") | Some("online") => Mode::Cloud,
            Some("local") => Mode::Local,
            Some("offline") => Mode::Offline,
            Some("disabled") => Mode::Disabled,
            Some(other) => {
                return Err(PluginError::new(format!(
                    "swanlab_mode `{other}` is not one of cloud, local, offline, disabled"
                )))
            }
        };
        if mode == Mode::Disabled {
            return Ok(None);
        }
        let api_key = text("swanlab_api_key").or_else(|| env("SWANLAB_API_KEY"));
        if mode == Mode::Cloud && api_key.is_none() && run.command == "train" {
            return Err(PluginError::new(
                "swanlab_mode cloud needs an API key: set swanlab_api_key or SWANLAB_API_KEY (or swanlab_mode: local / offline)",
            ));
        }
        let api_given = text("swanlab_api_host").or_else(|| env("SWANLAB_API_HOST"));
        let api_host = normalize_host(api_given.as_deref().unwrap_or(DEFAULT_API_HOST));
        let web_host = match text("swanlab_web_host").or_else(|| env("SWANLAB_WEB_HOST")) {
            Some(w) => normalize_host(&w),
            None if api_given.is_some() => api_host.clone(),
            None => DEFAULT_WEB_HOST.into(),
        };
        if config.get("swanlab_log_model").and_then(|v| v.as_bool()) == Some(true) {
            host.log(
                LogLevel::Warn,
                "swanlab_log_model: SwanLab's API has no model upload; the model stays in output_dir",
            );
        }
        let lark_webhook = text("swanlab_lark_webhook_url");
        let lark_secret = text("swanlab_lark_secret");
        if lark_webhook.is_some() && lark_secret.is_none() {
            host.log(
                LogLevel::Warn,
                "swanlab_lark_webhook_url without swanlab_lark_secret: notifications are unsigned",
            );
        }
        let mut hyperparameters = match without_secrets(config) {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        hyperparameters.insert("UPPERFRAME".into(), json!("axl"));
        Ok(Some(Self {
            mode,
            project,
            experiment: text("swanlab_experiment_name"),
            description: text("swanlab_description").unwrap_or_default(),
            workspace: text("swanlab_workspace"),
            api_key,
            api_host,
            web_host,
            lark_webhook,
            lark_secret,
            logdir: env("SWANLAB_LOGDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(&run.output_dir).join("swanlog")),
            hyperparameters,
        }))
    }
}

/// An 8-character run id from the time and the run's names.
fn run_id(now: UtcTime, project: &str, experiment: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{now:?}|{project}|{experiment}"));
    digest
        .iter()
        .take(8)
        .map(|b| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*b) % 36]))
        .collect()
}

impl SwanLabPlugin {
    fn notify(&self, occasion: &lark::Occasion, host: &mut dyn Host) -> Result<(), PluginError> {
        let Some(settings) = &self.settings else {
            return Ok(());
        };
        let Some(webhook) = &settings.lark_webhook else {
            return Ok(());
        };
        let timestamp = UtcTime::now().unix_seconds.max(0) as u64;
        let text = lark::message(occasion, &self.info);
        let body = lark::body(&text, timestamp, settings.lark_secret.as_deref());
        let response = host.http(&HttpRequest {
            method: "POST".into(),
            url: webhook.clone(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Some(body.to_string()),
        })?;
        let answer: serde_json::Value = serde_json::from_str(&response.body).unwrap_or_default();
        let code = answer.get("code").and_then(|c| c.as_i64()).unwrap_or(0);
        if response.status >= 300 || code != 0 {
            host.log(
                LogLevel::Warn,
                &format!(
                    "the Lark notification was refused (HTTP {}, code {code})",
                    response.status
                ),
            );
        }
        Ok(())
    }

    fn start(&mut self, host: &mut dyn Host) -> Result<(), PluginError> {
        let Some(settings) = self.settings.clone() else {
            return Ok(());
        };
        if self.run.is_some() {
            return Ok(());
        }
        let now = UtcTime::now();
        let experiment = settings
            .experiment
            .clone()
            .unwrap_or_else(|| format!("axl-{}", now.compact()));
        let id = run_id(now, &settings.project, &experiment);
        self.info = lark::RunInfo {
            project: settings.project.clone(),
            workspace: settings.workspace.clone().unwrap_or_default(),
            experiment: experiment.clone(),
            description: settings.description.clone(),
            link: None,
        };
        let run = match settings.mode {
            Mode::Cloud => {
                let api_key = settings.api_key.as_deref().unwrap_or_default();
                let mut run = cloud::CloudRun::start(
                    &cloud::NewRun {
                        api_host: &settings.api_host,
                        web_host: &settings.web_host,
                        api_key,
                        workspace: settings.workspace.as_deref(),
                        project: &settings.project,
                        experiment: &experiment,
                        description: &settings.description,
                        run_id: &id,
                        created_at: &now.iso8601(),
                    },
                    host,
                )?;
                run.config(&settings.hyperparameters, host)?;
                self.info.workspace = run.workspace.clone();
                self.info.link = Some(run.link.clone());
                host.log(LogLevel::Info, &format!("tracking at {}", run.link));
                Tracking::Cloud(run)
            }
            Mode::Local | Mode::Offline => {
                let metadata = json!({
                    "_version": 2,
                    "project": settings.project,
                    "experiment_name": experiment,
                    "description": settings.description,
                    "workspace": settings.workspace,
                    "mode": if settings.mode == Mode::Local { "local" } else { "offline" },
                    "run_id": id,
                    "created_at": now.iso8601(),
                    "framework": "axl",
                });
                let name = format!("run-{}-{id}", now.compact());
                let run = local::LocalRun::start(
                    &settings.logdir,
                    &name,
                    metadata,
                    &settings.hyperparameters,
                )?;
                host.log(
                    LogLevel::Info,
                    &format!("tracking in {}", run.dir.display()),
                );
                Tracking::Local(run)
            }
            Mode::Disabled => return Ok(()),
        };
        self.run = Some(run);
        self.notify(&lark::Occasion::Start, host)
    }

    fn log(
        &mut self,
        step: u64,
        metrics: &std::collections::BTreeMap<String, f64>,
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let values: Vec<(String, f64)> = metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if values.is_empty() {
            return Ok(());
        }
        let now = UtcTime::now().iso8601();
        let logged = match &mut self.run {
            Some(Tracking::Cloud(run)) => run.log(step, &values, &now, host),
            Some(Tracking::Local(run)) => run.log(step, &values, &now),
            None => Ok(()),
        };
        // A lost upload is reported, and training goes on.
        if let Err(e) = logged {
            self.failed_uploads += 1;
            host.log(
                LogLevel::Warn,
                &format!("step {step} was not recorded: {e}"),
            );
        }
        Ok(())
    }

    fn finish(&mut self, error: Option<&str>, host: &mut dyn Host) -> Result<(), PluginError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let state = if error.is_some() {
            "CRASHED"
        } else {
            "FINISHED"
        };
        let now = UtcTime::now().iso8601();
        match run {
            Tracking::Cloud(mut run) => run.finish(state, &now, host)?,
            Tracking::Local(run) => run.finish(state, &now, error)?,
        }
        let occasion = match error {
            Some(e) => lark::Occasion::Error(e.to_string()),
            None => lark::Occasion::Finish,
        };
        self.notify(&occasion, host)
    }
}

impl Plugin for SwanLabPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "swanlab",
            env!("CARGO_PKG_VERSION"),
            &[
                Hook::Configure,
                Hook::OnTrainBegin,
                Hook::OnLog,
                Hook::OnEvaluate,
                Hook::PostTrain,
                Hook::OnError,
            ],
        );
        manifest.description = "SwanLab experiment tracking, with Lark notifications".into();
        manifest.config_schema = schema();
        manifest.provides.trackers = vec!["swanlab".into()];
        manifest
    }

    fn configure(&mut self, run: &RunContext, host: &mut dyn Host) -> Result<(), PluginError> {
        self.settings = Settings::read(run, host)?;
        Ok(())
    }

    fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {
        match event.hook {
            Hook::OnTrainBegin => self.start(host)?,
            Hook::OnLog | Hook::OnEvaluate => {
                self.log(event.state.global_step, &event.metrics, host)?
            }
            Hook::PostTrain => self.finish(None, host)?,
            Hook::OnError => {
                let message = event
                    .message
                    .clone()
                    .unwrap_or_else(|| "training failed".into());
                self.finish(Some(&message), host)?
            }
            _ => {}
        }
        Ok(Control::default())
    }
}

#[cfg(not(target_arch = "wasm32"))]
axl_plugin_api::register_builtin!(
    SwanLabPlugin,
    "swanlab",
    aliases = [
        "axolotl.integrations.swanlab.SwanLabPlugin",
        "axolotl.integrations.swanlab"
    ]
);

#[cfg(target_arch = "wasm32")]
axl_sdk::export_plugin!(SwanLabPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    fn run(config: serde_json::Value) -> RunContext {
        RunContext {
            command: "train".into(),
            config,
            config_path: "c.yml".into(),
            output_dir: std::env::temp_dir()
                .join("axl-swanlab-unit")
                .display()
                .to_string(),
        }
    }

    #[test]
    fn settings_follow_axolotls_keys() {
        let mut host = TestHost::default();
        assert!(Settings::read(&run(json!({})), &mut host)
            .unwrap()
            .is_none());
        let err = Settings::read(&run(json!({"use_swanlab": true})), &mut host).unwrap_err();
        assert!(err.message.contains("swanlab_project is required"), "{err}");
        let err = Settings::read(
            &run(json!({"swanlab_project": "p", "swanlab_mode": "cloud"})),
            &mut host,
        );
        if env("SWANLAB_API_KEY").is_none() {
            assert!(err.unwrap_err().message.contains("needs an API key"));
        }
        let s = Settings::read(
            &run(json!({"swanlab_project": "p", "swanlab_api_key": "k3y", "swanlab_api_host": "swan.internal:8000/api", "swanlab_lark_secret": "s"})),
            &mut host,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.api_host, "https://swan.internal:8000");
        assert_eq!(s.web_host, "https://swan.internal:8000");
        assert!(!s.hyperparameters.contains_key("swanlab_api_key"));
        assert!(!s.hyperparameters.contains_key("swanlab_lark_secret"));
        let nested =
            without_secrets(&json!({"datasets": [{"path": "x", "HF_TOKEN": "t"}], "Api_Key": 1}));
        assert_eq!(nested, json!({"datasets": [{"path": "x"}]}));
        assert_eq!(s.hyperparameters["swanlab_project"], "p");
        let off = Settings::read(
            &run(json!({"swanlab_project": "p", "swanlab_mode": "disabled"})),
            &mut host,
        )
        .unwrap();
        assert!(off.is_none());
    }

    #[test]
    fn offline_runs_are_readable_files() {
        let dir = std::env::temp_dir().join(format!("axl-swanlab-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = run(
            json!({"swanlab_project": "p", "swanlab_mode": "offline", "swanlab_api_key": "k3y", "learning_rate": 0.1}),
        );
        config.output_dir = dir.display().to_string();
        let mut plugin = SwanLabPlugin::default();
        let mut host = TestHost::default();
        plugin.configure(&config, &mut host).unwrap();
        let event =
            |hook, step, metrics: &[(&str, f64)]| axl_sdk::testing::event(hook, step, 3, metrics);
        plugin
            .on_event(&event(Hook::OnTrainBegin, 0, &[]), &mut host)
            .unwrap();
        plugin
            .on_event(&event(Hook::OnLog, 1, &[("loss", 2.0)]), &mut host)
            .unwrap();
        plugin
            .on_event(
                &event(Hook::OnLog, 2, &[("loss", 1.5), ("grad_norm", f64::NAN)]),
                &mut host,
            )
            .unwrap();
        plugin
            .on_event(&event(Hook::PostTrain, 2, &[]), &mut host)
            .unwrap();
        let runs: Vec<_> = std::fs::read_dir(dir.join("swanlog"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(runs.len(), 1);
        let run_dir = runs[0].path();
        let config_yaml = std::fs::read_to_string(run_dir.join("files/config.yaml")).unwrap();
        assert!(
            config_yaml.contains("learning_rate:\n  desc: ''\n"),
            "{config_yaml}"
        );
        assert!(!config_yaml.contains("k3y"));
        let loss = std::fs::read_to_string(run_dir.join("logs/loss/0.log")).unwrap();
        let lines: Vec<serde_json::Value> = loss
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            (lines[1]["index"].clone(), lines[1]["data"].clone()),
            (json!(2), json!(1.5))
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run_dir.join("logs/loss/_summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["min"], 1.5);
        assert_eq!(summary["num"], 2);
        let state = std::fs::read_to_string(run_dir.join("files/state.json")).unwrap();
        assert!(state.contains("FINISHED"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
