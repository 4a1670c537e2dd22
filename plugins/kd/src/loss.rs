//! The distillation loss and its gradient with respect to the logits, one position at a
//! time (the logits are read once and the gradient written in place; no full-vocabulary
//! copy of them is made).
//!
//! At a position `t` whose label is trained and where the teacher gave targets, with `z` the
//! student's logits over `T`, `s_k = log_softmax(z)[id_k]` at the teacher's ids (or, with
//! `kd_normalize_topk`, `s` re-normalized over those ids) and `p_k` the teacher's
//! probabilities:
//!
//! - `kd_beta = 0`, forward KL: `Σ p_k (log p_k − s_k)`;
//! - `kd_beta = 1`, reverse KL: `Σ e^{s_k} (s_k − log p_k)`;
//! - between, with `m_k = (1 − β) e^{s_k} + β p_k`:
//!   `β Σ p_k (log p_k − log m_k) + (1 − β) Σ e^{s_k} (s_k − log m_k)`.
//!
//! The teacher's targets are aligned with the student's positions without a shift (Axolotl's
//! convention: the teacher's distribution at `t` is for the token after `t`); the
//! cross-entropy uses the usual shifted labels. The step's loss is
//! `(kd_alpha · T² · Σ KD + kd_ce_alpha · Σ CE) / N`, `N` the trained tokens of the step, and
//! the gradient is that of this loss. (Axolotl reports this loss but back-propagates it
//! without the `T²`; the two agree at `T = 1`.)

use axl_sdk::prelude::*;
use rayon::prelude::*;

use crate::teacher::TeacherTargets;

/// The loss settings (`kd_*` keys).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KdSettings {
    /// `kd_alpha`: weight of the distillation term.
    pub kd_alpha: f64,
    /// `kd_ce_alpha`: weight of the cross-entropy term.
    pub ce_alpha: f64,
    /// `kd_temperature`.
    pub temperature: f64,
    /// `kd_beta`: 0 forward KL, 1 reverse KL, between the JSD-style mix.
    pub beta: f64,
    /// `kd_normalize_topk`: re-normalize the student's probabilities over the teacher's ids.
    pub normalize_topk: bool,
}

/// `log Σ exp(values)`.
fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// The distillation loss at one position and its gradient with respect to the student's
/// top-k log-probabilities `s`.
fn divergence(s: &[f64], teacher: &[f64], beta: f64) -> (f64, Vec<f64>) {
    let mut loss = 0.0;
    let mut grad = vec![0.0; s.len()];
    for (k, (&s, &t)) in s.iter().zip(teacher).enumerate() {
        let (q, p) = (s.exp(), t.exp());
        if beta == 0.0 {
            loss += p * (t - s);
            grad[k] = -p;
        } else if beta == 1.0 {
            loss += q * (s - t);
            grad[k] = q * (s - t + 1.0);
        } else {
            let m = (1.0 - beta) * q + beta * p;
            let log_m = m.ln();
            let dm = (1.0 - beta) * q;
            loss += beta * p * (t - log_m) + (1.0 - beta) * q * (s - log_m);
            grad[k] = -beta * p * dm / m + (1.0 - beta) * (q * (s - log_m) + q - q * dm / m);
        }
    }
    (loss, grad)
}

/// One position: its weighted, unnormalized loss; its gradient, times `scale`, added to
/// `grad`.
fn position(
    logits: &[f32],
    grad: &mut [f32],
    target: Option<(&[u32], &[Option<f64>])>,
    label: Option<usize>,
    settings: &KdSettings,
    scale: f64,
) -> Result<f64, String> {
    let vocab = logits.len();
    let mut loss = 0.0;
    if let Some((ids, logprobs)) = target.filter(|_| settings.kd_alpha != 0.0) {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!(
                "the teacher's token id {id} is outside the student's vocabulary of {vocab}"
            ));
        }
        // Entries whose teacher probability is 0 add nothing to the divergence, but with
        // kd_normalize_topk they still share the student's normalization, as in Axolotl.
        let valid: Vec<usize> = (0..ids.len()).filter(|&k| logprobs[k].is_some()).collect();
        if !valid.is_empty() {
            let t = settings.temperature;
            let z = |v: usize| f64::from(logits[v]) / t;
            let gathered: Vec<f64> = ids.iter().map(|&id| z(id as usize)).collect();
            let norm = if settings.normalize_topk {
                log_sum_exp(gathered.iter().copied())
            } else {
                log_sum_exp((0..vocab).map(z))
            };
            let s: Vec<f64> = valid.iter().map(|&k| gathered[k] - norm).collect();
            let teacher: Vec<f64> = valid.iter().filter_map(|&k| logprobs[k]).collect();
            let (kd, g) = divergence(&s, &teacher, settings.beta);
            let weight = settings.kd_alpha * t * t;
            loss += weight * kd;
            // d/dx = d/dz / T.
            let factor = weight * scale / t;
            let total: f64 = g.iter().sum();
            for (&k, &g) in valid.iter().zip(&g) {
                grad[ids[k] as usize] += (factor * g) as f32;
            }
            if settings.normalize_topk {
                for (&id, &gathered) in ids.iter().zip(&gathered) {
                    let q = (gathered - norm).exp();
                    grad[id as usize] -= (factor * total * q) as f32;
                }
            } else {
                for (v, out) in grad.iter_mut().enumerate() {
                    *out -= (factor * total * (z(v) - norm).exp()) as f32;
                }
            }
        }
    }
    if let Some(y) = label.filter(|_| settings.ce_alpha != 0.0) {
        if y >= vocab {
            return Err(format!("label {y} is outside the vocabulary of {vocab}"));
        }
        let norm = log_sum_exp(logits.iter().map(|&x| f64::from(x)));
        loss += settings.ce_alpha * (norm - f64::from(logits[y]));
        let factor = settings.ce_alpha * scale;
        for (v, out) in grad.iter_mut().enumerate() {
            let p = (f64::from(logits[v]) - norm).exp();
            *out += (factor * (p - f64::from(u8::from(v == y)))) as f32;
        }
    }
    Ok(loss)
}

/// Where each position's teacher targets come from: `(example, teacher position)`.
fn align(batch: &LossBatch, targets: &[Option<TeacherTargets>]) -> Vec<Option<(usize, usize)>> {
    let mut at = vec![None; batch.rows * batch.len];
    for (e, (span, targets)) in batch.examples.iter().zip(targets).enumerate() {
        let Some(targets) = targets else { continue };
        let n = targets.ids.len();
        // The teacher scored the example's last n tokens; a longer list (the example was
        // cut at sequence_len) is cut to the example's first tokens.
        let (first, count) = if n <= span.len {
            (span.start + span.len - n, n)
        } else {
            (span.start, span.len)
        };
        for j in 0..count {
            let position = span.row * batch.len + first + j;
            if batch.labels.get(position).is_some_and(|&l| l != -100) {
                at[position] = Some((e, j));
            }
        }
    }
    at
}

/// The batch's loss (normalized by `batch.normalizer`), its gradient written into `grad`.
pub fn kd_loss(
    logits: TensorView<'_>,
    grad: &mut [f32],
    batch: &LossBatch,
    settings: &KdSettings,
) -> Result<f64, PluginError> {
    let vocab = *logits.shape.last().unwrap_or(&0);
    if vocab == 0 {
        return Err(PluginError::new(format!(
            "logits of shape {:?} have no vocabulary",
            logits.shape
        )));
    }
    let positions = batch.rows * batch.len;
    if logits.data.len() != positions * vocab || grad.len() != logits.data.len() {
        return Err(PluginError::new(format!(
            "logits of shape {:?} do not fit a batch of {} × {}",
            logits.shape, batch.rows, batch.len
        )));
    }
    let mut targets = Vec::with_capacity(batch.examples.len());
    for span in &batch.examples {
        targets.push(TeacherTargets::from_fields(&span.fields)?);
    }
    if settings.kd_alpha != 0.0 && targets.iter().any(Option::is_none) {
        return Err(PluginError::new(
            "an example has no teacher log-probabilities: with kd_trainer, every dataset must be of type `axolotl.integrations.kd.chat_template` (with `logprobs_field`)",
        ));
    }
    let at = align(batch, &targets);
    let scale = 1.0 / batch.normalizer;
    let labels = &batch.labels;
    let len = batch.len;
    let losses: Result<Vec<f64>, String> = grad
        .par_chunks_mut(vocab)
        .zip(logits.data.par_chunks(vocab))
        .enumerate()
        .map(|(p, (grad, logits))| {
            let target = at[p].and_then(|(e, j)| {
                let t = targets[e].as_ref()?;
                Some((t.ids[j].as_slice(), t.logprobs[j].as_slice()))
            });
            let label = (p % len + 1 < len)
                .then(|| labels[p + 1])
                .filter(|&l| l != -100)
                .map(|l| l as usize);
            position(logits, grad, target, label, settings, scale)
        })
        .collect();
    let sum: f64 = losses.map_err(PluginError::new)?.iter().sum();
    Ok(sum * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Axolotl's distillation_loss_fn and cross-entropy with torch autograd
    /// (`fixtures/generate.py`): every case's loss and full gradient.
    #[test]
    fn loss_and_gradient_match_axolotl_and_torch() {
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../fixtures/reference.json")).unwrap();
        let r = &reference["losses"];
        let (rows, len, vocab) = (
            r["rows"].as_u64().unwrap() as usize,
            r["len"].as_u64().unwrap() as usize,
            r["vocab"].as_u64().unwrap() as usize,
        );
        let logits: Vec<f32> = serde_json::from_value(r["logits"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(r["labels"].clone()).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(r["target_token_ids"].clone()).unwrap();
        let logprobs: Vec<Vec<Option<f64>>> =
            serde_json::from_value(r["target_logprobs"].clone()).unwrap();
        // Each row is one example whose teacher scored every position.
        let examples = (0..rows)
            .map(|row| {
                let targets = TeacherTargets {
                    ids: ids[row * len..(row + 1) * len].to_vec(),
                    logprobs: logprobs[row * len..(row + 1) * len].to_vec(),
                };
                ExampleSpan {
                    row,
                    start: 0,
                    len,
                    fields: targets.into_fields(),
                }
            })
            .collect();
        let batch = LossBatch {
            input_ids: vec![0; rows * len],
            labels,
            rows,
            len,
            normalizer: r["normalizer"].as_f64().unwrap(),
            examples,
        };
        let shape = [rows, len, vocab];
        for case in r["cases"].as_array().unwrap() {
            let settings = KdSettings {
                kd_alpha: case["kd_alpha"].as_f64().unwrap(),
                ce_alpha: case["kd_ce_alpha"].as_f64().unwrap(),
                temperature: case["kd_temperature"].as_f64().unwrap(),
                beta: case["kd_beta"].as_f64().unwrap(),
                normalize_topk: case["kd_normalize_topk"].as_bool().unwrap(),
            };
            let mut grad = vec![0f32; logits.len()];
            let view = TensorView::new(&shape, &logits).unwrap();
            let loss = kd_loss(view, &mut grad, &batch, &settings).unwrap();
            let want = case["loss"].as_f64().unwrap();
            assert!(
                (loss - want).abs() < 1e-5 * want.abs().max(1.0),
                "{settings:?}: loss {loss} vs {want}"
            );
            let want: Vec<f64> = serde_json::from_value(case["grad"].clone()).unwrap();
            for (i, (g, w)) in grad.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-5,
                    "{settings:?}: grad[{i}] {g} vs {w}"
                );
            }
        }
    }

    /// In a packed row, each example's teacher rows are right-aligned to that example, and
    /// only trained positions take part.
    #[test]
    fn packed_examples_align_to_their_own_tokens() {
        let targets = |n: usize| TeacherTargets {
            ids: (0..n).map(|i| vec![i as u32]).collect(),
            logprobs: vec![vec![Some(0.0)]; n],
        };
        let span = |start, len, t: TeacherTargets| ExampleSpan {
            row: 0,
            start,
            len,
            fields: t.into_fields(),
        };
        let batch = LossBatch {
            input_ids: vec![0; 8],
            labels: vec![1, 1, -100, 1, -100, 1, 1, 1],
            rows: 1,
            len: 8,
            normalizer: 1.0,
            examples: vec![span(0, 3, targets(2)), span(3, 5, targets(7))],
        };
        let parsed: Vec<_> = batch
            .examples
            .iter()
            .map(|s| TeacherTargets::from_fields(&s.fields).unwrap())
            .collect();
        let at = align(&batch, &parsed);
        // First example: teacher rows 0, 1 at positions 1, 2 (position 2 is not trained).
        // Second: 7 rows for 5 tokens, cut to the first 5; position 4 is not trained.
        assert_eq!(
            at,
            vec![
                None,
                Some((0, 0)),
                None,
                Some((1, 0)),
                None,
                Some((1, 2)),
                Some((1, 3)),
                Some((1, 4))
            ]
        );
    }
}
