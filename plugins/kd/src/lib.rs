//! The `kd` plugin (`axolotl.integrations.kd.KDPlugin`): knowledge distillation from a
//! teacher's top-k log-probabilities stored with the dataset.
//!
//! - The dataset type `axolotl.integrations.kd.chat_template` (also `kd.chat_template`)
//!   renders a row with the dataset's chat template, as `chat_template` does, and keeps the
//!   teacher's log-probabilities of the row's `logprobs_field` (default `logprobs`) with the
//!   example, re-scaled from the dataset's `temperature` (the teacher's sampling
//!   temperature, default 1) to `kd_temperature` ([`teacher`]).
//! - With `kd_trainer: true` the loss is computed by the plugin in `compute_loss`, in
//!   training and in evaluation: `(kd_alpha · T² · KD + kd_ce_alpha · CE) / N` ([`loss`]).
//!
//! Keys, as Axolotl's `KDArgs`: `kd_trainer`, `kd_alpha` (default 1), `kd_ce_alpha`
//! (default 0), `kd_temperature` (default 1), `kd_beta` (default 0: forward KL; 1 reverse
//! KL; between, the JSD-style mix), `kd_normalize_topk` (default false). Axolotl's online
//! teacher (`kd_online_*`) is not implemented.

pub mod loss;
pub mod teacher;

use axl_sdk::prelude::*;

use loss::KdSettings;
use teacher::TeacherTargets;

/// The dataset types the plugin provides.
pub const DATASET_TYPES: [&str; 3] = [
    "axolotl.integrations.kd.chat_template",
    "kd.chat_template",
    "axolotl.integrations.kd.chat_template.load_legacy",
];

/// The plugin.
#[derive(Debug)]
pub struct KdPlugin {
    enabled: bool,
    settings: KdSettings,
}

impl Default for KdPlugin {
    fn default() -> Self {
        Self {
            enabled: false,
            settings: KdSettings {
                kd_alpha: 1.0,
                ce_alpha: 0.0,
                temperature: 1.0,
                beta: 0.0,
                normalize_topk: false,
            },
        }
    }
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    let weight = |description: &str, default: f64| json!({"type": ["number", "null"], "minimum": 0.0, "default": default, "description": description});
    let schema = json!({
        "kd_trainer": {
            "anyOf": [{"type": "boolean"}, {"type": "number"}, {"type": "null"}],
            "description": "compute the loss by distillation from the teacher's log-probabilities"
        },
        "kd_alpha": weight("weight of the distillation term", 1.0),
        "kd_ce_alpha": weight("weight of the cross-entropy term", 0.0),
        "kd_temperature": {
            "type": ["number", "null"], "exclusiveMinimum": 0.0, "default": 1.0,
            "description": "temperature of the student's and the teacher's distributions"
        },
        "kd_beta": {
            "type": ["number", "null"], "minimum": 0.0, "maximum": 1.0, "default": 0.0,
            "description": "0 forward KL, 1 reverse KL, between the JSD-style mix of both"
        },
        "kd_normalize_topk": {
            "type": ["boolean", "null"], "default": false,
            "description": "re-normalize the student's probabilities over the teacher's top-k ids"
        },
    });
    config_schema(schema)
}

impl Plugin for KdPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "kd",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::FormatExample, Hook::ComputeLoss],
        );
        manifest.description =
            "knowledge distillation from a teacher's top-k log-probabilities".into();
        manifest.config_schema = schema();
        manifest.provides.strategies = DATASET_TYPES.map(String::from).to_vec();
        manifest.provides.losses = vec!["kd".into()];
        manifest
    }

    fn configure(&mut self, run: &RunContext, host: &mut dyn Host) -> Result<(), PluginError> {
        let config = &run.config;
        let number =
            |key: &str, default: f64| config.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
        self.enabled = match config.get("kd_trainer") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64() != Some(0.0),
            _ => false,
        };
        self.settings = KdSettings {
            kd_alpha: number("kd_alpha", 1.0),
            ce_alpha: number("kd_ce_alpha", 0.0),
            temperature: number("kd_temperature", 1.0),
            beta: number("kd_beta", 0.0),
            normalize_topk: config
                .get("kd_normalize_topk")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        if self.enabled && run.command == "train" {
            let s = &self.settings;
            host.log(
                LogLevel::Info,
                &format!(
                    "distilling: kd_alpha {}, kd_ce_alpha {}, kd_temperature {}, kd_beta {}{}",
                    s.kd_alpha,
                    s.ce_alpha,
                    s.temperature,
                    s.beta,
                    if s.normalize_topk {
                        ", top-k normalized"
                    } else {
                        ""
                    }
                ),
            );
        }
        Ok(())
    }

    fn format_example(
        &mut self,
        dataset: &DatasetEntry,
        row: &Row,
        _host: &mut dyn Host,
    ) -> Result<Formatted, PluginError> {
        let entry = &dataset.config;
        let field = entry
            .get("logprobs_field")
            .and_then(|f| f.as_str())
            .unwrap_or("logprobs");
        let temperature = entry
            .get("temperature")
            .and_then(|t| t.as_f64())
            .unwrap_or(1.0);
        let targets = TeacherTargets::read(row, field, temperature, self.settings.temperature)?;
        Ok(Formatted::built_in("chat_template", targets.into_fields()))
    }

    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        _host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        if !self.enabled {
            return Ok(None);
        }
        loss::kd_loss(logits, grad.data, batch, &self.settings).map(Some)
    }
}

axl_plugin_api::register_builtin!(
    KdPlugin,
    "kd",
    aliases = [
        "axolotl.integrations.kd.KDPlugin",
        "axolotl.integrations.kd"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    #[test]
    fn the_dataset_type_builds_on_chat_template_and_keeps_the_targets() {
        let mut plugin = KdPlugin::default();
        let run = RunContext {
            command: "train".into(),
            config: json!({"kd_trainer": true, "kd_temperature": 2.0}),
            ..RunContext::default()
        };
        let mut host = TestHost::default();
        plugin.configure(&run, &mut host).unwrap();
        assert!(
            host.logs[0].1.contains("kd_temperature 2"),
            "{:?}",
            host.logs
        );
        let dataset = DatasetEntry {
            dataset_type: "kd.chat_template".into(),
            config: json!({"logprobs_field": "teacher", "temperature": 1.0}),
        };
        let mut row = Row::new();
        row.insert("messages".into(), json!([]));
        row.insert(
            "teacher".into(),
            json!([[{"token": "token_id:3", "logprob": -0.1}, {"token": "token_id:4", "logprob": -2.4}]]),
        );
        let formatted = plugin.format_example(&dataset, &row, &mut host).unwrap();
        assert_eq!(formatted.base.as_deref(), Some("chat_template"));
        let targets = TeacherTargets::from_fields(&formatted.fields)
            .unwrap()
            .unwrap();
        assert_eq!(targets.ids, vec![vec![3, 4]]);
        // Re-scaled from temperature 1 to 2: probabilities raised to 1/2, re-normalized.
        let (a, b) = ((-0.1f64).exp().sqrt(), (-2.4f64).exp().sqrt());
        let want = (a / (a + b)).ln();
        assert!((targets.logprobs[0][0].unwrap() - want).abs() < 1e-9);
    }

    #[test]
    fn without_kd_trainer_the_host_keeps_the_loss() {
        let mut plugin = KdPlugin::default();
        let shape = [1, 1, 2];
        let (logits, mut grad) = ([0.0, 1.0], [0.0; 2]);
        let answer = plugin
            .compute_loss(
                TensorView::new(&shape, &logits).unwrap(),
                TensorViewMut::new(&shape, &mut grad).unwrap(),
                &LossBatch::default(),
                &mut TestHost::default(),
            )
            .unwrap();
        assert_eq!(answer, None);
    }
}
