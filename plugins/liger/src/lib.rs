//! The `liger` plugin (`axolotl.integrations.liger.LigerPlugin`): reads Axolotl's `liger_*`
//! keys and, in `pre_model_load`, chooses the host's fused kernels for the ops the model's
//! architecture has. A requested kernel the architecture cannot use is an error naming the key
//! and the model type, before any weight is read.
//!
//! | key | kernel chosen |
//! |---|---|
//! | `liger_rms_norm` | `rms_norm: fused` |
//! | `liger_layer_norm` | `layer_norm: fused` |
//! | `liger_glu_activation` (alias `liger_swiglu`) | `glu: fused` (SwiGLU or GEGLU) |
//! | `liger_rope` | `rope: fused` (queries and keys) |
//! | `liger_cross_entropy` | `cross_entropy: fused` (over whole logits) |
//! | `liger_fused_linear_cross_entropy` | `cross_entropy: fused_linear` (the logits never exist whole) |
//! | `liger_use_token_scaling` | with the previous: each token's loss scaled by its detached target probability |

use axl_sdk::prelude::*;

/// The `liger_*` keys as read from the configuration; `None` where absent or null.
#[derive(Clone, Debug, Default, PartialEq)]
struct LigerKeys {
    rope: Option<bool>,
    rms_norm: Option<bool>,
    layer_norm: Option<bool>,
    glu_activation: Option<bool>,
    cross_entropy: Option<bool>,
    fused_linear_cross_entropy: Option<bool>,
    use_token_scaling: Option<bool>,
}

/// The ops an architecture has that liger has kernels for.
#[derive(Clone, Copy, Debug)]
struct ArchitectureOps {
    rms_norm: bool,
    layer_norm: bool,
    glu: bool,
    rope: bool,
}

/// Model types liger knows, with the ops each has. Every one has a language-model head, so
/// `liger_cross_entropy` and `liger_fused_linear_cross_entropy` apply to all of them.
const ARCHITECTURES: &[(&str, ArchitectureOps)] = &[
    ("deepseek_v2", ops(true, false, true, false)),
    ("gemma", ops(true, false, true, true)),
    ("gemma2", ops(true, false, true, true)),
    ("gemma3", ops(true, false, true, true)),
    ("gemma3_text", ops(true, false, true, true)),
    ("granite", ops(true, false, true, true)),
    ("jamba", ops(true, false, true, false)),
    ("llama", ops(true, false, true, true)),
    ("llama4", ops(true, true, true, true)),
    ("mistral", ops(true, false, true, true)),
    ("mixtral", ops(true, false, true, true)),
    ("mllama", ops(true, true, true, true)),
    ("olmo2", ops(true, false, true, true)),
    ("paligemma", ops(true, true, true, true)),
    ("phi3", ops(true, false, true, true)),
    ("qwen2", ops(true, false, true, true)),
    ("qwen2_5_vl", ops(true, false, true, true)),
    ("qwen2_vl", ops(true, false, true, true)),
    ("qwen3", ops(true, false, true, true)),
    ("qwen3_moe", ops(true, false, true, true)),
];

const fn ops(rms_norm: bool, layer_norm: bool, glu: bool, rope: bool) -> ArchitectureOps {
    ArchitectureOps {
        rms_norm,
        layer_norm,
        glu,
        rope,
    }
}

/// The plugin.
#[derive(Default)]
pub struct LigerPlugin {
    keys: LigerKeys,
}

fn flag(config: &serde_json::Value, key: &str) -> Option<bool> {
    config.get(key).and_then(|v| v.as_bool())
}

impl LigerKeys {
    /// Reads and checks the keys, as Axolotl's `LigerArgs` and `LigerPlugin` do; warnings go
    /// to `warn`.
    fn read(config: &serde_json::Value, warn: &mut dyn FnMut(&str)) -> Result<Self, PluginError> {
        let swiglu = flag(config, "liger_swiglu");
        let glu = flag(config, "liger_glu_activation");
        let is_set = |key: &str| config.get(key).is_some_and(|v| !v.is_null());
        if is_set("liger_swiglu") && is_set("liger_glu_activation") {
            return Err(PluginError::new(
                "you cannot have both `liger_swiglu` and `liger_glu_activation` set",
            ));
        }
        if is_set("liger_swiglu") {
            warn("`liger_swiglu` is deprecated; use `liger_glu_activation` instead");
        }
        let keys = Self {
            rope: flag(config, "liger_rope"),
            rms_norm: flag(config, "liger_rms_norm"),
            layer_norm: flag(config, "liger_layer_norm"),
            glu_activation: glu.or(swiglu),
            cross_entropy: flag(config, "liger_cross_entropy"),
            fused_linear_cross_entropy: flag(config, "liger_fused_linear_cross_entropy"),
            use_token_scaling: flag(config, "liger_use_token_scaling"),
        };
        if keys.cross_entropy == Some(true) && keys.fused_linear_cross_entropy == Some(true) {
            return Err(PluginError::new(
                "cannot have both `liger_cross_entropy` and `liger_fused_linear_cross_entropy` set",
            ));
        }
        if keys.use_token_scaling == Some(true) && keys.fused_linear_cross_entropy != Some(true) {
            return Err(PluginError::new(
                "`liger_use_token_scaling` scales the loss of the fused linear cross-entropy: set `liger_fused_linear_cross_entropy: true` too",
            ));
        }
        if config
            .get("tensor_parallel_size")
            .and_then(|v| v.as_u64())
            .is_some_and(|n| n > 1)
            && keys.rms_norm == Some(true)
        {
            return Err(PluginError::new(
                "`liger_rms_norm` is incompatible with tensor parallelism",
            ));
        }
        Ok(keys)
    }

    /// The kernel choices for a model of `model_type`, or the first requested kernel it
    /// cannot use.
    fn choices(&self, model_type: &str) -> Result<KernelChoices, PluginError> {
        let mut choices = KernelChoices::new();
        let requested = [
            self.rope,
            self.rms_norm,
            self.layer_norm,
            self.glu_activation,
            self.cross_entropy,
            self.fused_linear_cross_entropy,
        ];
        if !requested.contains(&Some(true)) {
            return Ok(choices);
        }
        let Some((_, arch)) = ARCHITECTURES.iter().find(|(t, _)| *t == model_type) else {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|(t, _)| *t).collect();
            return Err(PluginError::new(format!(
                "liger has no kernels for model type `{model_type}` (it knows {})",
                known.join(", ")
            )));
        };
        let wanted = [
            (
                "liger_rms_norm",
                self.rms_norm,
                arch.rms_norm,
                "rms_norm",
                "RMSNorm",
            ),
            (
                "liger_layer_norm",
                self.layer_norm,
                arch.layer_norm,
                "layer_norm",
                "LayerNorm",
            ),
            (
                "liger_glu_activation",
                self.glu_activation,
                arch.glu,
                "glu",
                "gated MLP",
            ),
            (
                "liger_rope",
                self.rope,
                arch.rope,
                "rope",
                "rotary embeddings",
            ),
        ];
        for (key, requested, present, kernel, op) in wanted {
            if requested != Some(true) {
                continue;
            }
            if !present {
                return Err(PluginError::new(format!(
                    "`{key}: true`, but model type `{model_type}` has no {op}; remove the key"
                )));
            }
            choices.insert(kernel.into(), json!("fused"));
        }
        if self.cross_entropy == Some(true) {
            choices.insert("cross_entropy".into(), json!("fused"));
        }
        if self.fused_linear_cross_entropy == Some(true) {
            choices.insert(
                "cross_entropy".into(),
                json!({"fused_linear": {"token_scaling": self.use_token_scaling == Some(true)}}),
            );
        }
        Ok(choices)
    }
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    let boolean =
        |description: &str| json!({"type": ["boolean", "null"], "description": description});
    let schema = json!({
        "liger_rope": boolean("fused rotary embeddings of queries and keys"),
        "liger_rms_norm": boolean("fused RMSNorm"),
        "liger_layer_norm": boolean("fused LayerNorm"),
        "liger_glu_activation": boolean("fused gated MLP activation (SwiGLU, GEGLU)"),
        "liger_swiglu": boolean("deprecated name of liger_glu_activation"),
        "liger_cross_entropy": boolean("fused cross-entropy over the whole logits"),
        "liger_fused_linear_cross_entropy": boolean("lm_head and cross-entropy fused: the logits never exist whole"),
        "liger_use_token_scaling": boolean("scale each token's loss by its detached target probability (needs liger_fused_linear_cross_entropy)"),
    });
    config_schema(schema)
}

impl Plugin for LigerPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "liger",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::PreModelLoad],
        );
        manifest.description = "Liger's fused kernels, from axl's kernels".into();
        manifest.config_schema = schema();
        manifest.provides.kernels = ["rms_norm", "layer_norm", "glu", "rope", "cross_entropy"]
            .map(String::from)
            .to_vec();
        manifest
    }

    fn configure(&mut self, run: &RunContext, host: &mut dyn Host) -> Result<(), PluginError> {
        self.keys = LigerKeys::read(&run.config, &mut |w| host.log(LogLevel::Warn, w))?;
        Ok(())
    }

    fn pre_model_load(
        &mut self,
        model: &ModelInfo,
        host: &mut dyn Host,
    ) -> Result<KernelChoices, PluginError> {
        let choices = self.keys.choices(&model.model_type)?;
        if choices.is_empty() {
            host.log(
                LogLevel::Warn,
                "liger is listed but no liger_* key is true: no kernel chosen",
            );
        }
        Ok(choices)
    }
}

axl_plugin_api::register_builtin!(
    LigerPlugin,
    "liger",
    aliases = [
        "axolotl.integrations.liger.LigerPlugin",
        "axolotl.integrations.liger"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    fn read(config: serde_json::Value) -> Result<LigerKeys, PluginError> {
        LigerKeys::read(&config, &mut |_| {})
    }

    #[test]
    fn every_key_chooses_its_kernel() {
        let keys = read(json!({
            "liger_rope": true, "liger_rms_norm": true, "liger_glu_activation": true,
            "liger_fused_linear_cross_entropy": true, "liger_use_token_scaling": true
        }))
        .unwrap();
        let choices = keys.choices("llama").unwrap();
        assert_eq!(choices["rope"], json!("fused"));
        assert_eq!(choices["rms_norm"], json!("fused"));
        assert_eq!(choices["glu"], json!("fused"));
        assert_eq!(
            choices["cross_entropy"],
            json!({"fused_linear": {"token_scaling": true}})
        );
        let ce = read(json!({"liger_cross_entropy": true})).unwrap();
        assert_eq!(
            ce.choices("qwen2").unwrap()["cross_entropy"],
            json!("fused")
        );
    }

    #[test]
    fn swiglu_is_an_alias_and_both_set_is_an_error() {
        let mut warnings = Vec::new();
        let keys = LigerKeys::read(&json!({"liger_swiglu": true}), &mut |w| {
            warnings.push(w.to_string())
        })
        .unwrap();
        assert_eq!(keys.glu_activation, Some(true));
        assert!(warnings[0].contains("deprecated"));
        let err = read(json!({"liger_swiglu": true, "liger_glu_activation": false})).unwrap_err();
        assert!(err
            .message
            .contains("both `liger_swiglu` and `liger_glu_activation`"));
    }

    #[test]
    fn exclusive_and_dependent_keys_are_errors() {
        let err =
            read(json!({"liger_cross_entropy": true, "liger_fused_linear_cross_entropy": true}))
                .unwrap_err();
        assert!(err.message.contains("cannot have both"), "{}", err.message);
        let err = read(json!({"liger_use_token_scaling": true})).unwrap_err();
        assert!(err
            .message
            .contains("liger_fused_linear_cross_entropy: true"));
        let err = read(json!({"liger_rms_norm": true, "tensor_parallel_size": 2})).unwrap_err();
        assert!(err.message.contains("tensor parallelism"));
    }

    #[test]
    fn an_op_the_architecture_lacks_is_an_error_naming_key_and_model_type() {
        let keys = read(json!({"liger_layer_norm": true})).unwrap();
        let err = keys.choices("llama").unwrap_err();
        assert!(
            err.message.contains("`liger_layer_norm: true`"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("`llama` has no LayerNorm"),
            "{}",
            err.message
        );
        let rope = read(json!({"liger_rope": true})).unwrap();
        assert!(rope
            .choices("deepseek_v2")
            .unwrap_err()
            .message
            .contains("rotary"));
        let err = rope.choices("gpt2").unwrap_err();
        assert!(err.message.contains("no kernels for model type `gpt2`"));
        assert!(read(json!({})).unwrap().choices("gpt2").unwrap().is_empty());
    }
}
