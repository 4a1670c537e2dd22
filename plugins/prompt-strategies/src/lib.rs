//! The `prompt_strategies` plugin: axl's built-in dataset `type:`s, served through the
//! `format_example` hook exactly as a third-party plugin's types are. The host loads it for
//! every run, after the config's `plugins:`, so a listed plugin that provides one of these
//! names formats it instead.
//!
//! | type | what a row becomes |
//! |---|---|
//! | the alpaca family, `orcamini`, `context_qa.*`, an inline format ([`instruct`]) | a prompt (trained only with `train_on_inputs`), then the response and EOS, trained |
//! | `completion` | the text of the entry's `field` (default `text`), every token trained, cut into `sequence_len` pieces; an empty text is skipped |
//! | `input_output` | the row's `segments`, each `{text, label}` trained when `label` (or `train_on_inputs`), with no BOS or EOS added |
//! | `chat_template` (`.default`, `.load`) | the conversation rendered by the host's chat-template engine with the entry's settings |
//!
//! Names may also be written with Axolotl's `axolotl.prompt_strategies.` prefix; the host
//! removes it.

pub mod fields;
pub mod instruct;

use axl_sdk::prelude::*;
use serde_json::Value;

use fields::{field_error, required_text, text_of};
use instruct::InstructStrategy;

/// The chat-template types: rendered by the host's engine ([`Formatted::built_in`]).
pub const CHAT_TYPES: &[&str] = &[
    "chat_template",
    "chat_template.default",
    "chat_template.load",
];

/// Every type the plugin provides.
pub fn dataset_types() -> Vec<String> {
    instruct::TYPES
        .iter()
        .chain(CHAT_TYPES)
        .chain(&["completion", "input_output"])
        .map(|s| s.to_string())
        .collect()
}

/// The plugin.
#[derive(Debug, Default)]
pub struct PromptStrategiesPlugin {
    train_on_inputs: bool,
    /// The instruction strategy of the entry formatted last (rows come dataset by dataset).
    last: Option<(DatasetEntry, InstructStrategy)>,
}

impl PromptStrategiesPlugin {
    fn instruct(
        &mut self,
        dataset: &DatasetEntry,
    ) -> Option<Result<&InstructStrategy, PluginError>> {
        let cached = self
            .last
            .as_ref()
            .is_some_and(|(entry, _)| entry == dataset);
        if !cached {
            let made = match InstructStrategy::for_entry(dataset, self.train_on_inputs)? {
                Ok(made) => made,
                Err((key, e)) => {
                    return Some(Err(PluginError::new(format!("the entry's `{key}`: {e}"))))
                }
            };
            self.last = Some((dataset.clone(), made));
        }
        self.last.as_ref().map(|(_, s)| Ok(s))
    }
}

/// Raw text trained in full, with BOS and EOS, cut into `sequence_len` pieces (nothing for
/// empty text).
pub fn completion(text: &str) -> Formatted {
    if text.is_empty() {
        return Formatted::nothing();
    }
    let mut example = Formatted::from_pieces([(text, true)]);
    example.train_all = true;
    example.chunk = true;
    example
}

/// The `segments` of an `input_output` row, each trained when its `label` is true (or with
/// `train_on_inputs`); the text is taken as written, without BOS or EOS.
pub fn input_output(row: &Row, train_on_inputs: bool) -> Result<Formatted, PluginError> {
    let segments = match row.get("segments") {
        Some(Value::Array(s)) => s,
        Some(other) => {
            return Err(field_error(
                "segments",
                format!("expected a list, found {}", kind_of(other)),
            ))
        }
        None => return Err(field_error("segments", "missing")),
    };
    let mut pieces = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let at = |key: &str| format!("segments[{i}].{key}");
        let text = match segment.get("text") {
            Some(v) => text_of(&at("text"), v)?,
            None => return Err(field_error(&at("text"), "missing")),
        };
        let label = match segment.get("label") {
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(field_error(
                    &at("label"),
                    format!("expected true or false, found {}", kind_of(other)),
                ))
            }
            None => return Err(field_error(&at("label"), "missing")),
        };
        pieces.push(Segment {
            text,
            train: label || train_on_inputs,
        });
    }
    if pieces.is_empty() {
        // An empty example, counted with those too short, rather than a skipped row.
        pieces.push(Segment::default());
    }
    Ok(Formatted {
        segments: pieces,
        add_special_tokens: false,
        append_eos: false,
        ..Formatted::nothing()
    })
}

/// What is wrong with the instruction-strategy settings of the config's dataset entries
/// (`datasets`, `test_datasets`, `pretraining_dataset`), each naming its entry, so that a bad
/// `conversation:` or inline format stops the run before any row is read.
pub fn entry_problems(config: &Value, train_on_inputs: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for list in ["datasets", "test_datasets", "pretraining_dataset"] {
        let Some(entries) = config.get(list).and_then(Value::as_array) else {
            continue;
        };
        for (i, entry) in entries.iter().enumerate() {
            let dataset_type = match entry.get("type") {
                Some(Value::String(name)) => name
                    .strip_prefix("axolotl.prompt_strategies.")
                    .unwrap_or(name)
                    .to_string(),
                Some(Value::Object(_)) => USER_DEFINED_TYPE.to_string(),
                _ => continue,
            };
            let dataset = DatasetEntry {
                dataset_type,
                config: entry.clone(),
            };
            if let Some(Err((key, e))) = InstructStrategy::for_entry(&dataset, train_on_inputs) {
                problems.push(format!("{list}[{i}].{key}: {e}"));
            }
        }
    }
    problems
}

impl Plugin for PromptStrategiesPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "prompt_strategies",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::FormatExample],
        );
        manifest.description =
            "the built-in dataset types: alpaca family, inline formats, completion, input_output, chat_template"
                .into();
        manifest.provides.strategies = dataset_types();
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        self.train_on_inputs = run
            .config
            .get("train_on_inputs")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        self.last = None;
        let problems = entry_problems(&run.config, self.train_on_inputs);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PluginError::new(problems.join("; ")))
        }
    }

    fn format_example(
        &mut self,
        dataset: &DatasetEntry,
        row: &Row,
        _host: &mut dyn Host,
    ) -> Result<Formatted, PluginError> {
        let name = dataset.dataset_type.as_str();
        if CHAT_TYPES.contains(&name) {
            return Ok(Formatted::built_in("chat_template", Row::new()));
        }
        match name {
            "completion" => {
                let field = dataset
                    .config
                    .get("field")
                    .and_then(Value::as_str)
                    .unwrap_or("text");
                return Ok(completion(&required_text(row, field)?));
            }
            "input_output" => return input_output(row, self.train_on_inputs),
            _ => {}
        }
        match self.instruct(dataset) {
            Some(strategy) => strategy?.format(row),
            None => Err(PluginError::new(format!(
                "`{name}` is not a dataset type of this plugin"
            ))),
        }
    }
}

axl_plugin_api::register_builtin!(PromptStrategiesPlugin, "prompt_strategies");

#[cfg(test)]
mod tests;
