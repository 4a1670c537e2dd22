//! The axl configuration: an Axolotl YAML file read with Axolotl's key names, defaults and
//! meanings. Every problem is collected with its key and line and reported together; a key
//! that is not an Axolotl key is an error naming the nearest known one.

pub mod attention;
pub mod axolotl_keys;
pub mod schema;
pub mod training;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::data::config::{DatasetConfig, StringOrList, DATASET_KEYS, UNIMPLEMENTED_DATASET_KEYS};
use crate::data::pipeline::ExcessLength;
use crate::model::lora::{LoraSettings, TargetModules};

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// The key, as a dotted path.
    pub key: String,
    /// The 1-based line of the key, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.line {
                Some(line) => write!(f, "\n  line {line}: {}: {}", p.key, p.message)?,
                None => write!(f, "\n  {}: {}", p.key, p.message)?,
            }
        }
        Ok(())
    }
}

/// Special tokens to set on the tokenizer (`special_tokens`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
    /// `additional_special_tokens`.
    pub additional_special_tokens: Option<Vec<String>>,
}

/// The keys axl reads, with Axolotl's defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct AxlConfig {
    /// The model to start from: a directory or a Hub id.
    pub base_model: Option<String>,
    /// Where `config.json` is, if not with the weights.
    pub base_model_config: Option<String>,
    /// Where the tokenizer is, if not with the weights.
    pub tokenizer_config: Option<String>,
    /// transformers' auto class (informational).
    pub model_type: Option<String>,
    /// transformers' tokenizer class (informational).
    pub tokenizer_type: Option<String>,
    /// Remote code is never run; `true` is accepted only as a no-op for the supported models.
    pub trust_remote_code: Option<bool>,
    /// `lora` (or unset for full fine-tuning).
    pub adapter: Option<String>,
    /// A trained adapter to continue from or to use.
    pub lora_model_dir: Option<String>,
    /// LoRA rank.
    pub lora_r: Option<usize>,
    /// LoRA scaling numerator.
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    pub lora_dropout: Option<f32>,
    /// Modules to adapt: names, or one regular expression.
    pub lora_target_modules: Option<StringOrList>,
    /// Adapt every linear layer but the output head.
    pub lora_target_linear: Option<bool>,
    /// Modules trained in full and saved with the adapter.
    pub lora_modules_to_save: Option<Vec<String>>,
    /// Conv1D-style weights (unsupported when true).
    pub lora_fan_in_fan_out: Option<bool>,
    /// rsLoRA scaling.
    pub peft_use_rslora: Option<bool>,
    /// DoRA (unsupported when true).
    pub peft_use_dora: Option<bool>,
    /// Only adapt these layers.
    pub peft_layers_to_transform: Option<Vec<usize>>,
    /// 8-bit loading (unsupported when true).
    pub load_in_8bit: Option<bool>,
    /// 4-bit loading (unsupported when true).
    pub load_in_4bit: Option<bool>,
    /// Start from randomly initialized weights (as transformers initializes them) instead of
    /// the checkpoint's: pretraining from scratch. Only `config.json` and the tokenizer of
    /// `base_model` are read.
    pub reinit_weights: Option<bool>,
    /// Where outputs go.
    pub output_dir: String,
    /// Maximum tokens per sample.
    pub sequence_len: usize,
    /// A chat template name or `tokenizer_default` / `jinja`.
    pub chat_template: Option<String>,
    /// Jinja text or file for `chat_template: jinja`.
    pub chat_template_jinja: Option<String>,
    /// Training datasets.
    pub datasets: Option<Vec<DatasetConfig>>,
    /// Evaluation datasets.
    pub test_datasets: Option<Vec<DatasetConfig>>,
    /// A dataset streamed and tokenized on the fly while training (needs `max_steps`).
    pub pretraining_dataset: Option<Vec<DatasetConfig>>,
    /// Stop training after this many optimizer steps.
    pub max_steps: Option<usize>,
    /// Where prepared datasets are cached.
    pub dataset_prepared_path: Option<String>,
    /// Train on prompts too.
    pub train_on_inputs: bool,
    /// `drop`, `truncate` or `raise` for examples longer than `sequence_len`.
    pub excess_length_strategy: Option<ExcessLength>,
    /// Examples shorter than this are left out.
    pub min_sample_len: Option<usize>,
    /// Shuffle the merged datasets.
    pub shuffle_merged_datasets: bool,
    /// Pack several examples into each sequence.
    pub sample_packing: bool,
    /// Pack evaluation examples too (defaults to `sample_packing`).
    pub eval_sample_packing: Option<bool>,
    /// Pad every batch to `sequence_len`.
    pub pad_to_sequence_len: Option<bool>,
    /// Examples (or packed bins) per micro-batch.
    pub micro_batch_size: usize,
    /// Threads for preprocessing.
    pub dataset_processes: Option<usize>,
    /// Tokens that end a turn in the chat template (the tokenizer's EOS by default).
    pub eot_tokens: Option<Vec<String>>,
    /// Extra variables for every chat template rendering (e.g. `enable_thinking: false`).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Random seed.
    pub seed: Option<u64>,
    /// Special tokens to set.
    pub special_tokens: Option<SpecialTokens>,
    /// The training keys.
    #[serde(flatten)]
    pub training: training::TrainingConfig,
}

impl Default for AxlConfig {
    fn default() -> Self {
        Self {
            base_model: None,
            base_model_config: None,
            tokenizer_config: None,
            model_type: None,
            tokenizer_type: None,
            trust_remote_code: None,
            adapter: None,
            lora_model_dir: None,
            lora_r: None,
            lora_alpha: None,
            lora_dropout: None,
            lora_target_modules: None,
            lora_target_linear: None,
            lora_modules_to_save: None,
            lora_fan_in_fan_out: None,
            peft_use_rslora: None,
            peft_use_dora: None,
            peft_layers_to_transform: None,
            load_in_8bit: None,
            load_in_4bit: None,
            reinit_weights: None,
            output_dir: DEFAULT_OUTPUT_DIR.into(),
            sequence_len: 512,
            chat_template: None,
            chat_template_jinja: None,
            datasets: None,
            test_datasets: None,
            pretraining_dataset: None,
            max_steps: None,
            dataset_prepared_path: None,
            train_on_inputs: false,
            excess_length_strategy: None,
            min_sample_len: None,
            shuffle_merged_datasets: true,
            sample_packing: false,
            eval_sample_packing: None,
            pad_to_sequence_len: None,
            micro_batch_size: 1,
            dataset_processes: None,
            eot_tokens: None,
            chat_template_kwargs: None,
            seed: None,
            special_tokens: None,
            training: Default::default(),
        }
    }
}

/// The keys [`AxlConfig`] reads.
pub const AXL_KEYS: &[&str] = &[
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "model_type",
    "tokenizer_type",
    "trust_remote_code",
    "adapter",
    "lora_model_dir",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "lora_fan_in_fan_out",
    "peft_use_rslora",
    "peft_use_dora",
    "peft_layers_to_transform",
    "load_in_8bit",
    "load_in_4bit",
    "reinit_weights",
    "output_dir",
    "sequence_len",
    "chat_template",
    "chat_template_jinja",
    "datasets",
    "test_datasets",
    "pretraining_dataset",
    "max_steps",
    "dataset_prepared_path",
    "train_on_inputs",
    "excess_length_strategy",
    "min_sample_len",
    "shuffle_merged_datasets",
    "sample_packing",
    "eval_sample_packing",
    "pad_to_sequence_len",
    "micro_batch_size",
    "dataset_processes",
    "eot_tokens",
    "chat_template_kwargs",
    "seed",
    "special_tokens",
];

/// A loaded configuration and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    /// The typed keys.
    pub config: AxlConfig,
    /// The file.
    pub path: PathBuf,
    /// The directory relative paths in the file are resolved against (the working directory,
    /// as in Axolotl).
    pub base_dir: PathBuf,
    /// The attention backend (`attn_implementation`, or what a legacy flag stands for). axl's
    /// CPU runtime computes the same exact attention, with packing, whatever the backend.
    pub attn_implementation: Option<String>,
    /// Deprecation warnings for the user.
    pub warnings: Vec<String>,
    /// The `plugins:` entries, in order.
    pub plugins: Vec<crate::plugins::PluginSpec>,
    /// The keys plugins own, checked against their schemas, as JSON.
    pub plugin_settings: serde_json::Map<String, serde_json::Value>,
    /// The whole configuration as JSON (overrides applied), as plugins receive it.
    pub json: serde_json::Value,
    /// Dataset types the plugins provide (set when the plugins are loaded for a run).
    pub plugin_formats: Option<crate::data::strategy::PluginFormats>,
    /// A hash of the code of the plugins that shape the prepared data.
    pub plugin_fingerprint: String,
}

/// Every top-level key axl itself reads.
pub fn host_keys() -> impl Iterator<Item = &'static str> {
    AXL_KEYS
        .iter()
        .chain(training::TRAINING_KEYS)
        .chain(attention::COMPUTED_FLAGS)
        .copied()
        .chain([
            "datasets",
            "test_datasets",
            "pretraining_dataset",
            "plugins",
            "attn_implementation",
        ])
}

/// Where a run writes when `output_dir` is not set (Axolotl's default).
pub const DEFAULT_OUTPUT_DIR: &str = "./model-out";

/// The config keys plugins own: key to the owning plugin and the key's JSON schema.
pub type PluginKeys = std::collections::BTreeMap<String, (String, serde_json::Value)>;

/// What loading the config's plugins needs to know.
pub struct PluginLoadRequest<'a> {
    /// The `plugins:` entries.
    pub specs: &'a [crate::plugins::PluginSpec],
    /// The directory relative paths are resolved against.
    pub base_dir: &'a Path,
    /// The run's output directory, resolved.
    pub output_dir: PathBuf,
}

/// Loads a config's plugins and returns the keys they own, or one message per failure.
pub type PluginLoader<'l> =
    dyn FnMut(&PluginLoadRequest<'_>) -> Result<PluginKeys, Vec<String>> + 'l;

/// A [`PluginLoader`] that loads the plugins only to learn their keys.
pub fn load_plugins_for_keys(request: &PluginLoadRequest<'_>) -> Result<PluginKeys, Vec<String>> {
    if request.specs.is_empty() {
        return Ok(PluginKeys::new());
    }
    let manager =
        crate::plugins::PluginManager::load(request.specs, request.base_dir, &request.output_dir)
            .map_err(|errors| errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    manager.config_keys()
}

fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// The line of `key` inside entry `index` of the list under top-level key `list`.
fn nested_line(text: &str, list: &str, index: usize, key: &str) -> Option<usize> {
    let start = line_of(text, list)?;
    let mut entry: Option<usize> = None;
    for (i, line) in text.lines().enumerate().skip(start) {
        if !line.is_empty() && !line.starts_with([' ', '\t', '-', '#']) {
            break;
        }
        let trimmed = line.trim_start();
        let body = match trimmed.strip_prefix("- ") {
            Some(rest) => {
                entry = Some(entry.map_or(0, |e| e + 1));
                rest.trim_start()
            }
            None => trimmed,
        };
        if entry == Some(index)
            && body
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        {
            return Some(i + 1);
        }
    }
    None
}

fn check_datasets(list: &str, value: &Value, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Value::Sequence(entries) = value else {
        if !value.is_null() {
            problems.push(Problem {
                key: list.into(),
                line: line_of(text, list),
                message: "expected a list of datasets".into(),
            });
        }
        return problems;
    };
    for (index, entry) in entries.iter().enumerate() {
        let Value::Mapping(map) = entry else {
            problems.push(Problem {
                key: format!("{list}[{index}]"),
                line: line_of(text, list),
                message: "expected a mapping of dataset keys".into(),
            });
            continue;
        };
        for (key, value) in map {
            let name = key.as_str().unwrap_or_default();
            let path = format!("{list}[{index}].{name}");
            let line = nested_line(text, list, index, name);
            if let Some((_, why)) = UNIMPLEMENTED_DATASET_KEYS.iter().find(|(k, _)| *k == name) {
                problems.push(Problem {
                    key: path,
                    line,
                    message: format!("not implemented yet: {why}"),
                });
            } else if DATASET_KEYS.contains(&name) {
                let mut single = Mapping::new();
                single.insert(key.clone(), value.clone());
                if let Err(e) = serde_yaml::from_value::<DatasetConfig>(Value::Mapping(single)) {
                    problems.push(Problem {
                        key: path,
                        line,
                        message: clean_message(e.to_string()),
                    });
                }
            } else {
                let hint = DATASET_KEYS
                    .iter()
                    .map(|k| (strsim::jaro_winkler(name, k), *k))
                    .filter(|(score, _)| *score > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, k)| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                problems.push(Problem {
                    key: path,
                    line,
                    message: format!("unknown dataset key{hint}"),
                });
            }
        }
    }
    problems
}

fn nearest_key(key: &str) -> Option<&'static str> {
    AXL_KEYS
        .iter()
        .chain(axolotl_keys::AXOLOTL_KEYS.iter())
        .map(|k| (strsim::jaro_winkler(key, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Axolotl keys that change nothing in a single-process axl run, accepted with any value.
const NO_EFFECT_KEYS: &[&str] = &["strict", "local_rank"];

/// Whether a value leaves a feature off: empty, `false`, or an empty string, list or mapping.
fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    }
}

/// Command-line overrides (`--learning-rate 1e-4`, `--micro_batch_size=2`, `--a__b value` for
/// the nested key `a.b`, a bare `--flag` for `true`) as key paths and YAML values.
pub fn parse_overrides(args: &[String]) -> Result<Vec<(Vec<String>, Value)>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(body) = arg.strip_prefix("--").filter(|b| !b.is_empty()) else {
            return Err(format!(
                "unexpected argument `{arg}`; overrides look like --learning-rate 1e-4"
            ));
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, v.to_string()),
            None => match args.get(i + 1) {
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    (body, next.clone())
                }
                _ => (body, "true".to_string()),
            },
        };
        let keys: Vec<String> = name.split("__").map(|k| k.replace('-', "_")).collect();
        if keys.iter().any(String::is_empty) {
            return Err(format!("`--{name}` does not name a key"));
        }
        let value: Value = serde_yaml::from_str(&value)
            .map_err(|e| format!("--{name}: `{value}` is not a YAML value: {e}"))?;
        out.push((keys, value));
        i += 1;
    }
    Ok(out)
}

/// `p` resolved against `base_dir`, with `~` expanded and `.` components dropped.
fn resolve_against(base_dir: &Path, p: &str) -> PathBuf {
    let expanded = match p.strip_prefix("~/") {
        Some(rest) => std::env::var("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|_| PathBuf::from(p)),
        None => PathBuf::from(p),
    };
    let joined = if expanded.is_absolute() {
        expanded
    } else {
        base_dir.join(expanded)
    };
    joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// The `plugins:` entries of a config and the keys their plugins own, loaded by `loader`.
fn plugins_of(
    mapping: &Mapping,
    text: &str,
    base_dir: &Path,
    loader: &mut PluginLoader<'_>,
) -> Result<(Vec<crate::plugins::PluginSpec>, PluginKeys), Vec<Problem>> {
    let line = line_of(text, "plugins");
    let problem = |message: String| Problem {
        key: "plugins".into(),
        line,
        message,
    };
    let entries = match mapping.get("plugins") {
        None | Some(Value::Null) => return Ok((Vec::new(), PluginKeys::new())),
        Some(Value::Sequence(entries)) => entries,
        Some(_) => return Err(vec![problem("expected a list of plugins".into())]),
    };
    let resolve = |p: &str| resolve_against(base_dir, p);
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match crate::plugins::spec::parse_entry(entry, &resolve) {
            Ok(spec) => specs.push(spec),
            Err(message) => problems.push(problem(format!("entry {}: {message}", i + 1))),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let output_dir = mapping
        .get("output_dir")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_OUTPUT_DIR);
    let request = PluginLoadRequest {
        specs: &specs,
        base_dir,
        output_dir: resolve(output_dir),
    };
    let keys = loader(&request)
        .map_err(|messages| messages.into_iter().map(problem).collect::<Vec<_>>())?;
    let mut problems = Vec::new();
    for (key, (plugin, _)) in &keys {
        if AXL_KEYS.contains(&key.as_str())
            || training::TRAINING_KEYS.contains(&key.as_str())
            || key == "datasets"
            || key == "plugins"
        {
            problems.push(problem(format!(
                "plugin `{plugin}` claims the key `{key}`, which axl itself reads"
            )));
        }
    }
    if problems.is_empty() {
        Ok((specs, keys))
    } else {
        Err(problems)
    }
}

/// Strips serde_yaml's own position suffix; the problem carries the line.
fn clean_message(message: String) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    }
}

impl LoadedConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_overrides(path, &[])
    }

    /// Validates the text of a configuration file; `path` names it in errors.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::from_str_with_overrides(text, path, &[])
    }

    /// Reads and validates a configuration file with command-line overrides applied
    /// (see [`parse_overrides`]).
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_with_plugins(path, overrides, &mut load_plugins_for_keys)
    }

    /// [`Self::from_str`] with command-line overrides applied before validation.
    pub fn from_str_with_overrides(
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        Self::from_str_with_plugins(text, path, overrides, &mut load_plugins_for_keys)
    }

    /// Reads and validates a configuration file whose plugins `loader` loads: the plugins'
    /// keys are checked with the rest, against the plugins' schemas.
    pub fn load_with_plugins(
        path: &Path,
        overrides: &[String],
        loader: &mut PluginLoader<'_>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                key: "(file)".into(),
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::from_str_with_plugins(&text, path, overrides, loader)
    }

    /// [`Self::from_str_with_overrides`], the plugins loaded by `loader`.
    pub fn from_str_with_plugins(
        text: &str,
        path: &Path,
        overrides: &[String],
        loader: &mut PluginLoader<'_>,
    ) -> Result<Self, ConfigError> {
        let error = |problems| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let parsed = parse_overrides(overrides).map_err(|message| {
            error(vec![Problem {
                key: "(command line)".into(),
                line: None,
                message,
            }])
        })?;
        let mut root: Value = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            error(vec![Problem {
                key: "(syntax)".into(),
                line,
                message: clean_message(e.to_string()),
            }])
        })?;
        if !parsed.is_empty() {
            if root.is_null() {
                root = Value::Mapping(Mapping::new());
            }
            for (keys, value) in parsed {
                let mut at = &mut root;
                for (i, key) in keys.iter().enumerate() {
                    let Value::Mapping(map) = at else {
                        return Err(error(vec![Problem {
                            key: keys[..i].join("."),
                            line: None,
                            message:
                                "the command line sets a key inside it, but it is not a mapping"
                                    .into(),
                        }]));
                    };
                    let k = Value::String(key.clone());
                    if i + 1 == keys.len() {
                        map.insert(k, value.clone());
                        break;
                    }
                    at = map
                        .entry(k)
                        .or_insert_with(|| Value::Mapping(Mapping::new()));
                }
            }
        }
        let mut mapping = match root {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(error(vec![Problem {
                    key: "(file)".into(),
                    line: None,
                    message: "expected a mapping of keys to values".into(),
                }]))
            }
        };
        let base_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let (plugins, plugin_keys) =
            plugins_of(&mapping, text, &base_dir, loader).map_err(error)?;
        let json = serde_json::to_value(&mapping).unwrap_or_default();
        let mut plugin_settings = serde_json::Map::new();
        let mut problems = Vec::new();
        let attention = attention::resolve(&mut mapping);
        for (key, message) in &attention.problems {
            problems.push(Problem {
                key: key.clone(),
                line: line_of(text, key),
                message: message.clone(),
            });
        }
        for (key, value) in &mapping {
            let Some(name) = key.as_str() else {
                problems.push(Problem {
                    key: format!("{key:?}"),
                    line: None,
                    message: "keys must be strings".into(),
                });
                continue;
            };
            let line = line_of(text, name);
            if name == "plugins" {
                continue;
            }
            if let Some((plugin, schema)) = plugin_keys.get(name) {
                let value = serde_json::to_value(value).unwrap_or_default();
                for (key, message) in schema::validate(schema, &value, name) {
                    problems.push(Problem {
                        key,
                        line,
                        message: format!("{message} (a key of plugin `{plugin}`)"),
                    });
                }
                plugin_settings.insert(name.to_string(), value);
                continue;
            }
            if name == "datasets" || name == "test_datasets" || name == "pretraining_dataset" {
                problems.extend(check_datasets(name, value, text));
                continue;
            }
            if AXL_KEYS.contains(&name) || training::TRAINING_KEYS.contains(&name) {
                let mut single = Mapping::new();
                single.insert(key.clone(), value.clone());
                if let Err(e) = serde_yaml::from_value::<AxlConfig>(Value::Mapping(single)) {
                    problems.push(Problem {
                        key: name.into(),
                        line,
                        message: clean_message(e.to_string()),
                    });
                }
            } else if name == "attn_implementation" || attention::COMPUTED_FLAGS.contains(&name) {
                // Resolved above.
            } else if axolotl_keys::AXOLOTL_KEYS.contains(&name) {
                if !is_off(value) && !NO_EFFECT_KEYS.contains(&name) {
                    problems.push(Problem {
                        key: name.into(),
                        line,
                        message:
                            "an Axolotl key axl does not implement yet; remove it or leave it empty"
                                .into(),
                    });
                }
            } else {
                let hint = nearest_key(name)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                problems.push(Problem {
                    key: name.into(),
                    line,
                    message: format!("unknown key{hint}"),
                });
            }
        }
        if !problems.is_empty() {
            return Err(error(problems));
        }
        mapping.remove("plugins");
        for key in plugin_settings.keys() {
            mapping.remove(key.as_str());
        }
        let config: AxlConfig = serde_yaml::from_value(Value::Mapping(mapping)).map_err(|e| {
            error(vec![Problem {
                key: "(file)".into(),
                line: None,
                message: clean_message(e.to_string()),
            }])
        })?;
        let problems = validate(&config, text);
        if !problems.is_empty() {
            return Err(error(problems));
        }
        Ok(Self {
            config,
            path: path.to_path_buf(),
            base_dir,
            attn_implementation: attention.backend,
            warnings: attention.warnings,
            plugins,
            plugin_settings,
            json,
            plugin_formats: None,
            plugin_fingerprint: String::new(),
        })
    }

    /// `p` resolved against the working directory of the run, with `~` expanded.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        resolve_against(&self.base_dir, p)
    }

    /// `output_dir`, resolved.
    pub fn output_dir(&self) -> PathBuf {
        self.resolve_path(&self.config.output_dir)
    }

    /// The LoRA settings, when `adapter: lora`.
    pub fn lora_settings(&self) -> Option<LoraSettings> {
        lora_settings(&self.config)
    }
}

fn lora_settings(c: &AxlConfig) -> Option<LoraSettings> {
    if c.adapter.as_deref() != Some("lora") {
        return None;
    }
    let target = if c.lora_target_linear == Some(true) {
        TargetModules::AllLinear
    } else {
        match c.lora_target_modules.clone()? {
            StringOrList::One(s) if s == "all-linear" => TargetModules::AllLinear,
            StringOrList::One(s) => TargetModules::Regex(s),
            StringOrList::Many(v) => TargetModules::Names(v),
        }
    };
    Some(LoraSettings {
        r: c.lora_r?,
        alpha: c.lora_alpha.unwrap_or(c.lora_r? as f64),
        dropout: c.lora_dropout.unwrap_or(0.0),
        target,
        modules_to_save: c.lora_modules_to_save.clone().unwrap_or_default(),
        use_rslora: c.peft_use_rslora.unwrap_or(false),
        layers_to_transform: c.peft_layers_to_transform.clone(),
    })
}

fn validate(c: &AxlConfig, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut add = |key: &str, message: String| {
        problems.push(Problem {
            key: key.into(),
            line: line_of(text, key),
            message,
        })
    };
    match c.adapter.as_deref() {
        None | Some("lora") => {}
        Some("qlora") => add("adapter", "`qlora` needs 4-bit quantized base weights, which axl does not implement yet; use `lora`".into()),
        Some(other) => add("adapter", format!("`{other}` is not supported; use `lora`, or leave it unset for full fine-tuning")),
    }
    if c.adapter.as_deref() == Some("lora") {
        if c.lora_r.is_none() {
            add("lora_r", "required when adapter is lora".into());
        }
        if c.lora_r == Some(0) {
            add("lora_r", "must be at least 1".into());
        }
        if c.lora_target_linear != Some(true) && c.lora_target_modules.is_none() {
            add(
                "lora_target_modules",
                "set lora_target_modules, or lora_target_linear: true".into(),
            );
        }
        if let Some(d) = c.lora_dropout {
            if !(0.0..1.0).contains(&d) {
                add("lora_dropout", format!("{d} is not in [0, 1)"));
            }
        }
    }
    for (key, on, why) in [
        (
            "load_in_8bit",
            c.load_in_8bit,
            "8-bit quantized loading is not implemented yet",
        ),
        (
            "load_in_4bit",
            c.load_in_4bit,
            "4-bit quantized loading is not implemented yet",
        ),
        (
            "peft_use_dora",
            c.peft_use_dora,
            "DoRA is not implemented yet",
        ),
        (
            "lora_fan_in_fan_out",
            c.lora_fan_in_fan_out,
            "Conv1D (fan-in/fan-out) weights are not supported by the implemented architectures",
        ),
    ] {
        if on == Some(true) {
            add(key, why.into());
        }
    }
    if c.pretraining_dataset
        .as_ref()
        .is_some_and(|d| !d.is_empty())
        && c.max_steps.is_none()
    {
        add("max_steps", "required with pretraining_dataset: a streamed dataset has no length to derive the number of steps from".into());
    }
    if c.sequence_len == 0 {
        add("sequence_len", "must be at least 1".into());
    }
    if c.micro_batch_size == 0 {
        add("micro_batch_size", "must be at least 1".into());
    }
    if c.test_datasets.as_ref().is_some_and(|d| !d.is_empty()) && c.training.val_set_size > 0.0 {
        add(
            "val_set_size",
            "set val_set_size or test_datasets, not both: test_datasets are the evaluation set"
                .into(),
        );
    }
    for (key, message) in training::validate(&c.training) {
        add(key, message);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedConfig, ConfigError> {
        LoadedConfig::from_str(text, Path::new("config.yml"))
    }

    #[test]
    fn axolotl_lora_yaml_reads_with_axolotl_defaults() {
        let c = load("base_model: ./models/SmolLM2-135M\nadapter: lora\nlora_r: 16\nlora_alpha: 32\nlora_target_linear: true\nlearning_rate: 0.0002\n").unwrap();
        let lora = c.lora_settings().unwrap();
        assert_eq!(
            (lora.r, lora.alpha, lora.target),
            (16, 32.0, TargetModules::AllLinear)
        );
        assert_eq!(c.config.output_dir, "./model-out");
        assert_eq!(c.config.sequence_len, 512);
    }

    #[test]
    fn all_problems_are_reported_with_key_and_line() {
        let err = load("base_model: x\nlora_r: sixteen\nlora_alpah: 32\nadapter: lora\nlora_target_linear: true\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2: lora_r: invalid type"), "{text}");
        assert!(
            text.contains("line 3: lora_alpah: unknown key; did you mean `lora_alpha`?"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 2, "{text}");
    }

    #[test]
    fn unimplemented_features_are_errors_not_silence() {
        let err = load("base_model: x\nadapter: qlora\nload_in_4bit: true\n").unwrap_err();
        assert_eq!(
            err.problems
                .iter()
                .map(|p| p.key.as_str())
                .collect::<Vec<_>>(),
            vec!["adapter", "load_in_4bit"]
        );
    }

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn axolotl_keys_axl_lacks_are_errors_unless_left_empty() {
        let err = load("base_model: x\nwandb_project: my-run\nunfrozen_parameters: ['^lm_head']\n")
            .unwrap_err();
        assert_eq!(keys(&err), vec!["wandb_project", "unfrozen_parameters"]);
        assert!(err.to_string().contains("does not implement yet"), "{err}");
        load("base_model: x\nwandb_project:\nwandb_entity: ''\ndeepspeed:\nfsdp: []\ngroup_by_length: false\nstrict: true\n")
            .unwrap();
    }

    #[test]
    fn training_keys_read_with_axolotl_defaults_and_are_validated() {
        let c = load("learning_rate: 2e-4\n").unwrap().config.training;
        assert_eq!(c.learning_rate.and_then(|l| l.value()), Some(2e-4));
        assert_eq!(c.optimizer, "adamw_torch_fused");
        assert_eq!(c.lr_scheduler, "cosine");
        assert_eq!(c.gradient_accumulation_steps, 1);
        let err = load("optimizer: adamw_8bit\nlr_scheduler: cosine_restarts\nwarmup_steps: 3\nwarmup_ratio: 0.1\ngradient_accumulation_steps: 0\n").unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "gradient_accumulation_steps",
                "optimizer",
                "lr_scheduler",
                "warmup_ratio"
            ]
        );
    }

    #[test]
    fn legacy_attention_flags_map_to_attn_implementation_as_the_contract_says() {
        let c = load("flash_attention: true\n").unwrap();
        assert_eq!(c.attn_implementation.as_deref(), Some("flash_attention_2"));
        assert!(c.warnings[0].contains("deprecated"), "{:?}", c.warnings);
        let c = load("sdp_attention: true\nflash_attention: false\n").unwrap();
        assert_eq!(c.attn_implementation.as_deref(), Some("sdpa"));
        let c = load("attn_implementation: kernels-community/flash-attn3\n").unwrap();
        assert_eq!(
            c.attn_implementation.as_deref(),
            Some("kernels-community/flash-attn3")
        );
        assert!(c.warnings.is_empty());
        let err =
            load("attn_implementation: flash_attention_2\nflash_attention: true\n").unwrap_err();
        assert_eq!(keys(&err), vec!["flash_attention"]);
        let err = load("attn_implementation: fa2\n").unwrap_err();
        assert!(err.to_string().contains("use `flash_attention_2`"), "{err}");
        let err = load("attn_supports_packing: true\n").unwrap_err();
        assert_eq!(keys(&err), vec!["attn_supports_packing"]);
    }

    #[test]
    fn command_line_overrides_replace_and_nest_keys() {
        let args: Vec<String> = [
            "--learning-rate",
            "1e-4",
            "--micro_batch_size=2",
            "--special-tokens__pad-token",
            "<pad>",
            "--sample-packing",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = LoadedConfig::from_str_with_overrides(
            "learning_rate: 0.1\nmicro_batch_size: 8\n",
            Path::new("c.yml"),
            &args,
        )
        .unwrap()
        .config;
        assert_eq!(c.training.learning_rate.and_then(|l| l.value()), Some(1e-4));
        assert_eq!(c.micro_batch_size, 2);
        assert!(c.sample_packing);
        assert_eq!(
            c.special_tokens.unwrap().pad_token.as_deref(),
            Some("<pad>")
        );
        let err = LoadedConfig::from_str_with_overrides(
            "",
            Path::new("c.yml"),
            &["--lerning-rate".into(), "1".into()],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("did you mean `learning_rate`"),
            "{err}"
        );
    }
}
