//! `attn_implementation` and the legacy attention flags, as Axolotl's attention contract
//! defines them: canonical backend names only, each legacy flag mapped to its backend with a
//! deprecation warning, a legacy flag beside `attn_implementation` an error, and the computed
//! capability flags not settable.

use serde_yaml::{Mapping, Value};

/// Canonical backend names (a hub kernel path `<org>/<name>` is accepted too).
pub const BACKENDS: &[&str] = &[
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "xformers",
    "sage",
    "s2",
    "fp8",
];

/// Legacy boolean flags and the backend each stands for.
pub const LEGACY_FLAGS: &[(&str, &str)] = &[
    ("flash_attention", "flash_attention_2"),
    ("sdp_attention", "sdpa"),
    ("xformers_attention", "xformers"),
    ("flex_attention", "flex_attention"),
    ("sage_attention", "sage"),
    ("s2_attention", "s2"),
    ("eager_attention", "eager"),
];

/// Flags Axolotl computes from the backend; a configuration cannot set them.
pub const COMPUTED_FLAGS: &[&str] = &[
    "attn_supports_packing",
    "attn_uses_flash_lib",
    "attn_needs_dtype_cast",
];

/// Short names users try, with the canonical name to use instead.
const ALIASES: &[(&str, &str)] = &[
    ("flash", "flash_attention_2"),
    ("fa2", "flash_attention_2"),
    ("fa3", "flash_attention_3"),
    ("flash_attention", "flash_attention_2"),
    ("flex", "flex_attention"),
    ("sdp", "sdpa"),
    ("torch", "sdpa"),
];

/// The resolved backend, warnings, and problems as `(key, message)`.
#[derive(Debug, Default, PartialEq)]
pub struct Resolved {
    /// The backend, when the configuration names one.
    pub backend: Option<String>,
    /// Deprecation warnings.
    pub warnings: Vec<String>,
    /// Problems.
    pub problems: Vec<(String, String)>,
}

/// Resolves the attention keys of a configuration's top-level mapping and removes the legacy
/// flags from it (they are replaced by the backend).
pub fn resolve(mapping: &mut Mapping) -> Resolved {
    let mut out = Resolved::default();
    for key in COMPUTED_FLAGS {
        if mapping.contains_key(*key) {
            out.problems.push((
                key.to_string(),
                "computed from attn_implementation; it cannot be set".into(),
            ));
        }
    }
    let explicit = match mapping.get("attn_implementation") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            if BACKENDS.contains(&name.as_str()) || name.contains('/') {
                Some(name.clone())
            } else {
                let hint = ALIASES
                    .iter()
                    .find(|(alias, _)| alias == name)
                    .map(|(_, canonical)| format!("; use `{canonical}`"))
                    .unwrap_or_else(|| {
                        format!("; one of {} or a hub kernel path", BACKENDS.join(", "))
                    });
                out.problems.push((
                    "attn_implementation".into(),
                    format!("`{name}` is not a backend name{hint}"),
                ));
                None
            }
        }
        Some(other) => {
            out.problems.push((
                "attn_implementation".into(),
                format!("expected a backend name, found {other:?}"),
            ));
            None
        }
    };
    let mut legacy = Vec::new();
    for (flag, backend) in LEGACY_FLAGS {
        match mapping.remove(*flag) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => legacy.push((*flag, *backend)),
            Some(other) => out.problems.push((
                flag.to_string(),
                format!("expected true or false, found {other:?}"),
            )),
        }
    }
    if let Some((flag, _)) = legacy
        .first()
        .filter(|_| mapping.contains_key("attn_implementation"))
    {
        out.problems.push((
            flag.to_string(),
            "cannot be combined with attn_implementation; pick one (the legacy flags are deprecated)".into(),
        ));
        return out;
    }
    if legacy.len() > 1 {
        let names: Vec<&str> = legacy.iter().map(|(f, _)| *f).collect();
        out.problems.push((
            legacy[1].0.to_string(),
            format!(
                "several attention flags are set ({}); pick one",
                names.join(", ")
            ),
        ));
        return out;
    }
    out.backend = explicit;
    if let Some((flag, backend)) = legacy.first() {
        out.warnings.push(format!(
            "`{flag}: true` is deprecated; use `attn_implementation: {backend}`"
        ));
        out.backend = Some(backend.to_string());
    }
    out
}
