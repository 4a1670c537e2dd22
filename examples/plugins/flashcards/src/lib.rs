//! The dataset type `flashcards`: a row `{front, back}` becomes "Front: …\nBack: " (not
//! trained) followed by the back of the card (trained).
//!
//! Build: `cargo build --release --target wasm32-wasip2`, then list
//! `target/wasm32-wasip2/release/flashcards.wasm` under `plugins:` and use `type: flashcards`.

use axl_sdk::prelude::*;

#[derive(Default)]
struct Flashcards;

fn field<'a>(row: &'a Row, key: &str) -> Result<&'a str, PluginError> {
    row.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| PluginError::new(format!("a flashcards row needs a string `{key}`")))
}

impl Plugin for Flashcards {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "flashcards",
            env!("CARGO_PKG_VERSION"),
            &[Hook::FormatExample],
        );
        manifest.description = "dataset type `flashcards`: {front, back} rows".into();
        manifest.provides.strategies = vec!["flashcards".into()];
        manifest
    }

    fn format_example(
        &mut self,
        _dataset: &DatasetEntry,
        row: &Row,
        _host: &mut dyn Host,
    ) -> Result<Formatted, PluginError> {
        let prompt = format!("Front: {}\nBack: ", field(row, "front")?);
        Ok(Formatted::from_pieces([
            (prompt.as_str(), false),
            (field(row, "back")?, true),
        ]))
    }
}

axl_sdk::export_plugin!(Flashcards);
