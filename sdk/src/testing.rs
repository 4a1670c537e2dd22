//! Helpers for testing a plugin without axl: a [`Host`] that records what the plugin logs and
//! reports, and event builders.

use std::collections::BTreeMap;

use axl_plugin_api::payload::{Event, GenerateRequest, LogLevel, Score, ScoreRequest, TrainState};
use axl_plugin_api::{Hook, Host, PluginError, Tensor, TensorView};

/// A [`Host`] for tests: tokenizes one id per byte, serves the parameters it was given, and
/// records log lines and metrics. Scoring and generation are refused unless answers are set.
#[derive(Clone, Debug, Default)]
pub struct TestHost {
    /// Log lines, with their levels, in order.
    pub logs: Vec<(LogLevel, String)>,
    /// Metrics, in order.
    pub metrics: Vec<(String, f64)>,
    /// Parameters [`Host::parameter`] serves.
    pub parameters: BTreeMap<String, Tensor>,
    /// What [`Host::score`] answers, request by request, if set.
    pub scores: Option<Vec<Score>>,
    /// What [`Host::generate`] answers, if set.
    pub generation: Option<String>,
}

impl Host for TestHost {
    fn log(&mut self, level: LogLevel, message: &str) {
        self.logs.push((level, message.to_string()));
    }

    fn metric(&mut self, name: &str, value: f64) {
        self.metrics.push((name.to_string(), value));
    }

    fn tokenize(&mut self, text: &str) -> Result<Vec<u32>, PluginError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(&mut self, ids: &[u32]) -> Result<String, PluginError> {
        let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
        String::from_utf8(bytes).map_err(|e| PluginError::new(e.to_string()))
    }

    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError> {
        self.parameters
            .get(name)
            .map(Tensor::view)
            .ok_or_else(|| PluginError::new(format!("no parameter `{name}`")))
    }

    fn score(&mut self, requests: &[ScoreRequest]) -> Result<Vec<Score>, PluginError> {
        match &self.scores {
            Some(scores) if scores.len() == requests.len() => Ok(scores.clone()),
            _ => Err(PluginError::new(
                "the test host has no scores for these requests",
            )),
        }
    }

    fn generate(&mut self, _request: &GenerateRequest) -> Result<String, PluginError> {
        self.generation
            .clone()
            .ok_or_else(|| PluginError::new("the test host has no generation"))
    }
}

/// A loop event at `global_step` of `max_steps`, with `metrics`.
pub fn event(hook: Hook, global_step: u64, max_steps: u64, metrics: &[(&str, f64)]) -> Event {
    Event {
        hook,
        state: TrainState {
            global_step,
            max_steps,
            epoch: 0.0,
        },
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        dir: None,
        message: None,
    }
}
