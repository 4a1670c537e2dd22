//! The JSON-schema subset plugins describe their config keys with, and the check of a value
//! against it.
//!
//! Checked keywords: `type`, `enum`, `const`, `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `minLength`, `maxLength`, `items`, `minItems`, `maxItems`,
//! `properties`, `required`, `additionalProperties`, `anyOf`. Annotations (`description`,
//! `default`, `title`, `examples`, `deprecated`, `format`, `$comment`) are allowed; any
//! other keyword is refused when the plugin loads, so that nothing a schema says goes
//! unchecked.

use serde_json::Value;

const CHECKED: [&str; 16] = [
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "items",
    "minItems",
    "maxItems",
    "properties",
    "required",
    "additionalProperties",
    "anyOf",
];
const ANNOTATIONS: [&str; 7] = [
    "description",
    "default",
    "title",
    "examples",
    "deprecated",
    "format",
    "$comment",
];

/// Refuses a schema that uses keywords this module does not check; `at` names it.
pub fn check_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Value::Object(map) = schema else {
        return match schema {
            Value::Bool(_) => Ok(()),
            _ => Err(format!("{at}: a schema must be an object")),
        };
    };
    for (keyword, value) in map {
        if !CHECKED.contains(&keyword.as_str()) && !ANNOTATIONS.contains(&keyword.as_str()) {
            return Err(format!(
                "{at}: JSON-schema keyword `{keyword}` is not one axl checks"
            ));
        }
        match keyword.as_str() {
            "items" | "additionalProperties" => check_schema(value, &format!("{at}.{keyword}"))?,
            "properties" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    check_schema(sub, &format!("{at}.{name}"))?;
                }
            }
            "anyOf" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    check_schema(sub, &format!("{at}.anyOf[{i}]"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|f| f.fract() == 0.0),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 60 {
        format!("{}…", &text[..text.floor_char_boundary(60)])
    } else {
        text
    }
}

/// The problems of `value` against `schema`, each with the path below `at`.
pub fn validate(schema: &Value, value: &Value, at: &str) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    check(schema, value, at, &mut problems);
    problems
}

fn check(schema: &Value, value: &Value, at: &str, problems: &mut Vec<(String, String)>) {
    let Value::Object(s) = schema else {
        if schema == &Value::Bool(false) {
            problems.push((at.to_string(), "is not allowed".into()));
        }
        return;
    };
    let mut problem = |message: String| problems.push((at.to_string(), message));
    if let Some(types) = s.get("type") {
        let names: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
            _ => vec![],
        };
        if !names.iter().any(|t| type_matches(t, value)) {
            problem(format!(
                "expected {}, got {}",
                names.join(" or "),
                describe(value)
            ));
            return;
        }
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(describe).collect();
            problem(format!(
                "{} is not one of {}",
                describe(value),
                list.join(", ")
            ));
        }
    }
    if let Some(expected) = s.get("const") {
        if expected != value {
            problem(format!("must be {}", describe(expected)));
        }
    }
    if let Some(x) = value.as_f64() {
        let bound = |k: &str| s.get(k).and_then(Value::as_f64);
        if let Some(min) = bound("minimum").filter(|m| x < *m) {
            problem(format!("{x} is below the minimum {min}"));
        }
        if let Some(max) = bound("maximum").filter(|m| x > *m) {
            problem(format!("{x} is above the maximum {max}"));
        }
        if let Some(min) = bound("exclusiveMinimum").filter(|m| x <= *m) {
            problem(format!("{x} must be above {min}"));
        }
        if let Some(max) = bound("exclusiveMaximum").filter(|m| x >= *m) {
            problem(format!("{x} must be below {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        let n = text.chars().count() as u64;
        if let Some(min) = s
            .get("minLength")
            .and_then(Value::as_u64)
            .filter(|m| n < *m)
        {
            problem(format!("is shorter than {min} characters"));
        }
        if let Some(max) = s
            .get("maxLength")
            .and_then(Value::as_u64)
            .filter(|m| n > *m)
        {
            problem(format!("is longer than {max} characters"));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if let Some(min) = s.get("minItems").and_then(Value::as_u64).filter(|m| n < *m) {
            problem(format!("has fewer than {min} items"));
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64).filter(|m| n > *m) {
            problem(format!("has more than {max} items"));
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{at}[{i}]"), problems);
            }
        }
    }
    if let Some(fields) = value.as_object() {
        let properties = s.get("properties").and_then(Value::as_object);
        for required in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = required.as_str().filter(|n| !fields.contains_key(*n)) {
                problems.push((at.to_string(), format!("`{name}` is required")));
            }
        }
        for (name, field) in fields {
            let path = format!("{at}.{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(sub) => check(sub, field, &path, problems),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = properties
                            .into_iter()
                            .flatten()
                            .map(|(k, _)| k.as_str())
                            .collect();
                        problems.push((path, format!("unknown key (known: {})", known.join(", "))));
                    }
                    Some(sub @ Value::Object(_)) => check(sub, field, &path, problems),
                    _ => {}
                },
            }
        }
    }
    if let Some(Value::Array(options)) = s.get("anyOf") {
        if !options.iter().any(|o| validate(o, value, at).is_empty()) {
            problems.push((at.to_string(), "matches none of the allowed forms".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_with_their_paths() {
        let schema = json!({
            "type": "object",
            "properties": {
                "patience": {"type": "integer", "minimum": 1},
                "mode": {"enum": ["min", "max"]},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["patience"],
            "additionalProperties": false
        });
        assert!(validate(&schema, &json!({"patience": 2, "mode": "min"}), "x").is_empty());
        let problems = validate(
            &schema,
            &json!({"patience": 0, "mode": "avg", "tags": ["a", 1], "extra": true}),
            "x",
        );
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["x.patience", "x.mode", "x.tags[1]", "x.extra"]);
        assert_eq!(
            validate(&schema, &json!({}), "x")[0].1,
            "`patience` is required"
        );
        assert!(validate(&json!({"type": "integer"}), &json!(1.5), "k")[0]
            .1
            .contains("expected integer"));
    }

    #[test]
    fn unchecked_keywords_are_refused() {
        assert!(check_schema(&json!({"type": "string", "description": "d"}), "k").is_ok());
        let err = check_schema(&json!({"properties": {"a": {"pattern": "x+"}}}), "k").unwrap_err();
        assert_eq!(
            err,
            "k.a: JSON-schema keyword `pattern` is not one axl checks"
        );
    }
}
