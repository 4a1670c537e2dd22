//! The teacher's top-k log-probabilities of a dataset row, as the `kd.chat_template` dataset
//! type keeps them with the example: read from either form Axolotl accepts, cut to one `k`,
//! and re-scaled from the teacher's sampling temperature to `kd_temperature`.
//!
//! - vLLM's form: per position a list of `{"token": "token_id:1234", "logprob": -0.1}`.
//! - The pre-tokenized form: per position a list of log-probabilities, with the ids in the
//!   row's `target_token_ids` (a list per position).
//!
//! A position without log-probabilities (`null` or `[]`, as vLLM writes for the first
//! prompt token) has no target. `k` is Axolotl's: the smaller of the most and the least
//! common list length. Each position's probabilities are normalized over its top k, raised
//! to `temperature / kd_temperature` and normalized again.

use axl_sdk::prelude::*;
use serde::Deserialize;

/// One example's teacher targets, one entry per position the teacher scored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeacherTargets {
    /// Token ids per position.
    pub ids: Vec<Vec<u32>>,
    /// Log-probabilities per position (`None` where the probability is 0).
    pub logprobs: Vec<Vec<Option<f64>>>,
}

/// The field names under which the targets are kept with the example.
pub const IDS_FIELD: &str = "target_token_ids";
/// See [`IDS_FIELD`].
pub const LOGPROBS_FIELD: &str = "target_logprobs";

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One position's `(id, logprob)` pairs.
fn position(
    at: usize,
    entries: &serde_json::Value,
    ids: Option<&serde_json::Value>,
    field: &str,
) -> Result<Vec<(u32, f64)>, PluginError> {
    let entries = match entries {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Array(a) => a,
        other => {
            return Err(PluginError::new(format!(
                "`{field}[{at}]` should be a list, found {}",
                kind(other)
            )))
        }
    };
    let mut pairs = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let pair = match entry {
            serde_json::Value::Object(o) => {
                let token = o.get("token").and_then(|t| t.as_str()).ok_or_else(|| {
                    PluginError::new(format!("`{field}[{at}][{i}]` has no string `token`"))
                })?;
                let id = token
                    .rsplit_once(':')
                    .and_then(|(_, id)| id.parse::<u32>().ok())
                    .ok_or_else(|| {
                        PluginError::new(format!(
                            "`{field}[{at}][{i}].token` is `{token}`, not `token_id:<id>`"
                        ))
                    })?;
                let logprob = o.get("logprob").and_then(|l| l.as_f64()).ok_or_else(|| {
                    PluginError::new(format!("`{field}[{at}][{i}]` has no numeric `logprob`"))
                })?;
                (id, logprob)
            }
            serde_json::Value::Number(n) => {
                let id = ids
                    .and_then(|ids| ids.get(i))
                    .and_then(|id| id.as_u64())
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| {
                        PluginError::new(format!(
                            "`{field}[{at}]` holds bare log-probabilities, so `{IDS_FIELD}[{at}][{i}]` must be a token id"
                        ))
                    })?;
                (id, n.as_f64().unwrap_or(f64::NAN))
            }
            other => {
                return Err(PluginError::new(format!(
                    "`{field}[{at}][{i}]` should be a log-probability or a {{token, logprob}} object, found {}",
                    kind(other)
                )))
            }
        };
        pairs.push(pair);
    }
    Ok(pairs)
}

/// Axolotl's `k`: the smaller of the most and the least common non-zero list length.
fn top_k(lengths: &[usize]) -> usize {
    let mut counts: std::collections::BTreeMap<usize, usize> = Default::default();
    for &n in lengths.iter().filter(|&&n| n > 0) {
        *counts.entry(n).or_default() += 1;
    }
    let most = counts.iter().max_by_key(|(_, c)| **c).map(|(n, _)| *n);
    let least = counts.iter().min_by_key(|(_, c)| **c).map(|(n, _)| *n);
    most.zip(least).map(|(a, b)| a.min(b)).unwrap_or(0)
}

/// Log-probabilities re-normalized over the top k and re-scaled by `exponent`
/// (`temperature / kd_temperature`), as Axolotl does.
fn rescale(logprobs: &[f64], exponent: f64) -> Vec<Option<f64>> {
    let mut probs: Vec<f64> = logprobs.iter().map(|l| l.exp()).collect();
    let sum: f64 = probs.iter().sum();
    if sum > 1e-9 {
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    if exponent != 1.0 {
        probs.iter_mut().for_each(|p| *p = p.powf(exponent));
    }
    let sum: f64 = probs.iter().sum();
    probs
        .into_iter()
        .map(|p| {
            let l = (p / sum).ln();
            l.is_finite().then_some(l)
        })
        .collect()
}

impl TeacherTargets {
    /// Reads the targets of `row`'s `field`, re-scaled from the teacher's sampling
    /// `temperature` to `kd_temperature`.
    pub fn read(
        row: &Row,
        field: &str,
        temperature: f64,
        kd_temperature: f64,
    ) -> Result<Self, PluginError> {
        let positions = match row.get(field) {
            Some(serde_json::Value::Array(a)) => a,
            Some(other) => {
                return Err(PluginError::new(format!(
                    "`{field}` should be a list of the teacher's top-k log-probabilities per position, found {}",
                    kind(other)
                )))
            }
            None => {
                return Err(PluginError::new(format!(
                    "the row has no `{field}` (the teacher's log-probabilities; set the dataset's `logprobs_field`)"
                )))
            }
        };
        let ids = row.get(IDS_FIELD).and_then(|v| v.as_array());
        let mut pairs = Vec::with_capacity(positions.len());
        for (at, entries) in positions.iter().enumerate() {
            pairs.push(position(at, entries, ids.and_then(|i| i.get(at)), field)?);
        }
        let lengths: Vec<usize> = pairs.iter().map(Vec::len).collect();
        let k = top_k(&lengths);
        if k == 0 {
            return Err(PluginError::new(format!(
                "`{field}` holds no log-probabilities"
            )));
        }
        let exponent = temperature / kd_temperature;
        let mut targets = Self::default();
        for mut position in pairs {
            position.truncate(k);
            let logprobs: Vec<f64> = position.iter().map(|p| p.1).collect();
            targets.ids.push(position.iter().map(|p| p.0).collect());
            targets.logprobs.push(if logprobs.is_empty() {
                Vec::new()
            } else {
                rescale(&logprobs, exponent)
            });
        }
        Ok(targets)
    }

    /// The targets as fields kept with the example.
    pub fn into_fields(self) -> Row {
        let mut fields = Row::new();
        fields.insert(IDS_FIELD.into(), json!(self.ids));
        fields.insert(LOGPROBS_FIELD.into(), json!(self.logprobs));
        fields
    }

    /// The targets kept with an example, if it has them.
    pub fn from_fields(fields: &Row) -> Result<Option<Self>, PluginError> {
        let (Some(ids), Some(logprobs)) = (fields.get(IDS_FIELD), fields.get(LOGPROBS_FIELD))
        else {
            return Ok(None);
        };
        let bad = || PluginError::new("malformed teacher targets kept with an example");
        // Read in place: the fields are large and read every micro-step.
        let ids = Vec::<Vec<u32>>::deserialize(ids).map_err(|_| bad())?;
        let logprobs = Vec::<Vec<Option<f64>>>::deserialize(logprobs).map_err(|_| bad())?;
        if ids.len() != logprobs.len() || ids.iter().zip(&logprobs).any(|(i, l)| i.len() != l.len())
        {
            return Err(bad());
        }
        Ok(Some(Self { ids, logprobs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> serde_json::Value {
        serde_json::from_str(include_str!("../fixtures/reference.json")).unwrap()
    }

    /// Axolotl pads the teacher's positions on the left to the example's length, with
    /// target_mask 0 there; the remaining rows are the re-scaled targets.
    #[test]
    fn both_forms_match_axolotls_transform() {
        for case in reference()["transforms"].as_array().unwrap() {
            let mut row = Row::new();
            row.insert("teacher".into(), case["logprobs"].clone());
            if let Some(ids) = case.get("ids") {
                row.insert(IDS_FIELD.into(), ids.clone());
            }
            let targets = TeacherTargets::read(
                &row,
                "teacher",
                case["temperature"].as_f64().unwrap(),
                case["kd_temperature"].as_f64().unwrap(),
            )
            .unwrap();
            let want_ids = case["target_token_ids"].as_array().unwrap();
            let want_logprobs = case["target_logprobs"].as_array().unwrap();
            let padding = want_ids.len() - targets.ids.len();
            for (i, (ids, logprobs)) in targets.ids.iter().zip(&targets.logprobs).enumerate() {
                let want: Vec<u32> = serde_json::from_value(want_ids[padding + i].clone()).unwrap();
                assert_eq!(ids, &want);
                for (got, want) in logprobs
                    .iter()
                    .zip(want_logprobs[padding + i].as_array().unwrap())
                {
                    let (got, want) = (got.unwrap(), want.as_f64().unwrap());
                    assert!((got - want).abs() < 1e-6, "{case}: {got} vs {want}");
                }
            }
            let fields = targets.clone().into_fields();
            assert_eq!(TeacherTargets::from_fields(&fields).unwrap(), Some(targets));
        }
    }

    #[test]
    fn k_is_axolotls_and_mistakes_are_named() {
        assert_eq!(top_k(&[0, 5, 5, 5, 3]), 3);
        assert_eq!(top_k(&[0, 5, 5]), 5);
        let mut row = Row::new();
        row.insert(
            "lp".into(),
            json!([null, [{"token": "id 4", "logprob": -0.1}]]),
        );
        let err = TeacherTargets::read(&row, "lp", 1.0, 1.0).unwrap_err();
        assert!(err.message.contains("`lp[1][0].token` is `id 4`"), "{err}");
        row.insert("lp".into(), json!([[-0.1, -2.0]]));
        let err = TeacherTargets::read(&row, "lp", 1.0, 1.0).unwrap_err();
        assert!(err.message.contains("target_token_ids[0][0]"), "{err}");
        let err = TeacherTargets::read(&Row::new(), "lp", 1.0, 1.0).unwrap_err();
        assert!(err.message.contains("has no `lp`"), "{err}");
        row.insert(
            "lp".into(),
            json!([null, [{"token": "token_id:7", "logprob": -0.5}]]),
        );
        let targets = TeacherTargets::read(&row, "lp", 1.0, 1.0).unwrap();
        assert_eq!(targets.ids, vec![vec![], vec![7]]);
        assert_eq!(targets.logprobs[1], vec![Some(0.0)]);
    }
}
