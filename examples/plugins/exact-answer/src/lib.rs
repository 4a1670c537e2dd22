//! The reward function `exact_answer`: 1 when the last number in a completion equals the
//! row's `answer`, 0 when it does not, none when the row has no `answer`.
//!
//! Build: `cargo build --release --target wasm32-wasip2`; the component is
//! `target/wasm32-wasip2/release/exact_answer.wasm`.

use axl_sdk::prelude::*;

#[derive(Default)]
struct ExactAnswer;

/// The last number written in `text` (digits, an optional sign and decimal point).
fn last_number(text: &str) -> Option<f64> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter_map(|token| token.trim_end_matches('.').parse::<f64>().ok())
        .next_back()
}

fn answer(row: &Row) -> Option<f64> {
    match row.get("answer")? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => last_number(s),
        _ => None,
    }
}

impl Plugin for ExactAnswer {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest("exact_answer", env!("CARGO_PKG_VERSION"), &[Hook::Reward]);
        manifest.description =
            "reward: the completion's last number equals the row's answer".into();
        manifest.provides.rewards = vec!["exact_answer".into()];
        manifest
    }

    fn reward(
        &mut self,
        _name: &str,
        batch: &RewardBatch,
        _host: &mut dyn Host,
    ) -> Result<Vec<Option<f64>>, PluginError> {
        Ok(batch
            .completions
            .iter()
            .enumerate()
            .map(|(i, completion)| {
                let expected = answer(batch.fields.get(i)?)?;
                let given = last_number(completion);
                Some(if given == Some(expected) { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

axl_sdk::export_plugin!(ExactAnswer);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    #[test]
    fn scores_the_last_number_against_the_answer() {
        let row = |answer: serde_json::Value| {
            let mut row = Row::new();
            row.insert("answer".into(), answer);
            row
        };
        let batch = RewardBatch {
            prompts: vec!["2+2?".into(); 3],
            completions: vec!["it is 4".into(), "4 or 5".into(), "four".into()],
            fields: vec![row(4.into()), row("#### 4".into()), Row::new()],
        };
        let scores = ExactAnswer.reward("exact_answer", &batch, &mut TestHost::default());
        assert_eq!(scores.unwrap(), vec![Some(1.0), Some(0.0), None]);
    }
}
