//! Reads a Hugging Face `config.json` into the architecture description axl builds models from.
//!
//! Both forms transformers has written are accepted: the classic one (`rope_theta` and
//! `rope_scaling` at top level) and the transformers-5 one (`rope_parameters`). Defaults are
//! the ones of the matching transformers config class, so a config that omits a key means what
//! it means in Python.

use std::path::Path;

use serde_json::{Map, Value};

use super::error::{ModelError, Result};

/// The decoder architectures axl implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3 (and models that reuse its layout).
    Llama,
    /// Mistral: llama with sliding-window attention.
    Mistral,
    /// Qwen2: llama with q/k/v biases.
    Qwen2,
    /// Qwen3: llama with RMSNorm on q and k per head.
    Qwen3,
    /// Gemma 2: soft-capping, `(1+w)` norms, sandwich norms, alternating sliding layers.
    Gemma2,
}

impl Architecture {
    /// Every supported `model_type`, as config.json spells it.
    pub const SUPPORTED: [&'static str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gemma2"];

    /// The architecture of a `model_type`, if supported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma2" => Self::Gemma2,
            _ => return None,
        })
    }

    /// The `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma2 => "gemma2",
        }
    }

    fn from_architectures_entry(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "Gemma2ForCausalLM" => Self::Gemma2,
            _ => return None,
        })
    }
}

/// How rotary position frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor of positions.
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f32,
        /// Wavelength bound (in units of the original context) below which frequencies are scaled fully.
        low_freq_factor: f32,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f32,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Rotary embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base of the frequencies.
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// The activation of the gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (GEGLU).
    GeluTanh,
    /// Exact GELU.
    GeluErf,
}

/// Which kind of attention a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// Causal attention over the whole prefix.
    Full,
    /// Causal attention over the last `window` positions (the token itself included).
    Sliding {
        /// How many positions a token sees.
        window: usize,
    },
}

/// Everything needed to build a model, read from `config.json`.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o projections have biases (llama `attention_bias`).
    pub attention_bias: bool,
    /// Whether only q/k/v have biases (qwen2).
    pub qkv_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
    /// The MLP activation.
    pub activation: Activation,
    /// The attention kind of each layer.
    pub layer_attention: Vec<LayerAttention>,
    /// Whether q and k are RMS-normalized per head (qwen3).
    pub qk_norm: bool,
    /// Scale of attention scores; `head_dim^-0.5` unless the architecture says otherwise.
    pub attention_scale: f64,
    /// `tanh` soft-capping of attention scores (gemma2).
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh` soft-capping of the final logits (gemma2).
    pub final_logit_softcapping: Option<f64>,
    /// Gemma-style details: `(1+w)` norms, sandwich norms, embeddings scaled by `sqrt(hidden)`.
    pub gemma_norms: bool,
    /// End-of-sequence token ids named by the config.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Standard deviation of the normal distribution fresh weights are drawn from.
    pub initializer_range: f64,
    /// The parsed JSON, kept so that a saved model writes back what it read.
    pub raw: Map<String, Value>,
}

/// Typed access to the keys of one JSON object, with errors that name the file and key.
struct Keys<'a> {
    path: &'a Path,
    object: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Keys<'a> {
    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.object.get(key).filter(|v| !v.is_null())
    }

    fn error(&self, key: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::key(self.path, self.name(key), message)
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.error(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected a string, found {v}"))),
        }
    }

    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.error(key, "expected a token id or a list of token ids")),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.error(key, format!("expected a token id, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(ModelError::file(path, "expected a JSON object"));
        };
        Self::from_map(raw, path)
    }

    fn from_map(raw: Map<String, Value>, path: &Path) -> Result<Self> {
        let keys = Keys {
            path,
            object: &raw,
            prefix: "",
        };
        let architecture = architecture_of(&keys)?;
        let hidden_size = keys.usize("hidden_size")?;
        let num_attention_heads = keys.usize("num_attention_heads")?;
        let num_hidden_layers = keys.usize("num_hidden_layers")?;
        let num_key_value_heads = keys
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(keys.error(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match keys.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(keys.error(
                    "head_dim",
                    "missing, and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(keys.error(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head size"),
            ));
        }
        let gemma = architecture == Architecture::Gemma2;
        let activation_key = if gemma {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let activation_name = keys
            .str_opt(activation_key)?
            .or(if gemma {
                keys.str_opt("hidden_act")?
            } else {
                None
            })
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
        let activation = match activation_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            other => {
                return Err(keys.error(
                    activation_key,
                    format!(
                        "activation `{other}` is not supported (silu, gelu, gelu_pytorch_tanh)"
                    ),
                ))
            }
        };
        let sliding_window = keys.usize_opt("sliding_window")?;
        let layer_attention =
            layer_attention(&keys, architecture, num_hidden_layers, sliding_window)?;
        let query_pre_attn_scalar = if gemma {
            keys.f64_opt("query_pre_attn_scalar")?
        } else {
            None
        };
        let attention_scale = query_pre_attn_scalar.unwrap_or(head_dim as f64).powf(-0.5);
        let tie_default = gemma;
        Ok(Self {
            architecture,
            vocab_size: keys.usize("vocab_size")?,
            hidden_size,
            intermediate_size: keys.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings: keys.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rope: rope_config(&keys)?,
            tie_word_embeddings: keys.bool_opt("tie_word_embeddings")?.unwrap_or(tie_default),
            attention_bias: matches!(
                architecture,
                Architecture::Llama | Architecture::Qwen3 | Architecture::Gemma2
            ) && keys.bool_opt("attention_bias")?.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2,
            mlp_bias: architecture == Architecture::Llama
                && keys.bool_opt("mlp_bias")?.unwrap_or(false),
            activation,
            layer_attention,
            qk_norm: architecture == Architecture::Qwen3,
            attention_scale,
            attn_logit_softcapping: if gemma {
                keys.f64_opt("attn_logit_softcapping")?
            } else {
                None
            },
            final_logit_softcapping: if gemma {
                keys.f64_opt("final_logit_softcapping")?
            } else {
                None
            },
            gemma_norms: gemma,
            eos_token_ids: keys.token_ids("eos_token_id")?,
            bos_token_id: keys.token_ids("bos_token_id")?.first().copied(),
            pad_token_id: keys.token_ids("pad_token_id")?.first().copied(),
            initializer_range: keys.f64_opt("initializer_range")?.unwrap_or(0.02),
            raw,
        })
    }

    /// Number of query heads sharing one key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn architecture_of(keys: &Keys) -> Result<Architecture> {
    let supported = || Architecture::SUPPORTED.to_vec();
    if let Some(model_type) = keys.str_opt("model_type")? {
        return Architecture::from_model_type(model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: keys.path.to_path_buf(),
                found: model_type.to_string(),
                supported: supported(),
            }
        });
    }
    let names: Vec<&str> = keys
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(arch) = names
        .iter()
        .find_map(|n| Architecture::from_architectures_entry(n))
    {
        return Ok(arch);
    }
    if names.is_empty() {
        return Err(keys.error(
            "model_type",
            "missing (and no `architectures` entry names a supported model)",
        ));
    }
    Err(ModelError::UnsupportedArchitecture {
        path: keys.path.to_path_buf(),
        found: names.join(", "),
        supported: supported(),
    })
}

fn rope_config(keys: &Keys) -> Result<RopeConfig> {
    // transformers 5 nests everything under `rope_parameters`; older configs keep `rope_theta`
    // at top level and the scaling, if any, under `rope_scaling`.
    let (params, prefix) = match keys.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters"),
        Some(v) => {
            return Err(keys.error("rope_parameters", format!("expected an object, found {v}")))
        }
        None => match keys.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling"),
            Some(v) => {
                return Err(keys.error(
                    "rope_scaling",
                    format!("expected an object or null, found {v}"),
                ))
            }
            None => (None, "rope_scaling"),
        },
    };
    let nested = params.map(|object| Keys {
        path: keys.path,
        object,
        prefix,
    });
    let theta = match nested
        .as_ref()
        .map(|n| n.f64_opt("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => keys.f64_opt("rope_theta")?.unwrap_or(10000.0),
    } as f32;
    let Some(n) = nested else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let rope_type = match n.str_opt("rope_type")? {
        Some(t) => t,
        None => n.str_opt("type")?.unwrap_or("default"),
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: n.f64("factor")? as f32,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: n.f64("factor")? as f32,
            low_freq_factor: n.f64("low_freq_factor")? as f32,
            high_freq_factor: n.f64("high_freq_factor")? as f32,
            original_max_position_embeddings: n.usize("original_max_position_embeddings")?,
        },
        other => {
            return Err(n.error(
                "rope_type",
                format!("rope type `{other}` is not supported (default, linear, llama3)"),
            ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn layer_attention(
    keys: &Keys,
    architecture: Architecture,
    layers: usize,
    sliding_window: Option<usize>,
) -> Result<Vec<LayerAttention>> {
    let sliding = |what: &str| -> Result<LayerAttention> {
        match sliding_window {
            Some(window) if window > 0 => Ok(LayerAttention::Sliding { window }),
            _ => Err(keys.error("sliding_window", format!("required by {what}"))),
        }
    };
    if let Some(types) = keys.get("layer_types") {
        let list = types
            .as_array()
            .ok_or_else(|| keys.error("layer_types", "expected a list of strings"))?;
        if list.len() != layers {
            return Err(keys.error(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers is {layers}",
                    list.len()
                ),
            ));
        }
        return list
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(LayerAttention::Full),
                Some("sliding_attention") => {
                    sliding(&format!("layer_types[{i}] = sliding_attention"))
                }
                _ => Err(keys.error(
                    &format!("layer_types[{i}]"),
                    format!("expected \"full_attention\" or \"sliding_attention\", found {t}"),
                )),
            })
            .collect();
    }
    Ok(match architecture {
        Architecture::Mistral => match sliding_window {
            Some(w) if w > 0 => vec![LayerAttention::Sliding { window: w }; layers],
            _ => vec![LayerAttention::Full; layers],
        },
        Architecture::Gemma2 => (0..layers)
            .map(|i| {
                if i % 2 == 0 {
                    sliding("gemma2")
                } else {
                    Ok(LayerAttention::Full)
                }
            })
            .collect::<Result<_>>()?,
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let use_sliding = keys.bool_opt("use_sliding_window")?.unwrap_or(false);
            let max_window_layers = keys.usize_opt("max_window_layers")?.unwrap_or(layers);
            (0..layers)
                .map(|i| {
                    if use_sliding && i >= max_window_layers {
                        sliding("use_sliding_window")
                    } else {
                        Ok(LayerAttention::Full)
                    }
                })
                .collect::<Result<_>>()?
        }
        Architecture::Llama => vec![LayerAttention::Full; layers],
    })
}
