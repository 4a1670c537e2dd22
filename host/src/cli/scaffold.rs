//! `axl plugin new`: a plugin crate that builds as it is, offline, and loads in `axl train`.
//!
//! The crate depends on the `axl-sdk` next to this axl's sources when they are present (else
//! on the published crate), and carries axl's own `Cargo.lock`, so that `cargo build` needs
//! nothing that a built axl has not already downloaded.

use std::path::Path;

use anyhow::{bail, Context};

/// How the plugin is built and loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A sandboxed WebAssembly component (`--target wasm32-wasip2`).
    Wasm,
    /// A native library: trusted code inside the axl process.
    Dylib,
}

/// What the plugin starts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Loop events: logs the loss and reports a metric.
    Callback,
    /// A reward function.
    Reward,
    /// A dataset `type:`.
    Strategy,
    /// A loss with its gradient (cross-entropy).
    Loss,
}

const LOCKFILE: &str = include_str!("../../../Cargo.lock");

fn sdk_dependency() -> String {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    match sdk.canonicalize() {
        Ok(path) if path.join("Cargo.toml").is_file() => {
            format!("{{ path = \"{}\" }}", path.display())
        }
        _ => format!("\"{}\"", env!("CARGO_PKG_VERSION")),
    }
}

fn cargo_toml(name: &str, kind: Kind) -> String {
    let native = match kind {
        Kind::Dylib => "abi_stable = { version = \"0.11.3\", default-features = false }\n".to_string(),
        Kind::Wasm => "\n[target.'cfg(not(target_arch = \"wasm32\"))'.dependencies]\nabi_stable = { version = \"0.11.3\", default-features = false }\n".to_string(),
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
axl-sdk = {sdk}
{native}
[profile.release]
opt-level = "s"
strip = true

# A crate of its own, even inside another workspace.
[workspace]
"#,
        sdk = sdk_dependency(),
    )
}

/// The plugin's type: the name in camel case with `Plugin` after it, which no name of the
/// SDK's prelude or of its export macro can equal.
fn type_name(name: &str) -> String {
    let camel: String = name
        .split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!("{camel}Plugin")
}

fn lib_rs(name: &str, template: Template) -> String {
    let ty = type_name(name);
    let body = match template {
        Template::Callback => format!(
            r#"impl Plugin for {ty} {{
    fn manifest(&self) -> Manifest {{
        manifest("{name}", env!("CARGO_PKG_VERSION"), &[Hook::OnLog, Hook::PostTrain])
    }}

    fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {{
        if let Some(loss) = event.metrics.get("loss") {{
            host.log(LogLevel::Info, &format!("step {{}}: loss {{loss:.4}}", event.state.global_step));
            host.metric("{name}_steps_seen", event.state.global_step as f64);
        }}
        if event.hook == Hook::PostTrain {{
            host.log(LogLevel::Info, "training is over");
        }}
        Ok(Control::default())
    }}
}}"#
        ),
        Template::Reward => format!(
            r#"impl Plugin for {ty} {{
    fn manifest(&self) -> Manifest {{
        let mut manifest = manifest("{name}", env!("CARGO_PKG_VERSION"), &[Hook::Reward]);
        manifest.provides.rewards = vec!["{name}".into()];
        manifest
    }}

    /// 1 when the completion contains the row's `answer`, 0 otherwise, none without one.
    fn reward(
        &mut self,
        _name: &str,
        batch: &RewardBatch,
        _host: &mut dyn Host,
    ) -> Result<Vec<Option<f64>>, PluginError> {{
        Ok(batch
            .completions
            .iter()
            .enumerate()
            .map(|(i, completion)| {{
                let answer = batch.fields.get(i)?.get("answer")?.as_str()?;
                Some(if completion.contains(answer) {{ 1.0 }} else {{ 0.0 }})
            }})
            .collect())
    }}
}}"#
        ),
        Template::Strategy => format!(
            r#"impl Plugin for {ty} {{
    fn manifest(&self) -> Manifest {{
        let mut manifest = manifest("{name}", env!("CARGO_PKG_VERSION"), &[Hook::FormatExample]);
        manifest.provides.strategies = vec!["{name}".into()];
        manifest
    }}

    /// `{{question, answer}}` rows: the question is context, the answer is trained.
    fn format_example(
        &mut self,
        _dataset: &DatasetEntry,
        row: &Row,
        _host: &mut dyn Host,
    ) -> Result<Formatted, PluginError> {{
        let field = |key: &str| {{
            row.get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| PluginError::new(format!("a row needs a string `{{key}}`")))
        }};
        let prompt = format!("Question: {{}}\nAnswer: ", field("question")?);
        Ok(Formatted::from_pieces([(prompt.as_str(), false), (field("answer")?, true)]))
    }}
}}"#
        ),
        Template::Loss => format!(
            r#"impl Plugin for {ty} {{
    fn manifest(&self) -> Manifest {{
        let mut manifest = manifest("{name}", env!("CARGO_PKG_VERSION"), &[Hook::ComputeLoss]);
        manifest.provides.losses = vec!["{name}".into()];
        manifest
    }}

    /// Cross-entropy of the next token, summed and divided by the step's normalizer, with
    /// its gradient `(softmax − one_hot) / normalizer` at every trained position.
    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        _host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {{
        let vocab = *logits.shape.last().unwrap_or(&1);
        let mut loss = 0.0;
        for row in 0..batch.rows {{
            for t in 0..batch.len.saturating_sub(1) {{
                let target = batch.labels[row * batch.len + t + 1];
                if target < 0 {{
                    continue;
                }}
                let at = (row * batch.len + t) * vocab;
                let x = &logits.data[at..at + vocab];
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
                loss += max + sum.ln() - x[target as usize] as f64;
                let g = &mut grad.data[at..at + vocab];
                for (g, &v) in g.iter_mut().zip(x) {{
                    *g = (((v as f64 - max).exp() / sum) / batch.normalizer) as f32;
                }}
                g[target as usize] -= (1.0 / batch.normalizer) as f32;
            }}
        }}
        Ok(Some(loss / batch.normalizer))
    }}
}}"#
        ),
    };
    format!(
        r#"//! The axl plugin `{name}`.

use axl_sdk::prelude::*;

#[derive(Default)]
struct {ty};

{body}

axl_sdk::export_plugin!({ty});
"#
    )
}

fn readme(name: &str, kind: Kind) -> String {
    let (build, artifact) = match kind {
        Kind::Wasm => (
            "cargo build --release --target wasm32-wasip2",
            format!("target/wasm32-wasip2/release/{name}.wasm"),
        ),
        Kind::Dylib => (
            "cargo build --release",
            format!("target/release/lib{name}{}", std::env::consts::DLL_SUFFIX),
        ),
    };
    format!(
        "# {name}\n\nAn axl plugin.\n\n```\n{build}\naxl plugin check {artifact}\n```\n\nThen list it in a config:\n\n```yaml\nplugins:\n  - ./{name}/{artifact}\n```\n"
    )
}

/// Writes the crate `name` into `dir` (which must not exist yet).
pub fn new(name: &str, kind: Kind, template: Template, dir: &Path) -> anyhow::Result<()> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!(
            "plugin name `{name}`: use lowercase letters, digits and `_`, starting with a letter"
        );
    }
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let files = [
        ("Cargo.toml", cargo_toml(name, kind)),
        ("Cargo.lock", LOCKFILE.to_string()),
        ("src/lib.rs", lib_rs(name, template)),
        ("README.md", readme(name, kind)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        crate::fsio::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let build = match kind {
        Kind::Wasm => "cargo build --release --target wasm32-wasip2",
        Kind::Dylib => "cargo build --release",
    };
    println!(
        "created {} ({:?} {:?} plugin)\nnext: cd {} && {build}",
        dir.display(),
        template,
        kind,
        dir.display()
    );
    Ok(())
}
