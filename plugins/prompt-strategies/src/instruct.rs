//! Instruction strategies: a prompt built from instruction, input and (optional) system
//! fields, followed by the response. The prompt is masked unless `train_on_inputs`; the
//! response and the EOS appended after it are trained. Covers `alpaca` and its styles,
//! `alpaca_chat.*`, `alpaca_instruct.*`, `alpaca_w_system.*`, `orcamini`, `context_qa.*` and
//! inline (user-defined) prompt formats, with Axolotl's exact prompt texts.

use axl_sdk::prelude::*;
use serde_json::Value;

use crate::fields::{field_error, text_of};

const ALPACA_SYSTEM: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";
const ALPACA_SYSTEM_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
const CONCISE_SYSTEM: &str = "Below is an instruction from a USER that describes a task, paired with an input that provides further context. The ASSISTANT writes a response that concisely and appropriately completes the request.\n\n";
const CONCISE_SYSTEM_NO_INPUT: &str = "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that appropriately and concisely completes the request.\n\n";
const CONTEXT_QA_SYSTEM: &str =
    "Use the following contextual information to concisely answer the question.\n";
/// The instruction strategies' type names.
pub const TYPES: &[&str] = &[
    "alpaca",
    "alpaca:instruct",
    "alpaca:chat",
    "alpaca:chatml",
    "alpaca:phi",
    "alpaca_instruct",
    "alpaca_instruct.load_no_prompt",
    "alpaca_chat",
    "alpaca_chat.load_concise",
    "alpaca_chat.load_qa",
    "alpaca_chat.load_camel_ai",
    "alpaca_chat.load_no_prompt",
    "alpaca_w_system",
    "alpaca_w_system.load",
    "alpaca_w_system.load_chat",
    "alpaca_w_system.load_instruct",
    "alpaca_w_system.load_open_orca",
    "alpaca_w_system.load_open_orca_chatml",
    "orcamini",
    "context_qa",
    "context_qa.load",
    "context_qa.load_404",
    "context_qa.load_v2",
    USER_DEFINED_TYPE,
];

const CONTEXT_QA_404_RESPONSE: &str = "The context provided does not contain any information about your inquiry. Therefore, I'm unable to answer your question based on the given context.";

/// The turn layout of a prompt style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnFormat {
    /// With an input: `{instruction}` and `{input}` are replaced.
    pub with_input: String,
    /// Without an input: `{instruction}` is replaced.
    pub without_input: String,
    /// Wraps the system text: `{system}` is replaced.
    pub system: String,
}

impl TurnFormat {
    fn new(with_input: &str, without_input: &str, system: &str) -> Self {
        Self {
            with_input: with_input.into(),
            without_input: without_input.into(),
            system: system.into(),
        }
    }

    /// The layout of one of Alpaca's prompt styles.
    pub fn style(style: &str) -> Option<Self> {
        Some(match style {
            "instruct" => Self::new(
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                "### Instruction:\n{instruction}\n\n### Response:\n",
                "{system}\n\n",
            ),
            "chat" => Self::new(
                "USER: {instruction}\n{input}\nASSISTANT:",
                "USER: {instruction}\nASSISTANT:",
                "SYSTEM: {system}\n",
            ),
            "chatml" => Self::new(
                "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>system\n{system}<|im_end|>\n",
            ),
            "phi" => Self::new(
                "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
                "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
                "<|system|>\n{system}<|end|>\n",
            ),
            _ => return None,
        })
    }
}

/// Where the system text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SystemSource {
    /// Fixed texts: one when the row has an input, one when it has not (empty = none).
    Fixed {
        /// With an input.
        with_input: String,
        /// Without an input.
        without_input: String,
    },
    /// A field of the row; `required` rows must have it; `default` applies when absent.
    Field {
        /// The field.
        name: String,
        /// Whether a row without it is an error.
        required: bool,
        /// The text used when the field is absent.
        default: String,
    },
}

/// How instruction, input and response are read from a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fields {
    /// Named fields: instruction (required), input (optional), output.
    Named {
        /// The instruction field.
        instruction: String,
        /// The input field.
        input: String,
        /// The response field.
        output: String,
        /// Whether a row without the response field is an error.
        output_required: bool,
    },
    /// `context_qa`: the instruction is `article + "\n===\n" + question`.
    ContextQa {
        /// The question field (`question` or `unanswerable_question`).
        question: String,
        /// A fixed response instead of the `answer` field.
        fixed_response: Option<String>,
    },
    /// `context_qa.load_v2`: `"Context: " + context + "\nQuestion: " + question + "\n"`, response `"Answer: " + answer`.
    ContextQaV2,
}

/// An instruction strategy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstructStrategy {
    /// The turn layout.
    pub turn: TurnFormat,
    /// The system text.
    pub system: SystemSource,
    /// The fields.
    pub fields: Fields,
    /// Train on the prompt too.
    pub train_on_inputs: bool,
}

fn named(instruction: &str, input: &str, output: &str) -> Fields {
    Fields::Named {
        instruction: instruction.into(),
        input: input.into(),
        output: output.into(),
        output_required: true,
    }
}

fn fixed(with_input: &str, without_input: &str) -> SystemSource {
    SystemSource::Fixed {
        with_input: with_input.into(),
        without_input: without_input.into(),
    }
}

fn system_field(name: &str) -> SystemSource {
    SystemSource::Field {
        name: name.into(),
        required: true,
        default: String::new(),
    }
}

impl InstructStrategy {
    /// The strategy an Axolotl type name selects, if it is an instruction strategy.
    /// `conversation` is the dataset's `conversation` key (the style of `alpaca_chat`).
    pub fn by_name(
        name: &str,
        conversation: Option<&str>,
        train_on_inputs: bool,
    ) -> Option<std::result::Result<Self, String>> {
        let style = |s: &str| {
            TurnFormat::style(s)
                .ok_or_else(|| format!("unknown prompt style `{s}` (instruct, chat, chatml, phi)"))
        };
        let make = |turn: std::result::Result<TurnFormat, String>,
                    system: SystemSource,
                    fields: Fields| {
            turn.map(|turn| Self {
                turn,
                system,
                fields,
                train_on_inputs,
            })
        };
        let alpaca_system = fixed(ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT);
        let concise = fixed(CONCISE_SYSTEM, CONCISE_SYSTEM_NO_INPUT);
        let none = fixed("", "");
        let standard = named("instruction", "input", "output");
        Some(match name {
            "alpaca" | "alpaca_instruct" => make(style("instruct"), alpaca_system, standard),
            _ if name.starts_with("alpaca:") => {
                make(style(&name["alpaca:".len()..]), alpaca_system, standard)
            }
            "alpaca_instruct.load_no_prompt" => make(style("instruct"), none, standard),
            "alpaca_chat" => make(
                style(conversation.unwrap_or("chat")),
                alpaca_system,
                standard,
            ),
            "alpaca_chat.load_concise" => make(style("chat"), concise, standard),
            "alpaca_chat.load_qa" => make(style("chat"), concise, named("question", "", "answer")),
            "alpaca_chat.load_camel_ai" => {
                make(style("chat"), concise, named("message_1", "", "message_2"))
            }
            "alpaca_chat.load_no_prompt" => make(style("chat"), none, standard),
            "alpaca_w_system" | "alpaca_w_system.load" | "alpaca_w_system.load_chat" => {
                make(style("chat"), system_field("system"), standard)
            }
            "alpaca_w_system.load_instruct" => {
                make(style("instruct"), system_field("system"), standard)
            }
            "alpaca_w_system.load_open_orca" => make(
                Ok(TurnFormat::new(
                    "### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
                    "### Human:\n{instruction}\n### Assistant:\n",
                    "### System:\n{system}\n",
                )),
                system_field("system_prompt"),
                named("question", "", "response"),
            ),
            "alpaca_w_system.load_open_orca_chatml" => make(
                style("chatml"),
                system_field("system_prompt"),
                named("question", "", "response"),
            ),
            "orcamini" => make(
                Ok(TurnFormat::new(
                    "### System:\n{system}\n\n### User:\n{instruction}\n\n### Response:\n",
                    "### System:\n{system}\n\n### User:\n{instruction}\n\n### Response:\n",
                    "",
                )),
                system_field("system_prompt"),
                named("question", "", "response"),
            ),
            "context_qa" | "context_qa.load" => make(
                style("chat"),
                fixed(CONTEXT_QA_SYSTEM, CONTEXT_QA_SYSTEM),
                Fields::ContextQa {
                    question: "question".into(),
                    fixed_response: None,
                },
            ),
            "context_qa.load_404" => make(
                style("chat"),
                fixed(CONTEXT_QA_SYSTEM, CONTEXT_QA_SYSTEM),
                Fields::ContextQa {
                    question: "unanswerable_question".into(),
                    fixed_response: Some(CONTEXT_QA_404_RESPONSE.into()),
                },
            ),
            "context_qa.load_v2" => make(
                Ok(TurnFormat::new("{instruction}", "{instruction}", "")),
                none,
                Fields::ContextQaV2,
            ),
            _ => return None,
        })
    }

    /// The strategy of a `datasets:` entry, if its type is an instruction strategy: a name
    /// [`by_name`](Self::by_name) knows (with the entry's `conversation`), or
    /// [`USER_DEFINED_TYPE`] for an inline format (the entry's `type:` mapping). The error
    /// names the entry's key at fault.
    pub fn for_entry(
        dataset: &DatasetEntry,
        train_on_inputs: bool,
    ) -> Option<std::result::Result<Self, (&'static str, String)>> {
        if dataset.dataset_type == USER_DEFINED_TYPE {
            return Some(match dataset.config.get("type") {
                Some(Value::Object(format)) => Ok(Self::user_defined(format, train_on_inputs)),
                _ => Err(("type", format!(
                    "`{USER_DEFINED_TYPE}` is the type of an inline prompt format: write `type:` as a mapping (format, no_input_format, field_instruction, ...)"
                ))),
            });
        }
        let conversation = dataset.config.get("conversation").and_then(Value::as_str);
        Self::by_name(&dataset.dataset_type, conversation, train_on_inputs)
            .map(|made| made.map_err(|e| ("conversation", e)))
    }

    /// The strategy of an inline prompt format (the keys of Axolotl's user-defined type:
    /// `system_prompt`, `system_format`, `field_system`, `field_instruction`, `field_input`,
    /// `field_output`, `format`, `no_input_format`), with Axolotl's defaults for absent ones.
    pub fn user_defined(format: &Row, train_on_inputs: bool) -> Self {
        let or = |key: &str, default: &str| {
            format
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or(default)
                .to_string()
        };
        Self {
            turn: TurnFormat {
                with_input: or("format", "{instruction} {input} "),
                without_input: or("no_input_format", "{instruction} "),
                system: or("system_format", "{system}"),
            },
            system: SystemSource::Field {
                name: or("field_system", "system"),
                required: false,
                default: or("system_prompt", ""),
            },
            fields: Fields::Named {
                instruction: or("field_instruction", "instruction"),
                input: or("field_input", "input"),
                output: or("field_output", "output"),
                output_required: false,
            },
            train_on_inputs,
        }
    }

    /// The prompt this format gives an instruction with no input, as inference sends it
    /// (the system text is the format's fixed one, or its default when it comes from a field).
    pub fn prompt(&self, instruction: &str) -> String {
        let system = match &self.system {
            SystemSource::Fixed { without_input, .. } => without_input.clone(),
            SystemSource::Field { default, .. } => default.clone(),
        };
        self.assemble(&system, instruction, "")
    }

    fn assemble(&self, system: &str, instruction: &str, input: &str) -> String {
        let mut prompt = String::new();
        if !system.is_empty() && !self.turn.system.is_empty() {
            prompt.push_str(&self.turn.system.replace("{system}", system));
        }
        let turn = if input.is_empty() {
            fill(&self.turn.without_input, instruction, "", system)
        } else {
            fill(&self.turn.with_input, instruction, input, system)
        };
        prompt.push_str(&turn);
        prompt
    }

    /// Formats one row: the prompt (trained only with `train_on_inputs`), then the response
    /// and an EOS, both trained; no EOS when the response is empty.
    pub fn format(&self, row: &Row) -> Result<Formatted, PluginError> {
        let (instruction, input, response) = self.read_fields(row)?;
        let system = match &self.system {
            SystemSource::Fixed {
                with_input,
                without_input,
            } => {
                if input.is_empty() {
                    without_input.clone()
                } else {
                    with_input.clone()
                }
            }
            SystemSource::Field {
                name,
                required,
                default,
            } => match row.get(name) {
                Some(v) => text_of(name, v)?,
                None if *required => return Err(field_error(name, "missing")),
                None => default.clone(),
            },
        };
        let prompt = self.assemble(&system, &instruction, &input);
        let mut example = Formatted::from_pieces([
            (prompt.as_str(), self.train_on_inputs),
            (response.as_str(), true),
        ]);
        example.append_eos = !response.is_empty();
        example.train_all = self.train_on_inputs;
        Ok(example)
    }

    fn read_fields(&self, row: &Row) -> Result<(String, String, String), PluginError> {
        let get = |name: &str, required: bool| -> Result<String, PluginError> {
            match row.get(name) {
                Some(v) => text_of(name, v),
                None if required => Err(field_error(name, "missing")),
                None => Ok(String::new()),
            }
        };
        match &self.fields {
            Fields::Named {
                instruction,
                input,
                output,
                output_required,
            } => Ok((
                get(instruction, true)?,
                if input.is_empty() {
                    String::new()
                } else {
                    get(input, false)?
                },
                get(output, *output_required)?,
            )),
            Fields::ContextQa {
                question,
                fixed_response,
            } => {
                let instruction =
                    format!("{}\n===\n{}", get("article", true)?, get(question, true)?);
                let response = match fixed_response {
                    Some(r) => r.clone(),
                    None => get("answer", true)?,
                };
                Ok((instruction, String::new(), response))
            }
            Fields::ContextQaV2 => Ok((
                format!(
                    "Context: {}\nQuestion: {}\n",
                    get("context", true)?,
                    get("question", true)?
                ),
                String::new(),
                format!("Answer: {}", get("answer", true)?),
            )),
        }
    }
}

/// Replaces the placeholders of a prompt format (only in the format, never in the data).
fn fill(format: &str, instruction: &str, input: &str, system: &str) -> String {
    let mut out = String::with_capacity(format.len() + instruction.len() + input.len());
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        let (value, len) = if after.starts_with("{instruction}") {
            (instruction, "{instruction}".len())
        } else if after.starts_with("{input}") {
            (input, "{input}".len())
        } else if after.starts_with("{system}") {
            (system, "{system}".len())
        } else if after.starts_with("{{") {
            ("{", 2)
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(&rest.replace("}}", "}"));
    out
}
