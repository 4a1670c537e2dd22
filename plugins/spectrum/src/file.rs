//! Spectrum's SNR file: a JSON object from layer (module) name to `{"snr": …, "type": …}`,
//! written by Python's `json` module, so an infinite ratio is the bare word `Infinity`.

use std::collections::BTreeMap;
use std::path::Path;

/// One layer's entry.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSnr {
    /// The layer's module name (`model.layers.3.mlp.down_proj`).
    pub layer: String,
    /// Its signal-to-noise ratio.
    pub snr: f64,
    /// Its type (`mlp.down_proj`): the layers ranked against one another.
    pub kind: String,
}

/// The bare words Python's `json` writes for non-finite numbers, made strings so that a
/// standard JSON parser reads them.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Reads an SNR file's text, in the file's order.
pub fn parse(text: &str) -> Result<Vec<LayerSnr>, String> {
    let value: serde_json::Value =
        serde_json::from_str(&quote_non_finite(text)).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(layers) = value else {
        return Err("expected an object of layer names".into());
    };
    layers
        .into_iter()
        .map(|(layer, entry)| {
            let snr = match entry.get("snr") {
                Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(serde_json::Value::String(s)) => match s.as_str() {
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    "NaN" => f64::NAN,
                    _ => return Err(format!("`{layer}`: `snr` is not a number")),
                },
                _ => return Err(format!("`{layer}`: `snr` is missing or not a number")),
            };
            let kind = entry
                .get("type")
                .and_then(|t| t.as_str())
                .ok_or_else(|| format!("`{layer}`: `type` is missing or not a string"))?
                .to_string();
            Ok(LayerSnr { layer, snr, kind })
        })
        .collect()
}

/// The file's text for `layers`, as Spectrum writes it (4-space indents, `Infinity`).
pub fn render(layers: &[LayerSnr]) -> String {
    const MARK: &str = "\u{0}non-finite\u{0}";
    let mut object = serde_json::Map::new();
    for entry in layers {
        let snr = match entry.snr {
            s if s.is_finite() => serde_json::json!(s),
            s if s.is_nan() => serde_json::json!(format!("{MARK}NaN")),
            s if s > 0.0 => serde_json::json!(format!("{MARK}Infinity")),
            _ => serde_json::json!(format!("{MARK}-Infinity")),
        };
        object.insert(
            entry.layer.clone(),
            serde_json::json!({"snr": snr, "type": entry.kind}),
        );
    }
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(&object, &mut serializer).expect("a map serializes");
    let text = String::from_utf8(out).expect("JSON is UTF-8");
    let mut text = text;
    for word in ["-Infinity", "Infinity", "NaN"] {
        let quoted = serde_json::to_string(&format!("{MARK}{word}")).expect("a string serializes");
        text = text.replace(&quoted, word);
    }
    text + "\n"
}

/// Writes `layers` to `path` atomically: a temporary file beside it, then a rename.
pub fn write(path: &Path, layers: &[LayerSnr]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, render(layers))?;
    std::fs::rename(&partial, path)
}

/// The highest-SNR `fraction` of the layers of each type (rounded down, as Spectrum does),
/// by type; equal ratios keep the file's order.
pub fn top_by_type(layers: &[LayerSnr], fraction: f64) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<&LayerSnr>> = BTreeMap::new();
    for entry in layers {
        by_type.entry(entry.kind.clone()).or_default().push(entry);
    }
    by_type
        .into_iter()
        .map(|(kind, mut entries)| {
            entries.sort_by(|a, b| b.snr.total_cmp(&a.snr));
            let keep = (entries.len() as f64 * fraction).floor() as usize;
            let names = entries[..keep].iter().map(|e| e.layer.clone()).collect();
            (kind, names)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(layer: &str, snr: f64, kind: &str) -> LayerSnr {
        LayerSnr {
            layer: layer.into(),
            snr,
            kind: kind.into(),
        }
    }

    #[test]
    fn spectrums_files_read_back_with_their_infinities() {
        let text = r#"{
    "model.layers.0.input_layernorm": {
        "snr": Infinity,
        "type": "input_layernorm"
    },
    "lm_head": {"snr": 8.28, "type": "lm_head"},
    "odd \"Infinity\" name": {"snr": -Infinity, "type": "NaN"}
}"#;
        let layers = parse(text).unwrap();
        assert_eq!(
            layers[0],
            entry(
                "model.layers.0.input_layernorm",
                f64::INFINITY,
                "input_layernorm"
            )
        );
        assert_eq!(layers[1], entry("lm_head", 8.28, "lm_head"));
        assert_eq!(
            layers[2],
            entry("odd \"Infinity\" name", f64::NEG_INFINITY, "NaN")
        );
        assert_eq!(parse(&render(&layers)).unwrap(), layers);
        assert!(render(&layers).contains("\n        \"snr\": Infinity,\n"));
        assert!(parse("{\"a\": {\"snr\": 1}}")
            .unwrap_err()
            .contains("`a`: `type`"));
    }

    #[test]
    fn the_top_fraction_is_taken_per_type_rounding_down() {
        let layers = [
            entry("l0.q", 0.1, "q"),
            entry("l1.q", 0.3, "q"),
            entry("l2.q", 0.2, "q"),
            entry("l0.norm", f64::INFINITY, "norm"),
            entry("l1.norm", f64::INFINITY, "norm"),
            entry("head", 8.0, "head"),
        ];
        let top = top_by_type(&layers, 0.5);
        assert_eq!(top["q"], vec!["l1.q"]);
        assert_eq!(top["norm"], vec!["l0.norm"]);
        assert!(top["head"].is_empty());
        assert_eq!(top_by_type(&layers, 1.0)["q"], vec!["l1.q", "l2.q", "l0.q"]);
    }
}
