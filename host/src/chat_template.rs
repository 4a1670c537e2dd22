//! Renders Hugging Face chat templates (Jinja) the way transformers' `apply_chat_template`
//! does: `trim_blocks` and `lstrip_blocks` on, Python string and dict methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps` writes.

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde::Serialize;

/// A chat template that failed to compile or render.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl From<JError> for TemplateError {
    fn from(e: JError) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Self(message)
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from a role and text.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// The special tokens a template may refer to.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles a template.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self { env })
    }

    /// Renders a conversation, with `add_generation_prompt` as in transformers.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String, TemplateError> {
        let values: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.render_values(&values, None, add_generation_prompt, special)
    }
}

/// The chat templates built into axl, by the name the configuration uses. Each is written
/// for the conversation format its model family defines (`host/templates/NAME.jinja`).
pub const BUILTINS: &[(&str, &str)] = &[
    ("alpaca", include_str!("../templates/alpaca.jinja")),
    ("chatml", include_str!("../templates/chatml.jinja")),
    ("cohere", include_str!("../templates/cohere.jinja")),
    (
        "deepseek_v2",
        include_str!("../templates/deepseek_v2.jinja"),
    ),
    (
        "deepseek_v3",
        include_str!("../templates/deepseek_v3.jinja"),
    ),
    ("gemma", include_str!("../templates/gemma.jinja")),
    ("gemma3", include_str!("../templates/gemma3.jinja")),
    ("jamba", include_str!("../templates/jamba.jinja")),
    ("llama3", include_str!("../templates/llama3.jinja")),
    (
        "llama3_2_vision",
        include_str!("../templates/llama3_2_vision.jinja"),
    ),
    ("llama4", include_str!("../templates/llama4.jinja")),
    ("metharme", include_str!("../templates/metharme.jinja")),
    ("mistral_v1", include_str!("../templates/mistral_v1.jinja")),
    (
        "mistral_v2v3",
        include_str!("../templates/mistral_v2v3.jinja"),
    ),
    (
        "mistral_v3_tekken",
        include_str!("../templates/mistral_v3_tekken.jinja"),
    ),
    (
        "mistral_v7_tekken",
        include_str!("../templates/mistral_v7_tekken.jinja"),
    ),
    ("nemotron_h", include_str!("../templates/nemotron_h.jinja")),
    ("phi_3", include_str!("../templates/phi_3.jinja")),
    ("phi_35", include_str!("../templates/phi_35.jinja")),
    ("qwen3", include_str!("../templates/qwen3.jinja")),
    ("qwen_25", include_str!("../templates/qwen_25.jinja")),
];

/// The names of the built-in templates.
pub const BUILTIN_NAMES: &[&str] = &[
    "alpaca",
    "chatml",
    "cohere",
    "deepseek_v2",
    "deepseek_v3",
    "gemma",
    "gemma3",
    "jamba",
    "llama3",
    "llama3_2_vision",
    "llama4",
    "metharme",
    "mistral_v1",
    "mistral_v2v3",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "nemotron_h",
    "phi_3",
    "phi_35",
    "qwen3",
    "qwen_25",
];

/// A built-in template by name.
pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

impl ChatTemplate {
    /// Renders messages given as JSON objects (with any extra keys the template reads, such as
    /// `tool_calls`), with optional `tools`.
    pub fn render_values(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String, TemplateError> {
        self.render_with(
            messages,
            tools,
            add_generation_prompt,
            special,
            &serde_json::Map::new(),
        )
    }

    /// Renders with extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`
    /// or `date_string`), which take precedence over nothing but are overridden by nothing.
    pub fn render_with(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        special: &SpecialTokens,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat")?;
        let mut ctx = extra.clone();
        ctx.insert(
            "messages".into(),
            serde_json::Value::Array(messages.to_vec()),
        );
        ctx.insert(
            "tools".into(),
            tools.cloned().unwrap_or(serde_json::Value::Null),
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert(
            "bos_token".into(),
            special.bos_token.clone().unwrap_or_default().into(),
        );
        ctx.insert(
            "eos_token".into(),
            special.eos_token.clone().unwrap_or_default().into(),
        );
        ctx.insert(
            "pad_token".into(),
            special
                .pad_token
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        ctx.insert(
            "unk_token".into(),
            special
                .unk_token
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        Ok(template.render(JValue::from_serialize(&ctx))?)
    }
}

fn raise_exception(message: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, JError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(format_utc(now, &format))
}

/// A small `strftime` over UTC for the directives chat templates use.
fn format_utc(epoch: i64, format: &str) -> String {
    let time = axl_sdk::clock::UtcTime {
        unix_seconds: epoch,
        micros: 0,
    };
    let (year, month, day, hour, minute, second) = time.parts();
    let days = epoch.div_euclid(86_400);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn tojson(value: JValue, kwargs: Kwargs) -> Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<JValue> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) => {
            let items: Vec<JValue> = s.try_iter()?.collect();
            let get = |i: usize| items.get(i).and_then(|v| v.as_str().map(str::to_string));
            (
                get(0).unwrap_or_else(|| ", ".into()),
                get(1).unwrap_or_else(|| ": ".into()),
            )
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    python_json(&value, &style, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Writes `value` as Python's `json.dumps(value, ensure_ascii=False, ...)` does.
fn python_json(
    value: &JValue,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> Result<(), JError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let text = value.to_string();
            if let Some(f) = f64::try_from(value.clone())
                .ok()
                .filter(|_| text.contains('.') || text.contains('e'))
            {
                out.push_str(&python_float(f));
            } else {
                out.push_str(&text);
            }
        }
        ValueKind::String => out.push_str(
            &serde_json::to_string(value.as_str().unwrap_or_default()).unwrap_or_default(),
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                python_json(item, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<JValue> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                let name = key
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&name).unwrap_or_default());
                out.push_str(&style.key_sep);
                python_json(&value.get_item(key)?, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&value.to_string()).unwrap_or_default()),
    }
    Ok(())
}

fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    format!("{f:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_follow_the_gregorian_calendar() {
        assert_eq!(format_utc(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
        assert_eq!(
            format_utc(1_735_689_600, "%d %B %Y, %a %b %-d"),
            "01 January 2025, Wed Jan 1"
        );
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let extra = serde_json::Map::from_iter([(
            "x".to_string(),
            serde_json::json!({"a": [1, 2.5, "é<"], "b": null}),
        )]);
        let out = t
            .render_with(&[], None, false, &SpecialTokens::default(), &extra)
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, \"é<\"], \"b\": null}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é<\"\n  ],\n  \"b\": null\n}"
        );
    }
}
