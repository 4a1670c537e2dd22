//! Prompt strategies by `type:`: which one a dataset uses, and how it formats a row.

use serde_json::Value;

use super::chat::ChatStrategy;
use super::config::{DatasetConfig, DatasetType};
use super::error::{DataError, Result};
use super::example::{Formatted, TextExample};
use super::instruct::{kind_of, text_of, InstructStrategy};
use super::source::Row;
use crate::model::tokenizer::ModelTokenizer;
pub use axl_plugin_api::payload::{DatasetEntry, Formatted as PluginFormatted};

/// Dataset types that plugins provide (`format_example`), formatted row by row.
pub trait PluginFormat: Send + Sync {
    /// Whether a plugin provides `dataset_type`.
    fn provides(&self, dataset_type: &str) -> bool;
    /// The plugin's answer for a row of `dataset`; the error names the plugin.
    fn format(
        &self,
        dataset: &DatasetEntry,
        row: &serde_json::Map<String, Value>,
    ) -> std::result::Result<PluginFormatted, String>;
}

/// The plugins' dataset types, shared by the threads that format rows.
#[derive(Clone)]
pub struct PluginFormats(pub std::sync::Arc<dyn PluginFormat>);

impl std::fmt::Debug for PluginFormats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginFormats")
    }
}

/// What strategies need from the rest of the configuration.
#[derive(Clone)]
pub struct StrategyContext<'a> {
    /// `train_on_inputs`.
    pub train_on_inputs: bool,
    /// The top-level `chat_template`.
    pub chat_template: Option<&'a str>,
    /// The top-level `chat_template_jinja`.
    pub chat_template_jinja: Option<&'a str>,
    /// The top-level `eot_tokens`.
    pub eot_tokens: Option<&'a [String]>,
    /// Extra variables for chat template renderings.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Where relative template paths are resolved.
    pub base_dir: &'a std::path::Path,
    /// The tokenizer (for its chat template and special tokens).
    pub tokenizer: &'a ModelTokenizer,
    /// Dataset types plugins provide.
    pub plugins: Option<&'a PluginFormats>,
}

/// A prompt strategy.
#[derive(Debug)]
pub enum Strategy {
    /// Instruction, input, response (the alpaca family and inline formats).
    Instruct(InstructStrategy),
    /// Raw text, trained in full, cut into `sequence_len` pieces.
    Completion {
        /// The text field.
        field: String,
    },
    /// Segments of text, each trained or not.
    InputOutput {
        /// Train on every segment.
        train_on_inputs: bool,
    },
    /// Rows that already hold `input_ids` and `labels`.
    Pretokenized,
    /// Conversations rendered with a chat template.
    Chat(Box<ChatStrategy>),
    /// A dataset type a plugin provides.
    Plugin {
        /// The entry, as the plugin sees it.
        dataset: DatasetEntry,
        /// The plugins.
        plugins: PluginFormats,
        /// The chat-template rendering of this entry, for a plugin that builds on it (the
        /// error only matters if one does).
        chat: std::result::Result<Box<ChatStrategy>, DataError>,
    },
}

/// The built-in types a plugin's `format_example` may build on ([`PluginFormatted::base`]).
const PLUGIN_BASES: &[&str] = &["chat_template"];

/// The type names axl implements, for error messages.
pub const KNOWN_TYPES: &[&str] = &[
    "alpaca",
    "alpaca:chat",
    "alpaca:chatml",
    "alpaca:phi",
    "alpaca_instruct",
    "alpaca_chat",
    "alpaca_chat.load_qa",
    "alpaca_chat.load_concise",
    "alpaca_chat.load_camel_ai",
    "alpaca_w_system",
    "alpaca_w_system.load_instruct",
    "alpaca_w_system.load_open_orca",
    "orcamini",
    "context_qa",
    "chat_template",
    "completion",
    "input_output",
];

/// Raw text trained in full, with the tokenizer's special tokens and EOS, cut into
/// `sequence_len` pieces (nothing for empty text).
pub fn completion(text: &str) -> Option<Formatted> {
    if text.is_empty() {
        return None;
    }
    let mut example = TextExample::from_pieces(&[(text, true)]);
    example.add_special_tokens = true;
    example.append_eos = Some(true);
    example.train_all = true;
    example.chunk = true;
    Some(Formatted::Text(example))
}

impl Strategy {
    /// The strategy of a dataset.
    pub fn for_dataset(ds: &DatasetConfig, ctx: &StrategyContext) -> Result<Self> {
        let name = match &ds.kind {
            None => return Ok(Self::Pretokenized),
            Some(DatasetType::UserDefined(p)) => {
                return Ok(Self::Instruct(InstructStrategy::user_defined(
                    p,
                    ctx.train_on_inputs,
                )))
            }
            Some(DatasetType::Name(n)) if n.is_empty() => return Ok(Self::Pretokenized),
            Some(DatasetType::Name(n)) => n.as_str(),
        };
        let name = name
            .strip_prefix("axolotl.prompt_strategies.")
            .unwrap_or(name);
        match name {
            "completion" => {
                return Ok(Self::Completion {
                    field: ds.field.clone().unwrap_or_else(|| "text".into()),
                })
            }
            "input_output" => {
                return Ok(Self::InputOutput {
                    train_on_inputs: ctx.train_on_inputs,
                })
            }
            "chat_template" | "chat_template.default" | "chat_template.load" => {
                return Ok(Self::Chat(Box::new(ChatStrategy::new(ds, ctx)?)))
            }
            _ => {}
        }
        if let Some(plugins) = ctx.plugins.filter(|p| p.0.provides(name)) {
            return Ok(Self::Plugin {
                dataset: DatasetEntry {
                    dataset_type: name.to_string(),
                    config: serde_json::to_value(ds).unwrap_or_default(),
                },
                plugins: plugins.clone(),
                chat: ChatStrategy::new(ds, ctx).map(Box::new),
            });
        }
        if let Some(made) =
            InstructStrategy::by_name(name, ds.conversation.as_deref(), ctx.train_on_inputs)
        {
            return made
                .map(Self::Instruct)
                .map_err(|e| DataError::msg(e).field("type"));
        }
        let hint = if name.contains(":load_") {
            format!("; did you mean `{}`?", name.replace(":load_", ".load_"))
        } else {
            format!("; implemented: {}", KNOWN_TYPES.join(", "))
        };
        Err(DataError::msg(format!("unknown prompt strategy `{name}`{hint}")).field("type"))
    }

    /// Formats one row into zero or more examples.
    pub fn format(&self, row: &Row) -> Result<Vec<Formatted>> {
        match self {
            Self::Instruct(s) => s.format(row).map(|f| vec![f]),
            Self::Plugin {
                dataset,
                plugins,
                chat,
            } => {
                let answer = plugins
                    .0
                    .format(dataset, &row.fields)
                    .map_err(|message| row.error(message))?;
                let fields = (!answer.fields.is_empty()).then(|| answer.fields.clone());
                let mut example = match answer.base.as_deref() {
                    None => {
                        let pieces: Vec<(&str, bool)> = answer
                            .segments
                            .iter()
                            .map(|s| (s.text.as_str(), s.train))
                            .collect();
                        let mut example = TextExample::from_pieces(&pieces);
                        example.add_special_tokens = answer.add_special_tokens;
                        let last_trained = answer.segments.last().is_some_and(|s| s.train);
                        example.append_eos = answer.append_eos.then_some(last_trained);
                        example
                    }
                    Some("chat_template") => match chat {
                        Ok(chat) => match chat.format(row)? {
                            Formatted::Text(example) => example,
                            Formatted::Tokens { .. } => {
                                return Err(row.error("a chat template made tokens, not text"))
                            }
                        },
                        Err(e) => return Err(e.clone()),
                    },
                    Some(other) => {
                        return Err(row.error(format!(
                            "the plugin for `{}` builds on `{other}`, which is not a built-in type a plugin can build on ({})",
                            dataset.dataset_type,
                            PLUGIN_BASES.join(", ")
                        )))
                    }
                };
                example.fields = fields;
                Ok(vec![Formatted::Text(example)])
            }
            Self::Completion { field } => {
                let text = match row.fields.get(field) {
                    Some(v) => text_of(row, field, v)?,
                    None => return Err(row.field_error(field, "missing")),
                };
                Ok(completion(&text).into_iter().collect())
            }
            Self::InputOutput { train_on_inputs } => {
                let segments = match row.fields.get("segments") {
                    Some(Value::Array(s)) => s,
                    Some(other) => {
                        return Err(row.field_error(
                            "segments",
                            format!("expected a list, found {}", kind_of(other)),
                        ))
                    }
                    None => return Err(row.field_error("segments", "missing")),
                };
                let mut pieces = Vec::with_capacity(segments.len());
                for (i, segment) in segments.iter().enumerate() {
                    let at = |key: &str| format!("segments[{i}].{key}");
                    let text = match segment.get("text") {
                        Some(v) => text_of(row, &at("text"), v)?,
                        None => return Err(row.field_error(&at("text"), "missing")),
                    };
                    let label = match segment.get("label") {
                        Some(Value::Bool(b)) => *b,
                        Some(other) => {
                            return Err(row.field_error(
                                &at("label"),
                                format!("expected true or false, found {}", kind_of(other)),
                            ))
                        }
                        None => return Err(row.field_error(&at("label"), "missing")),
                    };
                    pieces.push((text, label || *train_on_inputs));
                }
                let borrowed: Vec<(&str, bool)> =
                    pieces.iter().map(|(t, l)| (t.as_str(), *l)).collect();
                Ok(vec![Formatted::Text(TextExample::from_pieces(&borrowed))])
            }
            Self::Pretokenized => {
                let ids = |key: &str| -> Result<Vec<i64>> {
                    match row.fields.get(key) {
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|v| v.as_i64())
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| row.field_error(key, "expected a list of integers")),
                        Some(other) => Err(row.field_error(key, format!("expected a list of integers, found {}", kind_of(other)))),
                        None => Err(row.field_error(
                            key,
                            "missing (a dataset without `type:` must be pre-tokenized: input_ids and labels)",
                        )),
                    }
                };
                let input_ids = ids("input_ids")?;
                let labels = ids("labels")?;
                if input_ids.iter().any(|&i| i < 0 || i > u32::MAX as i64) {
                    return Err(row.field_error("input_ids", "token ids must be non-negative"));
                }
                if input_ids.len() != labels.len() {
                    return Err(row.field_error(
                        "labels",
                        format!(
                            "has {} entries but input_ids has {}",
                            labels.len(),
                            input_ids.len()
                        ),
                    ));
                }
                Ok(vec![Formatted::Tokens {
                    input_ids: input_ids.into_iter().map(|i| i as u32).collect(),
                    labels,
                }])
            }
            Self::Chat(s) => s.format(row).map(|f| vec![f]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axl_plugin_api::payload::Segment;

    /// A plugin that answers every row with the same pieces.
    struct Fixed(PluginFormatted);

    impl PluginFormat for Fixed {
        fn provides(&self, _: &str) -> bool {
            true
        }
        fn format(
            &self,
            _: &DatasetEntry,
            _: &serde_json::Map<String, Value>,
        ) -> std::result::Result<PluginFormatted, String> {
            Ok(self.0.clone())
        }
    }

    fn formatted(answer: PluginFormatted) -> Result<TextExample> {
        let strategy = Strategy::Plugin {
            dataset: DatasetEntry::default(),
            plugins: PluginFormats(std::sync::Arc::new(Fixed(answer))),
            chat: Err(DataError::msg("no chat template")),
        };
        let row = Row {
            fields: Default::default(),
            file: std::sync::Arc::new("rows.jsonl".into()),
            location: super::super::error::Location::Line(1),
        };
        match strategy.format(&row)?.remove(0) {
            Formatted::Text(t) => Ok(t),
            Formatted::Tokens { .. } => panic!("text expected"),
        }
    }

    #[test]
    fn a_plugins_eos_is_appended_only_when_asked_and_trained_with_the_last_piece() {
        let segment = |text: &str, train| Segment {
            text: text.into(),
            train,
        };
        let mut answer = PluginFormatted::from_pieces([("Q: ", false), ("A", true)]);
        assert_eq!(formatted(answer.clone()).unwrap().append_eos, Some(true));
        answer.segments.push(segment(" (end)", false));
        assert_eq!(formatted(answer.clone()).unwrap().append_eos, Some(false));
        answer.append_eos = false;
        assert_eq!(formatted(answer.clone()).unwrap().append_eos, None);
        answer.base = Some("chat_template".into());
        let err = formatted(answer.clone()).unwrap_err();
        assert!(err.to_string().contains("no chat template"), "{err}");
        answer.base = Some("alpaca".into());
        let err = formatted(answer).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a built-in type a plugin can build on"),
            "{err}"
        );
    }
}
