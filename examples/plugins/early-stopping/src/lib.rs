//! Early stopping: training ends when `eval_loss` has not improved by more than
//! `early_stop_min_delta` for `early_stop_patience` evaluations in a row.
//!
//! Build: `cargo build --release`; the library is `target/release/libearly_stopping.so`
//! (`.dylib` on macOS). A native library is trusted code: it runs inside axl with its rights.

use axl_sdk::prelude::*;

struct EarlyStopping {
    patience: u64,
    min_delta: f64,
    best: Option<f64>,
    evaluations_without_gain: u64,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        Self {
            patience: 3,
            min_delta: 0.0,
            best: None,
            evaluations_without_gain: 0,
        }
    }
}

impl Plugin for EarlyStopping {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "early_stopping",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::OnTrainBegin, Hook::OnEvaluate],
        );
        manifest.description = "stop when eval_loss stops improving".into();
        let schema = json!({
            "early_stop_patience": {
                "type": "integer", "minimum": 1,
                "description": "evaluations without improvement before training stops (default 3)"
            },
            "early_stop_min_delta": {
                "type": "number", "minimum": 0,
                "description": "smallest decrease of eval_loss that counts as improvement (default 0)"
            }
        });
        if let serde_json::Value::Object(map) = schema {
            manifest.config_schema = map;
        }
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        if let Some(p) = run
            .config
            .get("early_stop_patience")
            .and_then(|v| v.as_u64())
        {
            self.patience = p;
        }
        if let Some(d) = run
            .config
            .get("early_stop_min_delta")
            .and_then(|v| v.as_f64())
        {
            self.min_delta = d;
        }
        if run.config.get("eval_steps").is_none() && run.config.get("evals_per_epoch").is_none() {
            return Err(PluginError::new(
                "early stopping needs evaluations during training: set eval_steps or evals_per_epoch",
            ));
        }
        Ok(())
    }

    fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {
        if event.hook == Hook::OnTrainBegin {
            self.best = None;
            self.evaluations_without_gain = 0;
            return Ok(Control::default());
        }
        let Some(&loss) = event.metrics.get("eval_loss") else {
            return Ok(Control::default());
        };
        match self.best {
            Some(best) if loss > best - self.min_delta => self.evaluations_without_gain += 1,
            _ => {
                self.best = Some(loss);
                self.evaluations_without_gain = 0;
            }
        }
        let stop = self.evaluations_without_gain >= self.patience;
        if stop {
            host.log(
                LogLevel::Info,
                &format!(
                    "eval_loss has not improved for {} evaluations (best {:.4}); stopping at step {}",
                    self.patience,
                    self.best.unwrap_or(loss),
                    event.state.global_step
                ),
            );
        }
        Ok(Control {
            stop_training: stop,
        })
    }
}

axl_sdk::export_plugin!(EarlyStopping);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::{event, TestHost};

    #[test]
    fn stops_after_patience_evaluations_without_improvement() {
        let mut plugin = EarlyStopping {
            patience: 2,
            ..Default::default()
        };
        let mut host = TestHost::default();
        let mut stop_at = None;
        for (step, loss) in [(1, 2.0), (2, 1.5), (3, 1.6), (4, 1.55), (5, 1.4)] {
            let e = event(Hook::OnEvaluate, step, 5, &[("eval_loss", loss)]);
            if plugin.on_event(&e, &mut host).unwrap().stop_training {
                stop_at.get_or_insert(step);
            }
        }
        assert_eq!(stop_at, Some(4));
        assert_eq!(host.logs.len(), 1);
    }
}
