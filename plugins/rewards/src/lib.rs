//! The `rewards` plugin: built-in reward functions, served through the `reward` hook like a
//! third-party plugin's, for the RL trainers to name.
//!
//! | reward | score |
//! |---|---|
//! | `exact_match` | 1 when the completion's answer equals the row's `reward_answer_field` (default `answer`), else 0; none when the row has no answer |
//! | `format` | 1 when the whole completion matches `reward_format_pattern`, else 0 |
//! | `length_penalty` | 0 up to `reward_length_target` tokens, then −(tokens − target) / target, down to −1 |
//!
//! A completion's answer is the text inside its last `<answer>…</answer>` when it has one,
//! else the whole completion, trimmed; two answers that both read as numbers compare as
//! numbers (`42` and `42.0` match). The default format is the reasoning format
//! `<think>…</think>` then `<answer>…</answer>`.

use axl_sdk::prelude::*;

/// `reward_format_pattern` when unset.
pub const DEFAULT_FORMAT: &str = r"^<think>[\s\S]*?</think>\s*<answer>[\s\S]*?</answer>\s*$";
/// `reward_length_target` when unset.
pub const DEFAULT_LENGTH_TARGET: u64 = 512;

/// The plugin.
pub struct RewardsPlugin {
    answer_field: String,
    format: regex::Regex,
    length_target: u64,
}

impl Default for RewardsPlugin {
    fn default() -> Self {
        Self {
            answer_field: "answer".into(),
            format: regex::Regex::new(DEFAULT_FORMAT).expect("a valid pattern"),
            length_target: DEFAULT_LENGTH_TARGET,
        }
    }
}

/// The answer a completion gives.
pub fn answer_of(completion: &str) -> &str {
    let inner = completion
        .rfind("<answer>")
        .map(|start| &completion[start + "<answer>".len()..])
        .map(|rest| rest.find("</answer>").map_or(rest, |end| &rest[..end]));
    inner.unwrap_or(completion).trim()
}

/// Whether two answers agree: as numbers when both are, else as trimmed text.
pub fn answers_match(given: &str, expected: &str) -> bool {
    let number = |s: &str| s.trim().replace(',', "").parse::<f64>().ok();
    match (number(given), number(expected)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        _ => given.trim() == expected.trim(),
    }
}

impl Plugin for RewardsPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "rewards",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::Reward],
        );
        manifest.description = "reward functions: exact_match, format, length_penalty".into();
        manifest.config_schema = config_schema(json!({
            "reward_answer_field": {"type": ["string", "null"], "default": "answer", "description": "exact_match: the row's field with the answer"},
            "reward_format_pattern": {"type": ["string", "null"], "default": DEFAULT_FORMAT, "description": "format: the regular expression a whole completion must match"},
            "reward_length_target": {"type": ["integer", "null"], "minimum": 1, "default": DEFAULT_LENGTH_TARGET, "description": "length_penalty: completions longer than this many tokens lose reward"},
        }));
        manifest.provides.rewards = ["exact_match", "format", "length_penalty"]
            .map(String::from)
            .to_vec();
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        let config = &run.config;
        if let Some(field) = config.get("reward_answer_field").and_then(|v| v.as_str()) {
            self.answer_field = field.to_string();
        }
        if let Some(pattern) = config.get("reward_format_pattern").and_then(|v| v.as_str()) {
            self.format = regex::Regex::new(pattern).map_err(|e| {
                PluginError::new(format!(
                    "reward_format_pattern is not a valid regular expression: {e}"
                ))
            })?;
        }
        if let Some(target) = config.get("reward_length_target").and_then(|v| v.as_u64()) {
            self.length_target = target;
        }
        Ok(())
    }

    fn reward(
        &mut self,
        name: &str,
        batch: &RewardBatch,
        host: &mut dyn Host,
    ) -> Result<Vec<Option<f64>>, PluginError> {
        let score = |hit: bool| Some(if hit { 1.0 } else { 0.0 });
        match name {
            "exact_match" => Ok(batch
                .completions
                .iter()
                .enumerate()
                .map(|(i, completion)| {
                    let expected = match batch.fields.get(i)?.get(&self.answer_field)? {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    score(answers_match(answer_of(completion), &expected))
                })
                .collect()),
            "format" => Ok(batch
                .completions
                .iter()
                .map(|c| score(self.format.is_match(c)))
                .collect()),
            "length_penalty" => {
                let target = self.length_target as f64;
                batch
                    .completions
                    .iter()
                    .map(|c| {
                        let tokens = host.tokenize(c)?.len() as f64;
                        Ok(Some(-((tokens - target).max(0.0) / target).min(1.0)))
                    })
                    .collect()
            }
            other => Err(PluginError::new(format!(
                "does not provide reward function `{other}`"
            ))),
        }
    }
}

axl_plugin_api::register_builtin!(RewardsPlugin, "rewards");

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    fn batch(completions: &[&str], answers: &[Option<serde_json::Value>]) -> RewardBatch {
        RewardBatch {
            prompts: vec![String::new(); completions.len()],
            completions: completions.iter().map(|c| c.to_string()).collect(),
            fields: answers
                .iter()
                .map(|a| {
                    let mut row = Row::new();
                    if let Some(a) = a {
                        row.insert("answer".into(), a.clone());
                    }
                    row
                })
                .collect(),
        }
    }

    #[test]
    fn exact_match_reads_the_answer_tag_and_numbers() {
        let mut plugin = RewardsPlugin::default();
        let b = batch(
            &[
                "<think>6*7</think><answer> 42.0 </answer>",
                "Paris",
                "paris",
                "anything",
            ],
            &[
                Some(json!(42)),
                Some(json!("Paris")),
                Some(json!("Paris")),
                None,
            ],
        );
        let scores = plugin
            .reward("exact_match", &b, &mut TestHost::default())
            .unwrap();
        assert_eq!(scores, vec![Some(1.0), Some(1.0), Some(0.0), None]);
    }

    #[test]
    fn format_and_length_penalty() {
        let mut plugin = RewardsPlugin::default();
        let b = batch(
            &["<think>a</think>\n<answer>b</answer>", "just b"],
            &[None, None],
        );
        let scores = plugin
            .reward("format", &b, &mut TestHost::default())
            .unwrap();
        assert_eq!(scores, vec![Some(1.0), Some(0.0)]);
        let run = RunContext {
            config: json!({"reward_length_target": 4, "reward_format_pattern": "^b$"}),
            ..RunContext::default()
        };
        plugin.configure(&run, &mut TestHost::default()).unwrap();
        // The test host makes one token per byte: 6 bytes is 2 over a target of 4.
        let b = batch(&["abc", "abcdef", "abcdefghijklmnop"], &[None, None, None]);
        let scores = plugin
            .reward("length_penalty", &b, &mut TestHost::default())
            .unwrap();
        assert_eq!(scores, vec![Some(-0.0), Some(-0.5), Some(-1.0)]);
        let bad = RunContext {
            config: json!({"reward_format_pattern": "("}),
            ..RunContext::default()
        };
        let err = plugin
            .configure(&bad, &mut TestHost::default())
            .unwrap_err();
        assert!(err.message.contains("reward_format_pattern"), "{err}");
    }
}
