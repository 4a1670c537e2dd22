//! What hooks receive and return, and what host services take and give: plain serde types,
//! so that every transport can carry them (in the process, through a native library's JSON
//! channel, or into a WebAssembly component).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hooks::Hook;

/// A dataset row: column name to value.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// A short name of a JSON value's kind (`a string`, `a list`, ...), for messages about rows.
pub fn kind_of(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The run as `configure`, `load_datasets` and plugin commands see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    /// The command being run (`train`, `preprocess`, `evaluate`, `inference`, or a plugin's
    /// own).
    pub command: String,
    /// The whole configuration, validated, as JSON (YAML keys as written, overrides applied).
    pub config: serde_json::Value,
    /// The configuration file.
    pub config_path: String,
    /// The run's `output_dir`.
    pub output_dir: String,
}

/// The dataset type the host gives an entry whose `type:` is a mapping (an inline prompt
/// format), as Axolotl names it.
pub const USER_DEFINED_TYPE: &str = "user_defined";

/// The `datasets:` entry a row comes from, as `format_example` sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetEntry {
    /// Its `type:` (without an `axolotl.prompt_strategies.` prefix; [`USER_DEFINED_TYPE`]
    /// when `type:` is a mapping).
    pub dataset_type: String,
    /// The entry as configured (`path`, `type`, `field_messages`, the plugin's own keys ...).
    #[serde(default)]
    pub config: serde_json::Value,
}

/// What `format_example` makes of a row: text pieces, each trained or not. An answer with
/// no segments (and no `base`) makes no example: the row is skipped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Formatted {
    /// The pieces, concatenated in order to form the example's text.
    pub segments: Vec<Segment>,
    /// Let the tokenizer add its special tokens (BOS), as `tokenizer(text)` does in Python.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// Append the tokenizer's EOS token (trained when the last segment is).
    #[serde(default = "yes")]
    pub append_eos: bool,
    /// Train on every token, the special ones (BOS) included, as `train_on_inputs` does.
    #[serde(default)]
    pub train_all: bool,
    /// Cut the tokens into consecutive examples of `sequence_len` instead of leaving one long
    /// example to `excess_length_strategy` (as `completion` does).
    #[serde(default)]
    pub chunk: bool,
    /// Format the row with this built-in dataset type instead (`chat_template`), with the
    /// entry's own settings; `segments` and the two flags above are then unused.
    #[serde(default)]
    pub base: Option<String>,
    /// Values kept with the tokenized example and handed to `compute_loss`
    /// ([`LossBatch::examples`]), such as a teacher's log-probabilities.
    #[serde(default)]
    pub fields: Row,
}

fn yes() -> bool {
    true
}

/// A piece of an example's text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Whether the model is trained to produce it.
    pub train: bool,
}

impl Formatted {
    /// An example of `(text, trained)` pieces, with BOS and EOS added.
    pub fn from_pieces<'a>(pieces: impl IntoIterator<Item = (&'a str, bool)>) -> Self {
        Self {
            segments: pieces
                .into_iter()
                .map(|(text, train)| Segment {
                    text: text.to_string(),
                    train,
                })
                .collect(),
            add_special_tokens: true,
            append_eos: true,
            train_all: false,
            chunk: false,
            base: None,
            fields: Row::new(),
        }
    }

    /// No example: the row is skipped.
    pub fn nothing() -> Self {
        Self::default()
    }

    /// The row formatted by the built-in dataset type `base`, with `fields` kept beside it.
    pub fn built_in(base: &str, fields: Row) -> Self {
        Self {
            segments: Vec::new(),
            add_special_tokens: true,
            append_eos: true,
            train_all: false,
            chunk: false,
            base: Some(base.to_string()),
            fields,
        }
    }
}

/// One parameter of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterInfo {
    /// Its name as in the safetensors file (`model.layers.0.self_attn.q_proj.weight`, LoRA
    /// parameters with PEFT's names).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it.
    pub trainable: bool,
}

/// The model as the model hooks see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `model_type` of `config.json` (`llama`, `qwen2`, ...).
    pub model_type: String,
    /// The model's `config.json`.
    pub config: serde_json::Value,
    /// Its parameters, in load order (empty before the weights are loaded).
    pub parameters: Vec<ParameterInfo>,
}

/// `pre_model_load`'s answer: kernel and attention choices, by name (`rms_norm: fused`).
pub type KernelChoices = BTreeMap<String, serde_json::Value>;

/// `post_model_load`'s answer: parameter name to whether it trains. Parameters not named
/// keep their state.
pub type TrainablePolicy = BTreeMap<String, bool>;

/// What `create_optimizer` is told.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerContext {
    /// The configured `optimizer`.
    pub optimizer: String,
    /// The configured `learning_rate`.
    pub learning_rate: f64,
    /// The configured `weight_decay`.
    pub weight_decay: f64,
    /// The parameters that train.
    pub parameters: Vec<ParameterInfo>,
}

/// The optimizer a plugin asks for: one the host implements, with its settings and
/// parameter groups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSpec {
    /// An optimizer name the config's `optimizer:` accepts (`adamw_torch`, `sgd`, `lion_pytorch`,
    /// `adafactor`, ...).
    pub optimizer: String,
    /// Replaces `weight_decay` for parameters in no group.
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Replaces `adam_beta1`.
    #[serde(default)]
    pub beta1: Option<f64>,
    /// Replaces `adam_beta2`.
    #[serde(default)]
    pub beta2: Option<f64>,
    /// Replaces `adam_epsilon`.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// Groups of parameters with their own settings; a parameter takes the first group that
    /// names it.
    #[serde(default)]
    pub groups: Vec<ParameterGroup>,
}

/// Parameters that share settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParameterGroup {
    /// Parameter names; a name ending in `*` matches every parameter it prefixes.
    pub parameters: Vec<String>,
    /// Multiplies the scheduled learning rate.
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// The group's weight decay.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl ParameterGroup {
    /// Whether the group names `parameter`.
    pub fn contains(&self, parameter: &str) -> bool {
        self.parameters.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => parameter.starts_with(prefix),
            None => p == parameter,
        })
    }
}

/// What `lr_schedule` is told, every optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleContext {
    /// The optimizer step about to be taken, from 0.
    pub step: u64,
    /// Optimizer steps in the run.
    pub total_steps: u64,
    /// The configured `learning_rate`.
    pub learning_rate: f64,
    /// What the configured scheduler gives for this step.
    pub scheduled: f64,
}

/// The batch `compute_loss` scores, beside the logits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossBatch {
    /// Token ids, `[rows, len]` row-major.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (−100 where not trained), as in transformers: the
    /// logits at position `t` predict the label at `t + 1`.
    pub labels: Vec<i64>,
    /// Rows in the batch.
    pub rows: usize,
    /// Positions per row.
    pub len: usize,
    /// What the summed per-token loss is divided by: the trained tokens of the whole
    /// optimizer step, so that the loss does not depend on how the step is split into
    /// micro-batches. The gradient must be of the divided loss.
    pub normalizer: f64,
    /// The examples in the batch: where each lies and the fields its `format_example` kept.
    #[serde(default)]
    pub examples: Vec<ExampleSpan>,
}

/// Where one example lies in a [`LossBatch`] (several share a row when packed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExampleSpan {
    /// The row.
    pub row: usize,
    /// Its first position in the row.
    pub start: usize,
    /// Its tokens.
    pub len: usize,
    /// What `format_example` kept with it ([`Formatted::fields`]); empty for other types.
    #[serde(default)]
    pub fields: Row,
}

/// Where the run is, for loop events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub global_step: u64,
    /// Optimizer steps in the run.
    pub max_steps: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
}

/// A loop event (`on_train_begin`, `on_step_end`, `on_log`, `on_evaluate`, `on_save`,
/// `on_train_end`, `post_train`, `on_error`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Which event.
    pub hook: Hook,
    /// Where the run is.
    pub state: TrainState,
    /// The metrics of the event: the logged values for `on_log` (`loss`, `grad_norm`,
    /// `learning_rate`), the evaluation's for `on_evaluate` (`eval_loss`), else empty.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The checkpoint written, for `on_save`; the final output for `post_train`.
    #[serde(default)]
    pub dir: Option<String>,
    /// For `on_error`: what went wrong.
    #[serde(default)]
    pub message: Option<String>,
}

/// What a loop event may ask of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// End training after this step (the final save still happens).
    #[serde(default)]
    pub stop_training: bool,
}

/// Completions to score with a reward function.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardBatch {
    /// The prompts, one per completion.
    pub prompts: Vec<String>,
    /// The completions.
    pub completions: Vec<String>,
    /// Each completion's dataset row (answers, tests, ...).
    #[serde(default)]
    pub fields: Vec<Row>,
}

/// A plugin subcommand's invocation (`axl lm-eval config.yml --tasks x`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandCall {
    /// The subcommand.
    pub name: String,
    /// Its arguments, after the subcommand's name.
    pub args: Vec<String>,
}

/// How serious a log line is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Detail for debugging.
    Debug,
    /// Progress.
    #[default]
    Info,
    /// Something the user should look at.
    Warn,
    /// Something failed.
    Error,
}

/// A log-likelihood question: how likely is `continuation` after `context`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// The text before.
    pub context: String,
    /// The text scored.
    pub continuation: String,
    /// The context as token ids, used instead of tokenizing `context` (which adds the
    /// tokenizer's special tokens) when given with `continuation_ids`.
    #[serde(default)]
    pub context_ids: Option<Vec<u32>>,
    /// The continuation as token ids (see `context_ids`).
    #[serde(default)]
    pub continuation_ids: Option<Vec<u32>>,
}

/// The answer to a [`ScoreRequest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Sum of the continuation tokens' log-probabilities (natural log).
    pub log_likelihood: f64,
    /// Whether every continuation token was the model's most likely one.
    pub greedy: bool,
}

/// Text to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt, as given to the tokenizer.
    pub prompt: String,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Generation ends before the first of these strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// The prompt as token ids, used instead of tokenizing `prompt` (which adds the
    /// tokenizer's special tokens).
    #[serde(default)]
    pub prompt_ids: Option<Vec<u32>>,
}

/// An HTTP request a plugin asks the host to make (TLS and proxies are the host's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// `GET`, `POST`, `PUT`, ...
    pub method: String,
    /// An `http://` or `https://` URL.
    pub url: String,
    /// Header names and values.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    #[serde(default)]
    pub body: Option<String>,
}

/// The answer to an [`HttpRequest`] (any status, 4xx and 5xx included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    #[serde(default)]
    pub body: String,
}
