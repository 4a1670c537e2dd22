//! The `cut_cross_entropy` plugin (`axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin`):
//! chooses the host's cut cross-entropy kernel in `pre_model_load`, so the loss is computed
//! from the last hidden states and `lm_head`'s weight without the `[tokens, vocab]` logits.
//!
//! Keys, as Axolotl's `CutCrossEntropyArgs`: `cut_cross_entropy` (true when the plugin is
//! listed), `cut_cross_entropy_accum_c_fp32` and `cut_cross_entropy_c_grad_chunk_size` (axl
//! accumulates `lm_head`'s gradient in f32 always, so these only validate). Axolotl's
//! combinations are refused: with `chunked_cross_entropy`, a chunk size that is not `auto`
//! or a positive multiple of 128, a chunk size without `cut_cross_entropy_accum_c_fp32`, a
//! model type the kernel does not cover. A second loss kernel chosen by another plugin
//! (`liger_fused_linear_cross_entropy`, `liger_cross_entropy`) is refused by the host, naming
//! both plugins. Unlike Axolotl, `bf16`/`fp16` is not required: axl's kernel has an f32
//! backward pass.

use axl_sdk::prelude::*;

/// Model types whose causal-LM head the kernel replaces (Axolotl's list).
const MODEL_TYPES: &[&str] = &[
    "afmoe",
    "apertus",
    "arcee",
    "cohere",
    "cohere2",
    "deepseek_v3",
    "exaone4",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gemma3n",
    "gemma3n_text",
    "glm",
    "glm4",
    "glm4_moe",
    "glm4_moe_lite",
    "glm46v",
    "glm4v",
    "glm4v_moe",
    "glm_image",
    "glm_moe_dsa",
    "gpt_oss",
    "granite",
    "granitemoe",
    "granitemoehybrid",
    "granitemoeshared",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "internvl",
    "kimi_linear",
    "lfm2",
    "lfm2_moe",
    "lfm2_vl",
    "llama",
    "llama4",
    "llama4_text",
    "llava",
    "ministral",
    "ministral3",
    "mistral",
    "mistral3",
    "mistral4",
    "mixtral",
    "mllama",
    "nemotron_h",
    "olmo",
    "olmo2",
    "olmo3",
    "olmoe",
    "phi",
    "phi3",
    "phi4_multimodal",
    "qwen2",
    "qwen2_5_vl",
    "qwen2_moe",
    "qwen2_vl",
    "qwen3",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl",
    "qwen3_vl_moe",
    "seed_oss",
    "smollm3",
    "step3p5",
    "voxtral",
];

/// The plugin.
pub struct CutCrossEntropyPlugin {
    enabled: bool,
}

impl Default for CutCrossEntropyPlugin {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Reads and checks the keys; whether the kernel is wanted.
fn read(config: &serde_json::Value) -> Result<bool, PluginError> {
    let enabled = config
        .get("cut_cross_entropy")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    if !enabled {
        return Ok(false);
    }
    if config
        .get("chunked_cross_entropy")
        .and_then(|v| v.as_bool())
        == Some(true)
    {
        return Err(PluginError::new(
            "Cut Cross Entropy does not support chunked cross entropy: set `chunked_cross_entropy: false` or drop the cut_cross_entropy plugin",
        ));
    }
    let accum_c_fp32 = config
        .get("cut_cross_entropy_accum_c_fp32")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    match config.get("cut_cross_entropy_c_grad_chunk_size") {
        None | Some(serde_json::Value::Null) => {}
        Some(v) if v.as_u64() == Some(0) => {}
        Some(v) => {
            let valid =
                v.as_str() == Some("auto") || v.as_i64().is_some_and(|n| n > 0 && n % 128 == 0);
            if !valid {
                return Err(PluginError::new(format!(
                    "`cut_cross_entropy_c_grad_chunk_size` must be 'auto' or a positive multiple of 128, not {v}"
                )));
            }
            if !accum_c_fp32 {
                return Err(PluginError::new(
                    "`cut_cross_entropy_c_grad_chunk_size` requires `cut_cross_entropy_accum_c_fp32: true`",
                ));
            }
        }
    }
    Ok(true)
}

impl Plugin for CutCrossEntropyPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "cut_cross_entropy",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::PreModelLoad],
        );
        manifest.description = "cut cross-entropy: the loss without the logits".into();
        let schema = json!({
            "cut_cross_entropy": {
                "type": ["boolean", "null"],
                "description": "use cut cross-entropy (default true when the plugin is listed)"
            },
            "cut_cross_entropy_accum_c_fp32": {
                "type": ["boolean", "null"],
                "description": "accumulate lm_head's gradient in f32 (axl always does)"
            },
            "cut_cross_entropy_c_grad_chunk_size": {
                "type": ["integer", "string", "null"],
                "description": "'auto' or a positive multiple of 128; needs cut_cross_entropy_accum_c_fp32"
            }
        });
        if let serde_json::Value::Object(map) = schema {
            manifest.config_schema = map;
        }
        manifest.provides.kernels = vec!["cross_entropy".into()];
        manifest
    }

    fn configure(&mut self, run: &RunContext, _host: &mut dyn Host) -> Result<(), PluginError> {
        self.enabled = read(&run.config)?;
        Ok(())
    }

    fn pre_model_load(
        &mut self,
        model: &ModelInfo,
        _host: &mut dyn Host,
    ) -> Result<KernelChoices, PluginError> {
        let mut choices = KernelChoices::new();
        if !self.enabled {
            return Ok(choices);
        }
        if !MODEL_TYPES.contains(&model.model_type.as_str()) {
            return Err(PluginError::new(format!(
                "cut cross-entropy does not cover model type `{}`",
                model.model_type
            )));
        }
        choices.insert("cross_entropy".into(), json!("cut"));
        Ok(choices)
    }
}

axl_plugin_api::register_builtin!(
    CutCrossEntropyPlugin,
    "cut_cross_entropy",
    aliases = [
        "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
        "axolotl.integrations.cut_cross_entropy"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_means_enabled_and_false_turns_it_off() {
        assert!(read(&json!({})).unwrap());
        assert!(
            !read(&json!({"cut_cross_entropy": false, "chunked_cross_entropy": true})).unwrap()
        );
    }

    #[test]
    fn axolotls_incompatible_combinations_are_refused() {
        let err = read(&json!({"chunked_cross_entropy": true})).unwrap_err();
        assert!(err.message.contains("chunked cross entropy"));
        let err = read(&json!({"cut_cross_entropy_c_grad_chunk_size": 100,
            "cut_cross_entropy_accum_c_fp32": true}))
        .unwrap_err();
        assert!(err.message.contains("multiple of 128"));
        let err = read(&json!({"cut_cross_entropy_c_grad_chunk_size": 256})).unwrap_err();
        assert!(err
            .message
            .contains("requires `cut_cross_entropy_accum_c_fp32: true`"));
        assert!(read(&json!({"cut_cross_entropy_c_grad_chunk_size": "auto",
            "cut_cross_entropy_accum_c_fp32": true}))
        .unwrap());
    }

    #[test]
    fn chooses_the_cut_kernel_for_covered_models_only() {
        let mut plugin = CutCrossEntropyPlugin::default();
        let mut host = axl_sdk::testing::TestHost::default();
        let info = |t: &str| ModelInfo {
            model_type: t.into(),
            ..Default::default()
        };
        let choices = plugin.pre_model_load(&info("qwen2"), &mut host).unwrap();
        assert_eq!(choices["cross_entropy"], json!("cut"));
        let err = plugin.pre_model_load(&info("gpt2"), &mut host).unwrap_err();
        assert!(err.message.contains("`gpt2`"));
    }
}
