//! The config's `plugins:` list: which plugin each entry names (a built-in, an Axolotl import
//! path, a native library or a WebAssembly component) and its settings.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What to do when a plugin fails in an observational hook (a loop event, `post_train`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the run (the default).
    #[default]
    Abort,
    /// Report the failure and go on without the plugin's part in that call.
    Skip,
}

/// What a WebAssembly plugin may touch. Nothing is granted by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// Directories (or files' directories) readable, at the path as written.
    pub allow_read: Vec<PathBuf>,
    /// Directories writable; each must lie under the run's `output_dir`.
    pub allow_write: Vec<PathBuf>,
    /// Host names (or `host:port`) the plugin may connect to.
    pub allow_net: Vec<String>,
    /// Environment variables passed through.
    pub allow_env: Vec<String>,
    /// Give the plugin the real clocks (otherwise time stands still).
    pub allow_clock: bool,
    /// Longest a single hook call may run, in milliseconds.
    pub timeout_ms: u64,
    /// Most linear memory the plugin may use, in MiB.
    pub max_memory_mb: u64,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self {
            allow_read: Vec::new(),
            allow_write: Vec::new(),
            allow_net: Vec::new(),
            allow_env: Vec::new(),
            allow_clock: false,
            timeout_ms: 30_000,
            max_memory_mb: 1024,
        }
    }
}

/// Where a plugin comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A built-in plugin, by its name.
    Builtin(String),
    /// A native library.
    Native(PathBuf),
    /// A WebAssembly component.
    Wasm(PathBuf),
}

/// One entry of `plugins:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSpec {
    /// The entry as written (a name or a path), for messages.
    pub entry: String,
    /// Where the plugin comes from.
    pub source: Source,
    /// The sandbox, for WebAssembly plugins.
    pub sandbox: Sandbox,
    /// What a failure in an observational hook does.
    pub on_error: OnError,
}

impl PluginSpec {
    /// The hosts the plugin may reach through the `http` host service: its `allow_net` for a
    /// WebAssembly component, anything (`None`) for trusted built-in and native code.
    pub fn net_grants(&self) -> Option<&[String]> {
        matches!(self.source, Source::Wasm(_)).then_some(self.sandbox.allow_net.as_slice())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryMap {
    name: Option<String>,
    path: Option<String>,
    #[serde(default)]
    allow_read: Vec<String>,
    #[serde(default)]
    allow_write: Vec<String>,
    #[serde(default)]
    allow_net: Vec<String>,
    #[serde(default)]
    allow_env: Vec<String>,
    allow_clock: Option<bool>,
    timeout_ms: Option<u64>,
    max_memory_mb: Option<u64>,
    #[serde(default)]
    on_error: OnError,
}

const NATIVE_EXTENSIONS: [&str; 3] = ["so", "dylib", "dll"];

fn looks_like_path(entry: &str) -> bool {
    entry.contains('/')
        || entry.contains('\\')
        || Path::new(entry)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "wasm" || NATIVE_EXTENSIONS.contains(&e))
}

fn path_source(entry: &str, resolve: &dyn Fn(&str) -> PathBuf) -> Result<Source, String> {
    let path = resolve(entry);
    match path.extension().and_then(|e| e.to_str()) {
        Some("wasm") => Ok(Source::Wasm(path)),
        Some(e) if NATIVE_EXTENSIONS.contains(&e) => Ok(Source::Native(path)),
        _ if path.is_dir() => Err(format!(
            "`{entry}` is a directory; build the plugin crate (`cargo build --release`, with \
             `--target wasm32-wasip2` for a sandboxed plugin) and give the path of the .wasm or \
             native library it produces"
        )),
        _ => Err(format!(
            "`{entry}` is neither a .wasm component nor a native library (.so, .dylib, .dll)"
        )),
    }
}

/// Reads one `plugins:` entry. `resolve` turns a path as written into the path to open.
pub fn parse_entry(
    value: &serde_yaml::Value,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<PluginSpec, String> {
    if let Some(entry) = value.as_str() {
        let source = if looks_like_path(entry) {
            path_source(entry, resolve)?
        } else {
            Source::Builtin(entry.to_string())
        };
        return Ok(PluginSpec {
            entry: entry.to_string(),
            source,
            sandbox: Sandbox::default(),
            on_error: OnError::Abort,
        });
    }
    let map: EntryMap = serde_yaml::from_value(value.clone()).map_err(|e| {
        let message = e.to_string();
        match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        }
    })?;
    let (entry, source) = match (map.name, map.path) {
        (Some(name), None) => (name.clone(), Source::Builtin(name)),
        (None, Some(path)) => (path.clone(), path_source(&path, resolve)?),
        _ => return Err("give exactly one of `name:` (a built-in plugin) or `path:`".into()),
    };
    let defaults = Sandbox::default();
    let sandbox = Sandbox {
        allow_read: map.allow_read.iter().map(PathBuf::from).collect(),
        allow_write: map.allow_write.iter().map(PathBuf::from).collect(),
        allow_net: map.allow_net,
        allow_env: map.allow_env,
        allow_clock: map.allow_clock.unwrap_or(false),
        timeout_ms: map.timeout_ms.unwrap_or(defaults.timeout_ms),
        max_memory_mb: map.max_memory_mb.unwrap_or(defaults.max_memory_mb),
    };
    if !matches!(source, Source::Wasm(_)) && sandbox != defaults {
        return Err(format!(
            "`{entry}`: sandbox settings (allow_*, timeout_ms, max_memory_mb) apply to .wasm \
             plugins only; built-in and native plugins run as trusted code in the axl process"
        ));
    }
    if sandbox.timeout_ms == 0 || sandbox.max_memory_mb == 0 {
        return Err(format!(
            "`{entry}`: timeout_ms and max_memory_mb must be above 0"
        ));
    }
    Ok(PluginSpec {
        entry,
        source,
        sandbox,
        on_error: map.on_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PluginSpec, String> {
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        parse_entry(&value, &|p| PathBuf::from("/run").join(p))
    }

    #[test]
    fn names_paths_and_maps_are_told_apart() {
        assert_eq!(
            parse("liger").unwrap().source,
            Source::Builtin("liger".into())
        );
        assert_eq!(
            parse("axolotl.integrations.liger.LigerPlugin")
                .unwrap()
                .source,
            Source::Builtin("axolotl.integrations.liger.LigerPlugin".into())
        );
        assert_eq!(
            parse("./r/reward.wasm").unwrap().source,
            Source::Wasm("/run/./r/reward.wasm".into())
        );
        assert_eq!(
            parse("libcb.so").unwrap().source,
            Source::Native("/run/libcb.so".into())
        );
        let spec =
            parse("{path: r.wasm, allow_read: [data], timeout_ms: 5, on_error: skip}").unwrap();
        assert_eq!(spec.sandbox.allow_read, vec![PathBuf::from("data")]);
        assert_eq!(spec.sandbox.timeout_ms, 5);
        assert_eq!(spec.on_error, OnError::Skip);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse("{path: r.wasm, alow_read: [x]}")
            .unwrap_err()
            .contains("alow_read"));
        assert!(parse("{name: liger, timeout_ms: 5}")
            .unwrap_err()
            .contains(".wasm plugins only"));
        assert!(parse("{name: a, path: b.wasm}")
            .unwrap_err()
            .contains("exactly one"));
        assert!(parse("./x.txt").unwrap_err().contains("neither"));
    }
}
