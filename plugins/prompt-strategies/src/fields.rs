//! Reading a row's fields, with errors that name the field as the host's data errors do
//! (`field `name`: what is wrong`).

use axl_sdk::prelude::*;
use serde_json::Value;

/// An error about the row's field `name`.
pub fn field_error(name: &str, message: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("field `{name}`: {message}"))
}

/// The text of a field: strings as they are, null as empty, numbers and booleans printed as
/// Python prints them.
pub fn text_of(name: &str, value: &Value) -> Result<String, PluginError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(if *b { "True".into() } else { "False".into() }),
        _ => Err(field_error(
            name,
            format!("expected text, found {}", kind_of(value)),
        )),
    }
}

/// The text of the row's field `name`, which must be present.
pub fn required_text(row: &Row, name: &str) -> Result<String, PluginError> {
    match row.get(name) {
        Some(v) => text_of(name, v),
        None => Err(field_error(name, "missing")),
    }
}
