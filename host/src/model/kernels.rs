//! Which of the host's kernels a model runs: what `pre_model_load` plugins (`liger`,
//! `cut_cross_entropy`, or a third party's) choose, read from their JSON choices and checked
//! against the architecture before any weight is loaded.
//!
//! Choices, by name:
//! - `rms_norm`, `glu`, `rope`: `"fused"` (the default) or `"reference"` (the composition of
//!   plain differentiable ops each fused kernel is tested against);
//! - `layer_norm`: the same, for architectures with LayerNorm (none of those axl loads yet);
//! - `cross_entropy`: `"fused"` (the default: the logits are made whole, the loss fused),
//!   `"reference"`, `"fused_linear"` (chunked head and loss: the logits never exist whole) or
//!   `"cut"` (cut cross-entropy), or an object `{"fused_linear": {...}}` / `{"cut": {...}}`
//!   with the loss options `label_smoothing`, `z_loss`, `token_scaling`, and `chunk_rows`
//!   (fused linear) or `filter_eps` (cut).

use std::collections::BTreeMap;

use axl_kernels::token_loss::LossOptions;
use serde::Deserialize;

use super::hf_config::{Activation, ModelConfig};

/// A fused kernel or its reference composition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Implementation {
    /// The host's fused kernel.
    #[default]
    Fused,
    /// The composition of plain ops.
    Reference,
}

/// How the causal-LM loss is computed from the last hidden states.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossKernel {
    /// `lm_head` makes the whole logits; the cross-entropy over them is fused (or, with
    /// `Reference`, composed of plain ops).
    Logits(Implementation, LossOptions),
    /// Fused linear cross-entropy.
    FusedLinear(
        LossOptions,
        axl_kernels::fused_linear_cross_entropy::Settings,
    ),
    /// Cut cross-entropy.
    Cut(LossOptions, axl_kernels::cut_cross_entropy::Settings),
}

impl Default for LossKernel {
    fn default() -> Self {
        Self::Logits(Implementation::Fused, LossOptions::default())
    }
}

impl LossKernel {
    /// Whether the logits are made whole (what a `compute_loss` plugin needs).
    pub fn makes_logits(&self) -> bool {
        matches!(self, Self::Logits(..))
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Logits(Implementation::Fused, _) => "fused cross-entropy",
            Self::Logits(Implementation::Reference, _) => "reference cross-entropy",
            Self::FusedLinear(..) => "fused linear cross-entropy",
            Self::Cut(..) => "cut cross-entropy",
        }
    }
}

/// The kernels a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelSelection {
    /// RMSNorm.
    pub rms_norm: Implementation,
    /// The gated MLP activation (SwiGLU, GEGLU).
    pub glu: Implementation,
    /// Rotary embeddings of queries and keys.
    pub rope: Implementation,
    /// The loss.
    pub loss: LossKernel,
}

/// A kernel choice that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` chose the kernel `{kernel}` = {value}: {reason}")]
pub struct KernelChoiceError {
    /// The plugin that chose.
    pub plugin: String,
    /// The kernel's name.
    pub kernel: String,
    /// The value chosen, as JSON.
    pub value: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// Options of a `fused_linear` or `cut` choice given as an object.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LossChoice {
    #[serde(default)]
    label_smoothing: f32,
    #[serde(default)]
    z_loss: f32,
    #[serde(default)]
    token_scaling: bool,
    chunk_rows: Option<usize>,
    filter_eps: Option<f32>,
}

impl KernelSelection {
    /// One line naming the kernels, for the log.
    pub fn describe(&self) -> String {
        let name = |i: Implementation| match i {
            Implementation::Fused => "fused",
            Implementation::Reference => "reference",
        };
        format!(
            "rms_norm {}, glu {}, rope {}, loss: {}",
            name(self.rms_norm),
            name(self.glu),
            name(self.rope),
            self.loss.name()
        )
    }

    /// The selection made by `choices` (kernel name to the plugin that chose and its value)
    /// for a model of `config`, or why a choice cannot be used.
    pub fn from_choices(
        choices: &BTreeMap<String, (String, serde_json::Value)>,
        config: &ModelConfig,
    ) -> Result<Self, KernelChoiceError> {
        let mut selection = Self::default();
        for (kernel, (plugin, value)) in choices {
            let fail = |reason: String| KernelChoiceError {
                plugin: plugin.clone(),
                kernel: kernel.clone(),
                value: value.to_string(),
                reason,
            };
            let architecture = config.architecture.model_type();
            match kernel.as_str() {
                "rms_norm" => selection.rms_norm = implementation(value).map_err(fail)?,
                "rope" => selection.rope = implementation(value).map_err(fail)?,
                "glu" => {
                    selection.glu = implementation(value).map_err(fail)?;
                    if config.activation == Activation::GeluErf {
                        return Err(fail(format!(
                            "the MLP of `{architecture}` here uses exact GELU, which has no fused gated kernel"
                        )));
                    }
                }
                "layer_norm" => {
                    implementation(value).map_err(fail)?;
                    return Err(fail(format!(
                        "`{architecture}` normalizes with RMSNorm and has no LayerNorm"
                    )));
                }
                "cross_entropy" => {
                    selection.loss = loss_kernel(value, config).map_err(fail)?;
                }
                _ => {
                    return Err(fail(
                        "axl has no kernel of that name (it has rms_norm, layer_norm, glu, rope, cross_entropy)"
                            .into(),
                    ))
                }
            }
        }
        Ok(selection)
    }
}

fn implementation(value: &serde_json::Value) -> Result<Implementation, String> {
    match value.as_str() {
        Some("fused") => Ok(Implementation::Fused),
        Some("reference") => Ok(Implementation::Reference),
        _ => Err("expected \"fused\" or \"reference\"".into()),
    }
}

fn loss_kernel(value: &serde_json::Value, config: &ModelConfig) -> Result<LossKernel, String> {
    let (kind, choice) = match value {
        serde_json::Value::String(kind) => (kind.as_str(), LossChoice::default()),
        serde_json::Value::Object(map) if map.len() == 1 => {
            let (kind, options) = map.iter().next().expect("one entry");
            let choice = serde_json::from_value::<LossChoice>(options.clone())
                .map_err(|e| format!("options of `{kind}`: {e}"))?;
            (kind.as_str(), choice)
        }
        _ => {
            return Err(
                "expected \"fused\", \"reference\", \"fused_linear\", \"cut\", or an object with one of the last two"
                    .into(),
            )
        }
    };
    let options = LossOptions {
        label_smoothing: choice.label_smoothing,
        z_loss: choice.z_loss,
        softcap: config.final_logit_softcapping.map(|c| c as f32),
        token_scaling: choice.token_scaling,
    };
    options.validate().map_err(|e| e.to_string())?;
    let only = |allowed: &str, given: bool, key: &str| {
        if given {
            Err(format!("`{key}` applies to `{allowed}` only"))
        } else {
            Ok(())
        }
    };
    match kind {
        "fused" | "reference" => {
            only("fused_linear", choice.chunk_rows.is_some(), "chunk_rows")?;
            only("cut", choice.filter_eps.is_some(), "filter_eps")?;
            Ok(LossKernel::Logits(
                implementation(&serde_json::Value::from(kind))?,
                options,
            ))
        }
        "fused_linear" => {
            only("cut", choice.filter_eps.is_some(), "filter_eps")?;
            if choice.chunk_rows == Some(0) {
                return Err("chunk_rows must be at least 1".into());
            }
            Ok(LossKernel::FusedLinear(
                options,
                axl_kernels::fused_linear_cross_entropy::Settings {
                    chunk_rows: choice.chunk_rows,
                    ..Default::default()
                },
            ))
        }
        "cut" => {
            only("fused_linear", choice.chunk_rows.is_some(), "chunk_rows")?;
            if let Some(eps) = choice.filter_eps {
                if !eps.is_finite() || eps < 0.0 {
                    return Err(format!("filter_eps must be ≥ 0, not {eps}"));
                }
            }
            Ok(LossKernel::Cut(
                options,
                axl_kernels::cut_cross_entropy::Settings {
                    filter_eps: choice.filter_eps,
                    ..Default::default()
                },
            ))
        }
        other => Err(format!("unknown cross-entropy kernel `{other}`")),
    }
}
