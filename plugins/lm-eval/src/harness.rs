//! Running tasks against the model behind the host services, as lm-evaluation-harness's `hf`
//! model does, and scoring them.
//!
//! Requests are made the way lm-eval (0.4.11) makes them: text is tokenized as the tokenizer
//! does by default, with its special tokens (BOS), unless it already starts with the BOS
//! text (a chat template's output); trailing spaces of the context move to the
//! continuation, and the continuation's ids are the tail of the ids of the whole text. `acc` picks the choice of highest log-likelihood, `acc_norm` the highest
//! per character of the choice; `exact_match` compares the generation, cut at the first stop
//! string, with the reference. Standard errors are the sample standard deviation over
//! `√n`.

use axl_sdk::prelude::*;
use serde_json::Value;

use crate::task::{OutputType, Task};

/// Few-shot draws are seeded with lm-eval's default `fewshot_seed`.
pub const FEWSHOT_SEED: u64 = 1234;

/// How a run renders prompts.
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptStyle {
    /// Render with the model's chat template.
    pub chat_template: bool,
    /// With the chat template: examples as alternating turns.
    pub fewshot_as_multiturn: bool,
}

/// One task's outcome.
#[derive(Clone, Debug)]
pub struct TaskResult {
    /// The task's name.
    pub name: String,
    /// Examples used.
    pub num_fewshot: usize,
    /// Documents scored.
    pub samples: usize,
    /// `(metric, mean, standard error, higher is better)`.
    pub metrics: Vec<(String, f64, f64, bool)>,
}

/// The mean and its standard error.
pub fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

/// Exact match with lm-eval's options (Hugging Face `evaluate`'s `exact_match`).
pub fn exact_match(
    prediction: &str,
    reference: &str,
    metric: &crate::task::Metric,
) -> Result<bool, String> {
    let clean = |text: &str| -> Result<String, String> {
        let mut text = text.to_string();
        for pattern in &metric.regexes_to_ignore {
            let re = regex::Regex::new(pattern).map_err(|e| format!("regexes_to_ignore: {e}"))?;
            text = re.replace_all(&text, "").into_owned();
        }
        if metric.ignore_case {
            text = text.to_lowercase();
        }
        if metric.ignore_punctuation {
            text.retain(|c| !c.is_ascii_punctuation());
        }
        Ok(text)
    };
    Ok(clean(prediction)? == clean(reference)?)
}

/// Tokenizes as lm-eval's `hf` model does: with the tokenizer's special tokens, unless the
/// text already starts with its BOS text.
struct Encoder {
    bos_text: Option<String>,
}

impl Encoder {
    fn new(host: &mut dyn Host) -> Result<Self, PluginError> {
        let bos = host.encode("", true)?;
        let bos_text = if bos.is_empty() {
            None
        } else {
            Some(host.detokenize(&bos)?).filter(|t| !t.is_empty())
        };
        Ok(Self { bos_text })
    }

    fn encode(&self, host: &mut dyn Host, text: &str) -> Result<Vec<u32>, PluginError> {
        let has_bos = self
            .bos_text
            .as_deref()
            .is_some_and(|b| text.starts_with(b));
        host.encode(text, !has_bos)
    }

    /// lm-eval's context ids of a request: the text without its trailing whitespace, which
    /// goes with every continuation.
    fn context(&self, host: &mut dyn Host, context: &str) -> Result<Vec<u32>, PluginError> {
        self.encode(host, context.trim_end())
    }

    /// The ids of `continuation` after `context` (whose ids [`Encoder::context`] gave): the
    /// tail of the ids of the whole text.
    fn continuation(
        &self,
        host: &mut dyn Host,
        context: &str,
        context_ids: &[u32],
        continuation: &str,
    ) -> Result<Vec<u32>, PluginError> {
        let whole = self.encode(host, &format!("{context}{continuation}"))?;
        let split = context_ids.len().min(whole.len());
        Ok(whole[split..].to_vec())
    }
}

/// The prompt of a document as the model sees it.
fn prompt(
    task: &Task,
    index: usize,
    n: usize,
    style: PromptStyle,
    host: &mut dyn Host,
) -> Result<String, PluginError> {
    if style.chat_template {
        let turns = task
            .chat_context(index, n, FEWSHOT_SEED, style.fewshot_as_multiturn)
            .map_err(PluginError::new)?;
        host.apply_chat_template(&turns, true)
    } else {
        task.context(index, n, FEWSHOT_SEED)
            .map_err(PluginError::new)
    }
}

/// Runs `task` with `n` examples per prompt, scoring `batch_size` requests per host call.
pub fn run(
    task: &Task,
    n: usize,
    batch_size: usize,
    style: PromptStyle,
    host: &mut dyn Host,
) -> Result<TaskResult, PluginError> {
    let mut per_metric: Vec<Vec<f64>> = vec![Vec::new(); task.metrics.len()];
    let encoder = Encoder::new(host)?;
    let at = |i: usize, e: String| PluginError::new(format!("{}: document {i}: {e}", task.name));
    match task.output_type {
        OutputType::MultipleChoice => {
            let mut requests = Vec::new();
            let mut docs = Vec::new();
            for (i, doc) in task.docs.iter().enumerate() {
                let context = prompt(task, i, n, style, host)?;
                let choices = task.doc_to_choice(doc).map_err(|e| at(i, e))?;
                let gold = task.gold_indices(doc, &choices).map_err(|e| at(i, e))?;
                let context_ids = encoder.context(host, &context)?;
                for choice in &choices {
                    // lm-eval drops the delimiter after a chat template's assistant prompt.
                    let delimiter = if style.chat_template {
                        ""
                    } else {
                        task.target_delimiter.as_str()
                    };
                    let continuation = format!("{delimiter}{choice}");
                    let continuation_ids =
                        encoder.continuation(host, &context, &context_ids, &continuation)?;
                    requests.push(ScoreRequest {
                        context: context.clone(),
                        continuation,
                        context_ids: (!context_ids.is_empty()).then(|| context_ids.clone()),
                        continuation_ids: Some(continuation_ids),
                    });
                }
                docs.push((choices, gold));
            }
            let mut scores = Vec::with_capacity(requests.len());
            for chunk in requests.chunks(batch_size.max(1)) {
                let chunk: Vec<ScoreRequest> = chunk
                    .iter()
                    .cloned()
                    .map(|mut r| {
                        if r.context_ids.is_none() {
                            // An empty context: the host starts from the tokenizer's own
                            // special tokens.
                            r.continuation_ids = None;
                        }
                        r
                    })
                    .collect();
                scores.extend(host.score(&chunk)?);
            }
            let mut next = 0;
            for (choices, gold) in docs {
                let lls: Vec<f64> = scores[next..next + choices.len()]
                    .iter()
                    .map(|s| s.log_likelihood)
                    .collect();
                next += choices.len();
                let argmax = |values: &[f64]| {
                    values
                        .iter()
                        .enumerate()
                        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
                            if v > best.1 {
                                (i, v)
                            } else {
                                best
                            }
                        })
                        .0
                };
                let normalized: Vec<f64> = lls
                    .iter()
                    .zip(&choices)
                    .map(|(ll, c)| ll / c.chars().count().max(1) as f64)
                    .collect();
                let (pred, pred_norm) = (argmax(&lls), argmax(&normalized));
                for (metric, values) in task.metrics.iter().zip(&mut per_metric) {
                    let hit = match metric.name.as_str() {
                        "acc" => gold.contains(&pred),
                        _ => gold.contains(&pred_norm),
                    };
                    values.push(if hit { 1.0 } else { 0.0 });
                }
            }
        }
        OutputType::GenerateUntil => {
            for (i, doc) in task.docs.iter().enumerate() {
                let context = prompt(task, i, n, style, host)?;
                let references = task.references(doc).map_err(|e| at(i, e))?;
                let prompt_ids = encoder.encode(host, &context)?;
                let generated = host.generate(&GenerateRequest {
                    prompt: context,
                    max_new_tokens: task.max_gen_toks,
                    temperature: task.temperature,
                    stop: task.until.clone(),
                    prompt_ids: (!prompt_ids.is_empty()).then_some(prompt_ids),
                })?;
                host.log(
                    LogLevel::Debug,
                    &format!(
                        "{}[{i}]: generated {generated:?}, expected {references:?}",
                        task.name
                    ),
                );
                for (metric, values) in task.metrics.iter().zip(&mut per_metric) {
                    let mut hit = false;
                    for reference in &references {
                        hit |= exact_match(&generated, reference, metric).map_err(|e| at(i, e))?;
                    }
                    values.push(if hit { 1.0 } else { 0.0 });
                }
            }
        }
    }
    Ok(TaskResult {
        name: task.name.clone(),
        num_fewshot: n,
        samples: task.docs.len(),
        metrics: task
            .metrics
            .iter()
            .zip(&per_metric)
            .map(|(m, values)| {
                let (mean, stderr) = mean_and_stderr(values);
                (m.name.clone(), mean, stderr, m.higher_is_better)
            })
            .collect(),
    })
}

/// The results file in lm-eval's layout (`results`, `configs`, `versions`, `n-shot`,
/// `higher_is_better`, `n-samples`, `config`).
pub fn results_json(
    tasks: &[(&Task, TaskResult)],
    model: &str,
    batch_size: usize,
    date: f64,
) -> Value {
    let number = |v: f64| {
        if v.is_finite() {
            json!(v)
        } else {
            json!("N/A")
        }
    };
    let mut results = serde_json::Map::new();
    let mut configs = serde_json::Map::new();
    let mut versions = serde_json::Map::new();
    let mut n_shot = serde_json::Map::new();
    let mut higher = serde_json::Map::new();
    let mut samples = serde_json::Map::new();
    let mut subtasks = serde_json::Map::new();
    for (task, result) in tasks {
        let mut entry = serde_json::Map::new();
        entry.insert("alias".into(), json!(result.name));
        let mut better = serde_json::Map::new();
        for (name, mean, stderr, higher_is_better) in &result.metrics {
            entry.insert(format!("{name},none"), number(*mean));
            entry.insert(format!("{name}_stderr,none"), number(*stderr));
            better.insert(name.clone(), json!(higher_is_better));
        }
        results.insert(result.name.clone(), Value::Object(entry));
        let mut config = task.config.clone();
        if let Value::Object(c) = &mut config {
            c.insert("num_fewshot".into(), json!(result.num_fewshot));
        }
        configs.insert(result.name.clone(), config);
        versions.insert(result.name.clone(), task.version.clone());
        n_shot.insert(result.name.clone(), json!(result.num_fewshot));
        higher.insert(result.name.clone(), Value::Object(better));
        samples.insert(
            result.name.clone(),
            json!({"original": result.samples, "effective": result.samples}),
        );
        subtasks.insert(result.name.clone(), json!([]));
    }
    json!({
        "results": results,
        "group_subtasks": subtasks,
        "configs": configs,
        "versions": versions,
        "n-shot": n_shot,
        "higher_is_better": higher,
        "n-samples": samples,
        "config": {
            "model": "axl",
            "model_args": format!("pretrained={model}"),
            "batch_size": batch_size,
            "fewshot_seed": FEWSHOT_SEED,
        },
        "model_name": model,
        "date": date,
    })
}

/// lm-eval's table of results, in Markdown.
pub fn table(results: &[TaskResult]) -> String {
    let mut out = String::from(
        "|Tasks|n-shot|Metric| |Value| |Stderr|\n|-----|-----:|------|-|----:|-|-----:|\n",
    );
    for r in results {
        for (name, mean, stderr, higher) in &r.metrics {
            let arrow = if *higher { "↑" } else { "↓" };
            let stderr = if stderr.is_finite() {
                format!("{stderr:.4}")
            } else {
                "N/A".into()
            };
            out.push_str(&format!(
                "|{}|{}|{name}|{arrow}|{mean:.4}|±|{stderr}|\n",
                r.name, r.num_fewshot
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_the_sample_deviation_over_root_n() {
        let (mean, stderr) = mean_and_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(mean, 0.75);
        assert!((stderr - 0.25).abs() < 1e-12);
        assert!(mean_and_stderr(&[1.0]).1.is_nan());
    }

    #[test]
    fn exact_match_options() {
        let mut metric = crate::task::Metric {
            name: "exact_match".into(),
            higher_is_better: true,
            ignore_case: false,
            ignore_punctuation: false,
            regexes_to_ignore: vec![],
        };
        assert!(!exact_match("Blue.", "blue", &metric).unwrap());
        metric.ignore_case = true;
        metric.ignore_punctuation = true;
        assert!(exact_match("Blue.", "blue", &metric).unwrap());
        metric.regexes_to_ignore = vec!["^The answer is ".into()];
        assert!(exact_match("The answer is blue", "blue", &metric).unwrap());
    }
}
