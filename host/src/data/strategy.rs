//! Prompt strategies by `type:`: which plugin formats a dataset's rows, and how its answer
//! becomes text with trainable ranges. Every named type, axl's own included (the built-in
//! `prompt_strategies` plugin), is served by a plugin's `format_example`; rows of a dataset
//! without a type are pre-tokenized.

use serde_json::Value;

use super::chat::ChatStrategy;
use super::config::{DatasetConfig, DatasetType};
use super::error::{DataError, Result};
use super::example::{Formatted, TextExample};
use super::source::{kind_of, Row};
use crate::model::tokenizer::ModelTokenizer;
pub use axl_plugin_api::payload::{DatasetEntry, Formatted as PluginFormatted};

/// Dataset types that plugins provide (`format_example`), formatted row by row.
pub trait PluginFormat: Send + Sync {
    /// Whether a plugin provides `dataset_type`.
    fn provides(&self, dataset_type: &str) -> bool;
    /// Every dataset type the plugins provide, for messages.
    fn dataset_types(&self) -> Vec<String>;
    /// The answer for a row of `dataset` of the plugin that provides its type, which may
    /// use `tokenizer` through the host services; the error names the plugin.
    fn format(
        &self,
        dataset: &DatasetEntry,
        row: &serde_json::Map<String, Value>,
        tokenizer: &ModelTokenizer,
    ) -> std::result::Result<PluginFormatted, String>;
}

/// The plugins' dataset types, shared by the threads that format rows.
#[derive(Clone)]
pub struct PluginFormats(pub std::sync::Arc<dyn PluginFormat>);

impl PluginFormats {
    /// axl's built-in dataset types alone (no `plugins:`), for data prepared outside a run.
    pub fn builtin(train_on_inputs: bool) -> Result<Self> {
        crate::plugins::builtin_strategy_plugins(train_on_inputs)
            .map(|s| Self(std::sync::Arc::new(s)))
            .map_err(DataError::msg)
    }
}

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
    /// The plugins that provide dataset types.
    pub plugins: PluginFormats,
}

/// A prompt strategy.
#[derive(Debug)]
pub enum Strategy {
    /// Rows that already hold `input_ids` and `labels`.
    Pretokenized,
    /// A dataset type a plugin provides.
    Plugin {
        /// The entry, as the plugin sees it.
        dataset: DatasetEntry,
        /// The plugins.
        plugins: PluginFormats,
        /// The chat-template rendering of this entry, for a plugin that builds on it (the
        /// error only matters if one does).
        chat: std::result::Result<Box<ChatStrategy>, Box<DataError>>,
    },
}

/// The built-in types a plugin's `format_example` may build on ([`PluginFormatted::base`]).
const PLUGIN_BASES: &[&str] = &["chat_template"];

pub use axl_plugin_api::payload::USER_DEFINED_TYPE;

/// The message for a type no plugin provides, with the nearest provided name.
fn unknown_type(name: &str, plugins: &PluginFormats) -> DataError {
    let mut known = plugins.0.dataset_types();
    known.retain(|k| k != USER_DEFINED_TYPE);
    known.sort();
    known.dedup();
    let nearest = if name.contains(":load_") {
        Some(name.replace(":load_", ".load_"))
    } else {
        known
            .iter()
            .map(|k| (strsim::levenshtein(k, name), k))
            .filter(|(d, _)| *d <= 3)
            .min()
            .map(|(_, k)| k.clone())
    };
    let hint = match nearest {
        Some(n) => format!("; did you mean `{n}`?"),
        None => format!("; available: {}", known.join(", ")),
    };
    DataError::msg(format!("unknown prompt strategy `{name}`{hint}")).field("type")
}

/// A `datasets:` entry as JSON, with only the keys it sets.
pub fn entry_as_configured(ds: &DatasetConfig) -> Value {
    let mut config = serde_json::to_value(ds).unwrap_or_default();
    if let Value::Object(map) = &mut config {
        map.retain(|_, v| !v.is_null());
    }
    config
}

impl Strategy {
    /// The strategy of a dataset.
    pub fn for_dataset(ds: &DatasetConfig, ctx: &StrategyContext) -> Result<Self> {
        let name = match &ds.kind {
            None => return Ok(Self::Pretokenized),
            Some(DatasetType::Name(n)) if n.is_empty() => return Ok(Self::Pretokenized),
            Some(DatasetType::UserDefined(_)) => USER_DEFINED_TYPE,
            Some(DatasetType::Name(n)) => n.strip_prefix("axolotl.prompt_strategies.").unwrap_or(n),
        };
        if !ctx.plugins.0.provides(name) {
            return Err(unknown_type(name, &ctx.plugins));
        }
        let chat = ChatStrategy::new(ds, ctx).map(Box::new).map_err(Box::new);
        // A type named after a base (`chat_template`, `chat_template.load`) certainly renders
        // with it: its setup errors are the dataset's, before any row is read.
        let names_base = PLUGIN_BASES.iter().any(|base| {
            name.strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        });
        if let (true, Err(e)) = (names_base, &chat) {
            return Err(DataError::clone(e));
        }
        Ok(Self::Plugin {
            dataset: DatasetEntry {
                dataset_type: name.to_string(),
                config: entry_as_configured(ds),
            },
            plugins: ctx.plugins.clone(),
            chat,
        })
    }

    /// Formats one row into zero or more examples (`tokenizer` serves plugins' `tokenize`).
    pub fn format(&self, row: &Row, tokenizer: &ModelTokenizer) -> Result<Vec<Formatted>> {
        match self {
            Self::Plugin {
                dataset,
                plugins,
                chat,
            } => {
                let mut answer = plugins
                    .0
                    .format(dataset, &row.fields, tokenizer)
                    .map_err(|message| row.error(message))?;
                if answer.segments.is_empty() && answer.base.is_none() {
                    return Ok(Vec::new());
                }
                let fields =
                    (!answer.fields.is_empty()).then(|| std::mem::take(&mut answer.fields));
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
                        example.train_all = answer.train_all;
                        example.chunk = answer.chunk;
                        example
                    }
                    Some("chat_template") => match chat {
                        Ok(chat) => match chat.format(row)? {
                            Formatted::Text(example) => example,
                            Formatted::Tokens { .. } => {
                                return Err(row.error("a chat template made tokens, not text"))
                            }
                        },
                        Err(e) => return Err(DataError::clone(e)),
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
        fn dataset_types(&self) -> Vec<String> {
            vec!["fixed".into()]
        }
        fn format(
            &self,
            _: &DatasetEntry,
            _: &serde_json::Map<String, Value>,
            _: &ModelTokenizer,
        ) -> std::result::Result<PluginFormatted, String> {
            Ok(self.0.clone())
        }
    }

    fn formatted(answer: PluginFormatted) -> Result<TextExample> {
        let strategy = Strategy::Plugin {
            dataset: DatasetEntry::default(),
            plugins: PluginFormats(std::sync::Arc::new(Fixed(answer))),
            chat: Err(Box::new(DataError::msg("no chat template"))),
        };
        let row = Row {
            fields: Default::default(),
            file: std::sync::Arc::new("rows.jsonl".into()),
            location: super::super::error::Location::Line(1),
        };
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        let tokenizer = ModelTokenizer::load(&model).expect("the fixture tokenizer");
        match strategy.format(&row, &tokenizer)?.remove(0) {
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
