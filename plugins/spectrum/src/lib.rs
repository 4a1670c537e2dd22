//! The `spectrum` plugin (`axolotl.integrations.spectrum.SpectrumPlugin`): full fine-tuning of
//! the layers whose weights carry the most signal, after Spectrum (Hartford et al., 2024).
//!
//! In `post_model_load` the plugin ranks every layer by the signal-to-noise ratio of its
//! weight's singular values ([`snr`]), trains the top `spectrum_top_fraction` of each layer
//! type (`self_attn.q_proj`, `mlp.down_proj`, `input_layernorm`, …) together with the
//! embeddings and `lm_head`, freezes everything else, and logs how many parameters train.
//!
//! The ratios are read from, or computed and written to, an SNR file in Spectrum's format
//! ([`file`]) in a `spectrum_snr/` directory beside the config: `spectrum_snr/<model>.json`,
//! `<model>` being `spectrum_model_name` (else `base_model`) with `/` and `_` made `-`, as
//! Axolotl names it. A file Spectrum itself produced can be put there (or in Spectrum's own
//! `model_snr_results/snr_results_<model>.json`); it is used as it is. Unlike Axolotl, which
//! downloads precomputed files and trains everything when it cannot, axl computes the file
//! when there is none.
//!
//! Keys: `spectrum_top_fraction` (default 0.5), `spectrum_model_name`. Spectrum trains base
//! weights, so it is refused with an `adapter:`.

pub mod file;
pub mod snr;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axl_sdk::prelude::*;

use file::LayerSnr;

/// `spectrum_top_fraction` when unset.
pub const DEFAULT_TOP_FRACTION: f64 = 0.5;

/// Parameters that always train, as in Axolotl.
const ALWAYS_TRAINED: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// What `configure` read.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    top_fraction: f64,
    model_name: String,
    snr_dir: PathBuf,
}

/// The plugin.
#[derive(Default)]
pub struct SpectrumPlugin {
    settings: Option<Settings>,
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    let schema = json!({
        "spectrum_top_fraction": {
            "type": ["number", "null"], "exclusiveMinimum": 0.0, "maximum": 1.0,
            "default": DEFAULT_TOP_FRACTION,
            "description": "the fraction of each layer type that trains, highest signal-to-noise ratio first"
        },
        "spectrum_model_name": {
            "type": ["string", "null"],
            "description": "the model whose SNR file is used (default: base_model)"
        },
    });
    config_schema(schema)
}

/// The model name as Axolotl and Spectrum put it in file names: `/` and `_` become `-`. A
/// local directory is named by its last component.
pub fn model_slug(model_name: &str) -> String {
    let trimmed = model_name.trim_end_matches('/');
    let name = if Path::new(trimmed).is_dir() {
        Path::new(trimmed)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| trimmed.to_string())
    } else {
        trimmed.to_string()
    };
    name.replace(['/', '_'], "-")
}

/// A layer's type: its module name without the `model.layers.<i>.` of its block (Spectrum's
/// grouping); layers outside the blocks are their own type.
pub fn layer_type(layer: &str) -> String {
    let mut parts = layer.split('.');
    let mut prefix = Vec::new();
    while let Some(part) = parts.next() {
        if part.parse::<usize>().is_ok() && !prefix.is_empty() {
            return parts.collect::<Vec<_>>().join(".");
        }
        prefix.push(part);
    }
    layer.to_string()
}

impl Settings {
    fn read(run: &RunContext) -> Result<Self, PluginError> {
        let config = &run.config;
        if let Some(adapter) = config.get("adapter").and_then(|a| a.as_str()) {
            return Err(PluginError::new(format!(
                "spectrum chooses which base weights train; it does not combine with `adapter: {adapter}`"
            )));
        }
        let top_fraction = config
            .get("spectrum_top_fraction")
            .and_then(|v| v.as_f64())
            .unwrap_or(DEFAULT_TOP_FRACTION);
        let model_name = config
            .get("spectrum_model_name")
            .and_then(|v| v.as_str())
            .or_else(|| config.get("base_model").and_then(|v| v.as_str()))
            .ok_or_else(|| PluginError::new("needs `spectrum_model_name` or `base_model`"))?
            .to_string();
        let config_dir = Path::new(&run.config_path)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Self {
            top_fraction,
            model_name,
            snr_dir: config_dir.join("spectrum_snr"),
        })
    }

    /// Where this model's SNR file is written.
    fn snr_path(&self) -> PathBuf {
        self.snr_dir
            .join(format!("{}.json", model_slug(&self.model_name)))
    }

    /// Spectrum's own name for a precomputed file, beside the config.
    fn spectrum_path(&self) -> PathBuf {
        self.snr_dir
            .with_file_name("model_snr_results")
            .join(format!("snr_results_{}.json", model_slug(&self.model_name)))
    }
}

/// The SNR of every weight of the model (its `.weight` parameters, LoRA's excepted).
fn compute(model: &ModelInfo, host: &mut dyn Host) -> Result<Vec<LayerSnr>, PluginError> {
    let mut layers = Vec::new();
    for parameter in &model.parameters {
        let Some(layer) = parameter.name.strip_suffix(".weight") else {
            continue;
        };
        if layer.contains("lora_") {
            continue;
        }
        let weight = host.parameter(&parameter.name)?;
        layers.push(LayerSnr {
            layer: layer.to_string(),
            snr: snr::weight_snr(weight.shape, weight.data),
            kind: layer_type(layer),
        });
    }
    Ok(layers)
}

impl Plugin for SpectrumPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "spectrum",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::PostModelLoad],
        );
        manifest.description =
            "Spectrum: trains the layers with the highest signal-to-noise ratio".into();
        manifest.config_schema = schema();
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        self.settings = Some(Settings::read(run)?);
        Ok(())
    }

    fn post_model_load(
        &mut self,
        model: &ModelInfo,
        host: &mut dyn Host,
    ) -> Result<TrainablePolicy, PluginError> {
        let settings = self
            .settings
            .clone()
            .ok_or_else(|| PluginError::new("post_model_load before configure"))?;
        let (path, spectrum_path) = (settings.snr_path(), settings.spectrum_path());
        let existing = [&path, &spectrum_path].into_iter().find(|p| p.is_file());
        let layers = match existing {
            Some(found) => {
                let text = std::fs::read_to_string(found)
                    .map_err(|e| PluginError::new(format!("{}: {e}", found.display())))?;
                let layers = file::parse(&text)
                    .map_err(|e| PluginError::new(format!("{}: {e}", found.display())))?;
                host.log(
                    LogLevel::Info,
                    &format!(
                        "signal-to-noise ratios of {} layers from {}",
                        layers.len(),
                        found.display()
                    ),
                );
                layers
            }
            None => {
                host.log(
                    LogLevel::Info,
                    "computing the signal-to-noise ratio of every weight (once per model)",
                );
                let layers = compute(model, host)?;
                file::write(&path, &layers)
                    .map_err(|e| PluginError::new(format!("writing {}: {e}", path.display())))?;
                host.log(
                    LogLevel::Info,
                    &format!(
                        "wrote the ratios of {} layers to {}",
                        layers.len(),
                        path.display()
                    ),
                );
                layers
            }
        };
        let policy = policy(model, &layers, settings.top_fraction);
        if !policy.values().any(|&t| t) {
            return Err(PluginError::new(format!(
                "no parameter of the model matches a layer of the SNR file for `{}`; is it another model's?",
                settings.model_name
            )));
        }
        host.log(
            LogLevel::Info,
            &summary(model, &policy, &layers, settings.top_fraction),
        );
        Ok(policy)
    }
}

/// Which parameters train: those of the top layers of each type, the embeddings and
/// `lm_head`; every other parameter is frozen.
fn policy(model: &ModelInfo, layers: &[LayerSnr], fraction: f64) -> TrainablePolicy {
    let chosen: Vec<String> = file::top_by_type(layers, fraction)
        .into_values()
        .flatten()
        .map(|layer| format!("{layer}."))
        .collect();
    model
        .parameters
        .iter()
        .map(|p| {
            let trains = ALWAYS_TRAINED.contains(&p.name.as_str())
                || chosen
                    .iter()
                    .any(|prefix| p.name.starts_with(prefix.as_str()));
            (p.name.clone(), trains)
        })
        .collect()
}

/// The log line: parameters trained out of all, and layers per type.
fn summary(
    model: &ModelInfo,
    policy: &TrainablePolicy,
    layers: &[LayerSnr],
    fraction: f64,
) -> String {
    let count = |p: &ParameterInfo| p.shape.iter().product::<usize>();
    let total: usize = model.parameters.iter().map(count).sum();
    let trained: usize = model
        .parameters
        .iter()
        .filter(|p| policy.get(&p.name) == Some(&true))
        .map(count)
        .sum();
    let ranked: Vec<LayerSnr> = layers
        .iter()
        .filter(|l| !ALWAYS_TRAINED.contains(&format!("{}.weight", l.layer).as_str()))
        .cloned()
        .collect();
    let mut per_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for entry in &ranked {
        per_type.entry(entry.kind.clone()).or_default().1 += 1;
    }
    for (kind, names) in file::top_by_type(&ranked, fraction) {
        per_type.entry(kind).or_default().0 += names.len();
    }
    let types: Vec<String> = per_type
        .iter()
        .map(|(kind, (chosen, all))| format!("{kind} {chosen}/{all}"))
        .collect();
    format!(
        "{trained} of {total} parameters train ({:.1}%): the top {}% of each layer type by SNR ({}), the embeddings and lm_head",
        100.0 * trained as f64 / total.max(1) as f64,
        fraction * 100.0,
        types.join(", ")
    )
}

axl_plugin_api::register_builtin!(
    SpectrumPlugin,
    "spectrum",
    aliases = [
        "axolotl.integrations.spectrum.SpectrumPlugin",
        "axolotl.integrations.spectrum"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    #[test]
    fn layer_types_drop_the_block_index() {
        assert_eq!(layer_type("model.layers.12.mlp.down_proj"), "mlp.down_proj");
        assert_eq!(
            layer_type("model.layers.0.input_layernorm"),
            "input_layernorm"
        );
        assert_eq!(layer_type("model.embed_tokens"), "model.embed_tokens");
        assert_eq!(layer_type("lm_head"), "lm_head");
        assert_eq!(
            model_slug("meta-llama/Meta-Llama-3.1-8B"),
            "meta-llama-Meta-Llama-3.1-8B"
        );
        assert_eq!(model_slug("org/some_model"), "org-some-model");
    }

    fn model() -> ModelInfo {
        let parameter = |name: &str, shape: &[usize]| ParameterInfo {
            name: name.into(),
            shape: shape.to_vec(),
            trainable: true,
        };
        ModelInfo {
            model_type: "llama".into(),
            config: json!({}),
            parameters: vec![
                parameter("model.embed_tokens.weight", &[8, 4]),
                parameter("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
                parameter("model.layers.0.self_attn.q_proj.bias", &[4]),
                parameter("model.layers.1.self_attn.q_proj.weight", &[4, 4]),
                parameter("model.layers.1.self_attn.q_proj.bias", &[4]),
                parameter("model.norm.weight", &[4]),
            ],
        }
    }

    fn run_in(dir: &Path, config: serde_json::Value) -> RunContext {
        RunContext {
            command: "train".into(),
            config,
            config_path: dir.join("config.yml").display().to_string(),
            output_dir: dir.join("out").display().to_string(),
        }
    }

    #[test]
    fn computes_writes_and_then_reuses_the_snr_file() {
        let dir = std::env::temp_dir().join(format!("axl-spectrum-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut host = TestHost::default();
        let diagonal = |d: [f32; 4]| Tensor {
            shape: vec![4, 4],
            data: (0..16)
                .map(|i| if i % 5 == 0 { d[i / 5] } else { 0.0 })
                .collect(),
        };
        // Layer 1's q_proj is nearly rank one (SNR 10/3), layer 0's spread out (SNR 7/12).
        host.parameters.insert(
            "model.layers.0.self_attn.q_proj.weight".into(),
            diagonal([4.0, 3.0, 2.0, 1.0]),
        );
        host.parameters.insert(
            "model.layers.1.self_attn.q_proj.weight".into(),
            diagonal([9.0, 0.1, 0.1, 0.1]),
        );
        host.parameters.insert(
            "model.embed_tokens.weight".into(),
            Tensor {
                shape: vec![8, 4],
                data: (0..32).map(|i| i as f32).collect(),
            },
        );
        host.parameters.insert(
            "model.norm.weight".into(),
            Tensor {
                shape: vec![4],
                data: vec![1.0; 4],
            },
        );

        let mut plugin = SpectrumPlugin::default();
        let run = run_in(
            &dir,
            json!({"base_model": "org/tiny_model", "spectrum_top_fraction": 0.5}),
        );
        plugin.configure(&run, &mut host).unwrap();
        let policy = plugin.post_model_load(&model(), &mut host).unwrap();
        assert!(policy["model.layers.1.self_attn.q_proj.weight"]);
        assert!(policy["model.layers.1.self_attn.q_proj.bias"]);
        assert!(!policy["model.layers.0.self_attn.q_proj.weight"]);
        assert!(policy["model.embed_tokens.weight"]);
        // One norm of one type: half of one rounds down to none.
        assert!(!policy["model.norm.weight"]);
        let written = dir.join("spectrum_snr/org-tiny-model.json");
        let layers = file::parse(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(layers.len(), 4);
        assert!(
            host.logs
                .last()
                .unwrap()
                .1
                .starts_with("52 of 76 parameters train (68.4%)"),
            "{:?}",
            host.logs
        );

        // A file that ranks layer 0 first is used as it is.
        let swapped: Vec<LayerSnr> = layers
            .into_iter()
            .map(|mut l| {
                if l.kind == "self_attn.q_proj" {
                    l.snr = if l.layer.contains(".0.") { 5.0 } else { 1.0 };
                }
                l
            })
            .collect();
        file::write(&written, &swapped).unwrap();
        let mut host = TestHost::default();
        plugin.configure(&run, &mut host).unwrap();
        let policy = plugin.post_model_load(&model(), &mut host).unwrap();
        assert!(policy["model.layers.0.self_attn.q_proj.weight"]);
        assert!(!policy["model.layers.1.self_attn.q_proj.weight"]);
        assert!(host.logs[0].1.contains("from"), "{:?}", host.logs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_adapter_run_is_refused() {
        let err = Settings::read(&run_in(
            Path::new("."),
            json!({"base_model": "m", "adapter": "lora"}),
        ))
        .unwrap_err();
        assert!(err.message.contains("adapter: lora"), "{err}");
    }
}
