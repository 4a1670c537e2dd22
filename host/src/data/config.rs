//! One entry of `datasets:` (and `test_datasets:`), with Axolotl's keys and defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One string or a list of strings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum StringOrList {
    /// A single string.
    One(String),
    /// A list.
    Many(Vec<String>),
}

impl StringOrList {
    /// The strings.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// A prompt format written inline in the configuration (Axolotl's user-defined type).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct UserDefinedPrompt {
    /// Used when a row has no system field.
    pub system_prompt: Option<String>,
    /// Wraps the system text; `{system}` is replaced.
    pub system_format: Option<String>,
    /// Field with the system text.
    pub field_system: Option<String>,
    /// Field with the instruction.
    pub field_instruction: Option<String>,
    /// Field with the input.
    pub field_input: Option<String>,
    /// Field with the response.
    pub field_output: Option<String>,
    /// The prompt when the row has an input; `{instruction}` and `{input}` are replaced.
    pub format: Option<String>,
    /// The prompt when the row has no input; `{instruction}` is replaced.
    pub no_input_format: Option<String>,
}

/// The `type:` of a dataset: a strategy name, or an inline prompt format.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum DatasetType {
    /// A named strategy (`alpaca`, `chat_template`, `completion`, ...).
    Name(String),
    /// An inline prompt format.
    UserDefined(UserDefinedPrompt),
}

/// Which end-of-sequence / end-of-turn tokens are trained.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TrainOnEnd {
    /// Every one in the conversation.
    All,
    /// The one closing each trained turn.
    Turn,
    /// Only the last one of the conversation.
    Last,
    /// None.
    None,
}

/// One dataset.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// A local file, directory or glob, or a Hub dataset id.
    pub path: Option<String>,
    /// The split to read (`train` by default).
    pub split: Option<String>,
    /// How rows become text.
    #[serde(rename = "type")]
    pub kind: Option<DatasetType>,
    /// Split the rows into this many contiguous shards...
    pub shards: Option<usize>,
    /// ...and keep this one.
    pub shards_idx: Option<usize>,
    /// Preprocess in this many sequential chunks (memory only; the result is the same).
    pub preprocess_shards: Option<usize>,
    /// The style of `alpaca_chat` (`chat` by default).
    pub conversation: Option<String>,
    /// Chat template of this dataset (overrides the top-level one).
    pub chat_template: Option<String>,
    /// Jinja text or file for `chat_template: jinja`.
    pub chat_template_jinja: Option<String>,
    /// Files of the dataset, relative to `path` for Hub datasets.
    pub data_files: Option<StringOrList>,
    /// Name of the dataset configuration (Hub datasets).
    pub name: Option<String>,
    /// File format when the extension does not tell (`json`, `csv`, `parquet`, `text`).
    pub ds_type: Option<String>,
    /// `completion`: the text field (`text` by default).
    pub field: Option<String>,
    /// `chat_template`: the field with the messages (`messages` by default).
    pub field_messages: Option<String>,
    /// `chat_template`: the field with the tools (`tools` by default).
    pub field_tools: Option<String>,
    /// `chat_template`: the field of a message with its reasoning (`reasoning_content`).
    pub field_thinking: Option<String>,
    /// `chat_template`: the key the template expects the reasoning under.
    pub template_thinking_key: Option<String>,
    /// Legacy name of the role property.
    pub message_field_role: Option<String>,
    /// Legacy name of the content property.
    pub message_field_content: Option<String>,
    /// Template property → message field (`{role: role, content: content}` by default).
    pub message_property_mappings: Option<BTreeMap<String, String>>,
    /// A message field saying whether to train on that message.
    pub message_field_training: Option<String>,
    /// A message field listing character ranges of the content to train or not.
    pub message_field_training_detail: Option<String>,
    /// Split `<think>…</think>` out of assistant content into the reasoning field.
    pub split_thinking: Option<bool>,
    /// Roles whose messages are trained (`assistant` by default).
    pub roles_to_train: Option<Vec<String>>,
    /// Which end-of-sequence tokens are trained (`turn` by default).
    pub train_on_eos: Option<TrainOnEnd>,
    /// Which end-of-turn tokens are trained (as `train_on_eos` by default).
    pub train_on_eot: Option<TrainOnEnd>,
    /// Target role → the dataset's role names.
    pub roles: Option<BTreeMap<String, Vec<String>>>,
    /// Drop system messages.
    pub drop_system_message: Option<bool>,
    /// Tokens that end a turn (the tokenizer's EOS by default).
    pub eot_tokens: Option<Vec<String>>,
    /// Accepted for compatibility; remote code is never run.
    pub trust_remote_code: Option<bool>,
    /// Hub revision.
    pub revision: Option<String>,
    /// `pretraining_dataset`: the text field (`text` by default).
    pub text_column: Option<String>,
    /// `pretraining_dataset`: rows to skip at the start.
    pub skip: Option<usize>,
    /// Knowledge-distillation field of teacher log-probabilities (read by the kd plugin).
    pub logprobs_field: Option<String>,
    /// Teacher sampling temperature (read by the kd plugin).
    pub temperature: Option<f64>,
}

/// The keys of a dataset entry.
pub const DATASET_KEYS: &[&str] = &[
    "path",
    "split",
    "type",
    "shards",
    "shards_idx",
    "preprocess_shards",
    "conversation",
    "chat_template",
    "chat_template_jinja",
    "data_files",
    "name",
    "ds_type",
    "field",
    "field_messages",
    "field_tools",
    "field_thinking",
    "template_thinking_key",
    "message_field_role",
    "message_field_content",
    "message_property_mappings",
    "message_field_training",
    "message_field_training_detail",
    "split_thinking",
    "roles_to_train",
    "train_on_eos",
    "train_on_eot",
    "roles",
    "drop_system_message",
    "eot_tokens",
    "trust_remote_code",
    "revision",
    "text_column",
    "skip",
    "logprobs_field",
    "temperature",
];

/// Axolotl dataset keys axl does not implement.
pub const UNIMPLEMENTED_DATASET_KEYS: &[(&str, &str)] = &[
    ("input_transform", "input transforms are not implemented"),
    ("input_format", "input formats are not implemented"),
    (
        "field_human",
        "field_human is not implemented; use chat_template with roles",
    ),
    (
        "field_model",
        "field_model is not implemented; use chat_template with roles",
    ),
];

impl DatasetConfig {
    /// The type name, if the type is a name.
    pub fn type_name(&self) -> Option<&str> {
        match &self.kind {
            Some(DatasetType::Name(n)) if !n.is_empty() => Some(n),
            _ => None,
        }
    }

    /// The split to read.
    pub fn split(&self) -> &str {
        self.split.as_deref().unwrap_or("train")
    }
}
