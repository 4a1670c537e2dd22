//! The `chat_template` strategy: conversations rendered with a chat template, trained on the
//! turns of `roles_to_train` and on the end-of-turn / end-of-sequence tokens that
//! `train_on_eot` / `train_on_eos` select.
//!
//! Turn boundaries are found in the rendered text itself, whatever the template: the
//! conversation is rendered once as is, and once per trained turn with that turn's content
//! replaced by a sentinel. The text before the sentinel and after it must be the same in both
//! renderings; what the template made of the content lies between them. So masking holds for
//! every template, including ones that put role headers and end-of-turn markers in unusual
//! places (the Mistral masking bug of Axolotl issue 2089 cannot happen).

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::{Map, Value};

use super::config::{DatasetConfig, TrainOnEnd};
use super::error::{DataError, Result};
use super::example::{Formatted, TextExample};
use super::source::kind_of;
use super::source::Row;
use super::strategy::StrategyContext;
use crate::chat_template::{self, ChatTemplate, SpecialTokens};

/// How many bytes of template text may separate a turn's content from the marker closing it.
const MAX_MARKER_GAP: usize = 16;

const SENTINEL: &str = "\u{E000}axl-turn-content\u{E001}";

/// A conversation strategy.
pub struct ChatStrategy {
    template: ChatTemplate,
    special: SpecialTokens,
    field_messages: String,
    /// Template property → dataset field of a message.
    mappings: BTreeMap<String, String>,
    /// Dataset role → template role.
    roles: BTreeMap<String, String>,
    roles_to_train: Vec<String>,
    train_on_eos: TrainOnEnd,
    train_on_eot: TrainOnEnd,
    train_on_inputs: bool,
    message_field_training: Option<String>,
    message_field_training_detail: Option<String>,
    drop_system_message: bool,
    field_tools: String,
    field_thinking: String,
    template_thinking_key: String,
    eos: Option<String>,
    eot: Vec<String>,
    split_thinking: bool,
    kwargs: Map<String, Value>,
}

impl std::fmt::Debug for ChatStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStrategy")
            .field("field_messages", &self.field_messages)
            .field("roles", &self.roles)
            .finish()
    }
}

/// The source of the chat template a dataset uses: the dataset's `chat_template`, else the
/// top-level one, else the tokenizer's.
pub fn template_source(
    ds_template: Option<&str>,
    ds_jinja: Option<&str>,
    ctx: &StrategyContext,
) -> Result<String> {
    // A dataset-level `tokenizer_default` means the tokenizer's template as the top level set
    // it: the top-level chat_template, when there is one.
    let ds_template =
        ds_template.filter(|t| !(*t == "tokenizer_default" && ctx.chat_template.is_some()));
    let (name, jinja) = match ds_template.or(if ds_jinja.is_some() {
        Some("jinja")
    } else {
        None
    }) {
        Some(n) => (n, ds_jinja.or(ctx.chat_template_jinja)),
        None => match ctx.chat_template {
            Some(n) => (n, ctx.chat_template_jinja),
            None if ctx.chat_template_jinja.is_some() => ("jinja", ctx.chat_template_jinja),
            None => ("tokenizer_default", None),
        },
    };
    let from_tokenizer = || ctx.tokenizer.chat_template.clone();
    let err = |m: String| DataError::msg(m).field("chat_template");
    if name == "tokenizer_default" {
        return from_tokenizer().ok_or_else(|| {
            err(format!(
                "chat_template is tokenizer_default but {} has no chat template; name one (e.g. chatml) or use tokenizer_default_fallback_chatml",
                ctx.tokenizer.dir.display()
            ))
        });
    }
    if let Some(fallback) = name.strip_prefix("tokenizer_default_fallback_") {
        return match from_tokenizer() {
            Some(t) => Ok(t),
            None => chat_template::builtin(fallback)
                .map(str::to_string)
                .ok_or_else(|| err(format!("no built-in chat template named `{fallback}`"))),
        };
    }
    if name == "jinja" {
        let source = jinja.ok_or_else(|| {
            err(
                "chat_template: jinja needs chat_template_jinja (the template, or a path to it)"
                    .into(),
            )
        })?;
        let path = ctx.base_dir.join(source);
        if !source.contains("{{") && !source.contains("{%") && path.is_file() {
            return std::fs::read_to_string(&path)
                .map_err(|e| DataError::msg(format!("cannot read: {e}")).at(path, None));
        }
        return Ok(source.to_string());
    }
    chat_template::builtin(name).map(str::to_string).ok_or_else(|| {
        err(format!(
            "no built-in chat template named `{name}` (built-in: {}; or tokenizer_default, tokenizer_default_fallback_<name>, jinja)",
            chat_template::BUILTIN_NAMES.join(", ")
        ))
    })
}

impl ChatStrategy {
    /// The strategy of a dataset.
    pub fn new(ds: &DatasetConfig, ctx: &StrategyContext) -> Result<Self> {
        let source = template_source(
            ds.chat_template.as_deref(),
            ds.chat_template_jinja.as_deref(),
            ctx,
        )?;
        let template = ChatTemplate::new(&source)
            .map_err(|e| DataError::msg(e.to_string()).field("chat_template"))?;
        let tok = ctx.tokenizer;
        let special = SpecialTokens {
            bos_token: tok.bos.as_ref().map(|t| t.0.clone()),
            eos_token: tok.eos.as_ref().map(|t| t.0.clone()),
            pad_token: tok.pad.as_ref().map(|t| t.0.clone()),
            unk_token: None,
        };
        let mut mappings: BTreeMap<String, String> = [
            ("role".to_string(), "role".to_string()),
            ("content".to_string(), "content".to_string()),
        ]
        .into();
        if let Some(f) = &ds.message_field_role {
            mappings.insert("role".into(), f.clone());
        }
        if let Some(f) = &ds.message_field_content {
            mappings.insert("content".into(), f.clone());
        }
        if let Some(m) = &ds.message_property_mappings {
            mappings.extend(m.clone());
        }
        let default_roles: [(&str, &[&str]); 4] = [
            ("user", &["human", "user"]),
            ("assistant", &["gpt", "assistant"]),
            ("system", &["system"]),
            ("tool", &["tool"]),
        ];
        let mut roles = BTreeMap::new();
        match &ds.roles {
            Some(custom) => {
                for (target, sources) in custom {
                    for s in sources {
                        roles.insert(s.clone(), target.clone());
                    }
                }
            }
            None => {
                for (target, sources) in default_roles {
                    for s in sources {
                        roles.insert(s.to_string(), target.to_string());
                    }
                }
            }
        }
        let train_on_eos = ds.train_on_eos.unwrap_or(TrainOnEnd::Turn);
        let eos = special.eos_token.clone();
        let eot: Vec<String> = match ds.eot_tokens.as_deref().or(ctx.eot_tokens) {
            Some(t) => t.to_vec(),
            None => eos.iter().cloned().collect(),
        };
        let train_on_eot = ds.train_on_eot.unwrap_or(train_on_eos);
        if let Some(e) = &eos {
            if eot.contains(e) && eot.len() > 1 && train_on_eot != train_on_eos {
                return Err(DataError::msg(format!(
                    "eot_tokens contains the EOS token `{e}`, so train_on_eos ({train_on_eos:?}) and train_on_eot ({train_on_eot:?}) conflict; make them equal"
                ))
                .field("train_on_eot"));
            }
        }
        Ok(Self {
            template,
            special,
            field_messages: ds
                .field_messages
                .clone()
                .unwrap_or_else(|| "messages".into()),
            mappings,
            roles,
            roles_to_train: ds
                .roles_to_train
                .clone()
                .unwrap_or_else(|| vec!["assistant".into()]),
            train_on_eos,
            train_on_eot,
            train_on_inputs: ctx.train_on_inputs,
            message_field_training: ds.message_field_training.clone(),
            message_field_training_detail: ds.message_field_training_detail.clone(),
            drop_system_message: ds.drop_system_message.unwrap_or(false),
            field_tools: ds.field_tools.clone().unwrap_or_else(|| "tools".into()),
            field_thinking: ds
                .field_thinking
                .clone()
                .unwrap_or_else(|| "reasoning_content".into()),
            template_thinking_key: ds
                .template_thinking_key
                .clone()
                .unwrap_or_else(|| "reasoning_content".into()),
            eos,
            eot,
            split_thinking: ds.split_thinking.unwrap_or(false),
            kwargs: ctx.chat_template_kwargs.clone(),
        })
    }

    /// Turns the dataset's messages into the template's, with the training flags of each.
    fn messages(&self, row: &Row) -> Result<Vec<(Map<String, Value>, TurnTraining)>> {
        let field = &self.field_messages;
        let list = match row.fields.get(field) {
            Some(Value::Array(l)) => l,
            Some(other) => {
                return Err(row.field_error(
                    field,
                    format!("expected a list of messages, found {}", kind_of(other)),
                ))
            }
            None => return Err(row.field_error(field, "missing")),
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, message) in list.iter().enumerate() {
            let at = |key: &str| format!("{field}[{i}].{key}");
            let Value::Object(source) = message else {
                return Err(row.field_error(
                    &format!("{field}[{i}]"),
                    format!("expected a message object, found {}", kind_of(message)),
                ));
            };
            let mut target = Map::new();
            let mapped: Vec<&String> = self.mappings.values().collect();
            for (key, value) in source {
                if !mapped.contains(&key) && *key != self.field_thinking {
                    target.insert(key.clone(), value.clone());
                }
            }
            for (property, source_field) in &self.mappings {
                match source.get(source_field) {
                    Some(v) => {
                        target.insert(property.clone(), v.clone());
                    }
                    None if property == "role" || property == "content" => {
                        if property == "content" && source.contains_key("tool_calls") {
                            continue;
                        }
                        return Err(row.field_error(&at(source_field), "missing"));
                    }
                    None => {}
                }
            }
            if let Some(thinking) = source.get(&self.field_thinking) {
                target.insert(self.template_thinking_key.clone(), thinking.clone());
            }
            let role = match target.get("role") {
                Some(Value::String(r)) => r.clone(),
                other => {
                    return Err(row.field_error(
                        &at(&self.mappings["role"]),
                        format!(
                            "expected a role name, found {}",
                            other.map_or("nothing", kind_of)
                        ),
                    ))
                }
            };
            let mapped_role = self.roles.get(&role).cloned().ok_or_else(|| {
                row.field_error(
                    &at(&self.mappings["role"]),
                    format!(
                        "role `{role}` is not in the roles mapping (known: {}); map it with `roles:`",
                        self.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            target.insert("role".into(), Value::String(mapped_role.clone()));
            if self.split_thinking && mapped_role == "assistant" {
                if let Some(Value::String(content)) = target.get("content") {
                    if let Some((reasoning, answer)) = split_thinking(content) {
                        target.insert("content".into(), Value::String(answer));
                        target.insert(self.template_thinking_key.clone(), Value::String(reasoning));
                    }
                }
            }
            if self.drop_system_message && mapped_role == "system" {
                continue;
            }
            let mut training = TurnTraining {
                train: self.train_on_inputs || self.roles_to_train.contains(&mapped_role),
                detail: None,
            };
            if let Some(flag_field) = &self.message_field_training {
                match source.get(flag_field) {
                    Some(Value::Bool(b)) => training.train = *b,
                    Some(Value::Null) | None => {}
                    Some(other) => {
                        return Err(row.field_error(
                            &at(flag_field),
                            format!("expected true or false, found {}", kind_of(other)),
                        ))
                    }
                }
            }
            if let Some(detail_field) = &self.message_field_training_detail {
                if let Some(detail) = source.get(detail_field).filter(|v| !v.is_null()) {
                    training.detail = Some(
                        parse_detail(detail).map_err(|m| row.field_error(&at(detail_field), m))?,
                    );
                }
            }
            out.push((target, training));
        }
        Ok(out)
    }

    fn render(
        &self,
        messages: &[Map<String, Value>],
        tools: Option<&Value>,
    ) -> std::result::Result<String, String> {
        let list: Vec<Value> = messages.iter().map(|m| Value::Object(m.clone())).collect();
        self.template
            .render_with(&list, tools, false, &self.special, &self.kwargs)
            .map_err(|e| e.to_string())
    }

    /// Formats one conversation.
    pub fn format(&self, row: &Row) -> Result<Formatted> {
        let messages = self.messages(row)?;
        let tools = row.fields.get(&self.field_tools).filter(|t| !t.is_null());
        let plain: Vec<Map<String, Value>> = messages.iter().map(|(m, _)| m.clone()).collect();
        let text = self.render(&plain, tools).map_err(|e| row.error(e))?;
        let mut trainable: Vec<Range<usize>> = Vec::new();
        let mut trainable_whole_tokens: Vec<Range<usize>> = Vec::new();
        let mut turn_ends: Vec<(usize, bool)> = Vec::new();
        for (i, (message, training)) in messages.iter().enumerate() {
            let Some(Value::String(content)) = message.get("content") else {
                if training.train {
                    turn_ends.push((self.turn_end_after(&text, &plain, i, tools, row)?, true));
                }
                continue;
            };
            if !training.train && training.detail.is_none() {
                continue;
            }
            let span = self
                .content_span(&text, &plain, i, tools)
                .map_err(|m| row.field_error(&format!("{}[{i}]", self.field_messages), m))?;
            match &training.detail {
                Some(detail) => {
                    for piece in detail.iter().filter(|d| d.train) {
                        let (start, end) = char_range_to_bytes(content, piece.begin, piece.end);
                        if span.len() == content.len() {
                            trainable_whole_tokens.push(span.start + start..span.start + end);
                        } else {
                            return Err(row.field_error(
                                &format!("{}[{i}]", self.field_messages),
                                "the template changes this message's content, so character offsets of a training detail cannot be placed",
                            ));
                        }
                    }
                }
                None => trainable.push(span.clone()),
            }
            turn_ends.push((span.end, training.train));
        }
        trainable.extend(self.end_token_spans(&text, &turn_ends));
        trainable.sort_by_key(|r| r.start);
        Ok(Formatted::Text(TextExample {
            text,
            trainable,
            trainable_whole_tokens,
            ..TextExample::default()
        }))
    }

    /// Where the content of message `i` lies in `text`, by rendering it as a sentinel.
    fn content_span(
        &self,
        text: &str,
        messages: &[Map<String, Value>],
        i: usize,
        tools: Option<&Value>,
    ) -> std::result::Result<Range<usize>, String> {
        let mut marked = messages.to_vec();
        marked[i].insert("content".into(), Value::String(SENTINEL.into()));
        let rendered = self.render(&marked, tools)?;
        let at = rendered.find(SENTINEL).ok_or(
            "the template does not render this message's content, so its turn cannot be located",
        )?;
        let prefix = &rendered[..at];
        let suffix = &rendered[at + SENTINEL.len()..];
        if text.starts_with(prefix)
            && text.ends_with(suffix)
            && prefix.len() + suffix.len() <= text.len()
        {
            Ok(prefix.len()..text.len() - suffix.len())
        } else {
            Err("the template renders this message differently depending on its content, so its turn cannot be located".into())
        }
    }

    /// For a trained message without text content (tool calls only): the end of its rendering.
    fn turn_end_after(
        &self,
        text: &str,
        messages: &[Map<String, Value>],
        i: usize,
        tools: Option<&Value>,
        row: &Row,
    ) -> Result<usize> {
        let upto = self
            .render(&messages[..=i], tools)
            .map_err(|e| row.error(e))?;
        Ok(if text.starts_with(&upto) {
            upto.len()
        } else {
            text.len()
        })
    }

    /// The spans of the end-of-turn / end-of-sequence markers to train, from the ends of the
    /// turns (`(end of content, trained)`) in order.
    fn end_token_spans(&self, text: &str, turn_ends: &[(usize, bool)]) -> Vec<Range<usize>> {
        let mut markers: Vec<(Range<usize>, bool)> = Vec::new();
        let mut candidates: Vec<(&str, bool)> =
            self.eot.iter().map(|t| (t.as_str(), true)).collect();
        if let Some(eos) = &self.eos {
            if !self.eot.contains(eos) {
                candidates.push((eos.as_str(), false));
            }
        }
        for (token, is_eot) in &candidates {
            if token.is_empty() {
                continue;
            }
            let mut from = 0;
            while let Some(pos) = text[from..].find(token) {
                let start = from + pos;
                markers.push((start..start + token.len(), *is_eot));
                from = start + token.len();
            }
        }
        markers.sort_by_key(|(r, _)| r.start);
        let mut out = Vec::new();
        for kind in [true, false] {
            let policy = if kind {
                self.train_on_eot
            } else {
                self.train_on_eos
            };
            let of_kind: Vec<&Range<usize>> = markers
                .iter()
                .filter(|(_, k)| *k == kind)
                .map(|(r, _)| r)
                .collect();
            match policy {
                TrainOnEnd::None => {}
                TrainOnEnd::All => out.extend(of_kind.iter().map(|r| (*r).clone())),
                TrainOnEnd::Last => out.extend(of_kind.last().map(|r| (*r).clone())),
                TrainOnEnd::Turn => {
                    for (end, trained) in turn_ends {
                        if !trained {
                            continue;
                        }
                        // The marker that closes the turn follows its content closely (template
                        // padding at most); a marker further away belongs to something else.
                        if let Some(r) = of_kind
                            .iter()
                            .find(|r| r.start >= *end && r.start - *end <= MAX_MARKER_GAP)
                        {
                            out.push((*r).clone());
                        }
                    }
                }
            }
        }
        out
    }
}

/// Splits `<think>…</think>` (or `<reasoning>…</reasoning>`, `<|begin_of_thought|>…<|end_of_thought|>`)
/// out of assistant content: `(reasoning, answer)`, as Axolotl's `split_thinking` does.
fn split_thinking(content: &str) -> Option<(String, String)> {
    let pairs = [
        ("<think>", "</think>"),
        ("<reasoning>", "</reasoning>"),
        ("<|begin_of_thought|>", "<|end_of_thought|>"),
    ];
    for (open, close) in pairs {
        if let (Some(start), Some(end)) = (content.find(open), content.find(close)) {
            if start + open.len() > end {
                continue;
            }
            let reasoning = content[start + open.len()..end].trim().to_string();
            let rest = content[end + close.len()..].trim_start();
            let answer = match (
                rest.find("<|begin_of_solution|>"),
                rest.find("<|end_of_solution|>"),
            ) {
                (Some(a), Some(b)) if a + "<|begin_of_solution|>".len() <= b => rest
                    [a + "<|begin_of_solution|>".len()..b]
                    .trim()
                    .to_string(),
                _ => rest.to_string(),
            };
            return Some((reasoning, answer));
        }
    }
    None
}

/// How one message is trained.
#[derive(Clone, Debug)]
struct TurnTraining {
    train: bool,
    detail: Option<Vec<DetailPiece>>,
}

/// A range of a message's content, in characters, trained or not.
#[derive(Clone, Debug)]
struct DetailPiece {
    begin: usize,
    end: usize,
    train: bool,
}

fn parse_detail(value: &Value) -> std::result::Result<Vec<DetailPiece>, String> {
    let list = value
        .as_array()
        .ok_or("expected a list of {begin_offset, end_offset, train}")?;
    list.iter()
        .map(|item| {
            let get = |k: &str| item.get(k).and_then(Value::as_u64).map(|n| n as usize);
            Ok(DetailPiece {
                begin: get("begin_offset").ok_or("begin_offset missing or not an integer")?,
                end: get("end_offset").ok_or("end_offset missing or not an integer")?,
                train: item
                    .get("train")
                    .and_then(Value::as_bool)
                    .ok_or("train missing or not a boolean")?,
            })
        })
        .collect()
}

/// Byte range of the characters `begin..=end` of `text` (Axolotl's end offset is inclusive).
fn char_range_to_bytes(text: &str, begin: usize, end: usize) -> (usize, usize) {
    let byte = |c: usize| text.char_indices().nth(c).map_or(text.len(), |(b, _)| b);
    (byte(begin), byte(end.saturating_add(1)))
}
