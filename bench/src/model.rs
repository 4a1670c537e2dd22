//! Model-runtime benchmark: forward and forward+backward tokens/s, and KV-cache generation
//! tokens/s, for a randomly initialized model of a given Hugging Face shape.
//!
//! `axl-bench-model MODE [--seq N] [--steps N] [--new-tokens N]`, MODE one of `forward`,
//! `train-full`, `train-lora`, `generate`. Prints one JSON line with the measurements and the
//! process's peak resident memory. `bench/model_runtime.sh` runs it beside the transformers peer.

use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use axl::model::generate::Decoder;
use axl::model::hf_config::ModelConfig;
use axl::model::lora::{self, LoraSettings, TargetModules};
use axl::model::safetensors_io::TensorSet;
use axl::model::{ops, CausalLm, LoadOptions};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// SmolLM2-135M's config.json.
const SMOLLM2_135M: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000,
  "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0
}"#;

fn random_model(config_json: &str, trainable: bool) -> anyhow::Result<CausalLm> {
    let config = ModelConfig::from_json_str(config_json, std::path::Path::new("<bench config>"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, norm: bool| -> anyhow::Result<()> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if norm {
                    1.0
                } else {
                    rng.random_range(-0.02f32..0.02)
                }
            })
            .collect();
        tensors.push((name, Tensor::from_vec(values, shape, &Device::Cpu)?));
        Ok(())
    };
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    );
    add(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
        false,
    )?;
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            add(format!("{p}.{n}.weight"), shape, false)?;
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], true)?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        )?;
    }
    add("model.norm.weight".into(), vec![h], true)?;
    let mut set = TensorSet::from_tensors("<random weights>".into(), tensors)?;
    let options = LoadOptions {
        trainable,
        ..LoadOptions::default()
    };
    Ok(CausalLm::from_weights(config, &mut set, &options)?)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs `step` once to warm up, then `steps` times, and returns the mean seconds per step.
fn seconds_per_step(
    steps: usize,
    mut step: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    step()?;
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok(start.elapsed().as_secs_f64() / steps.max(1) as f64)
}

fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| name.to_string()),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    axl::allocator::tune_for_tensors();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().context("usage: axl-bench-model forward|train-full|train-lora|generate [--seq N] [--steps N] [--new-tokens N] [--gradient-checkpointing]")?.clone();
    let seq = arg(&args, "--seq", 512)?;
    let steps = arg(&args, "--steps", 3)?;
    let new_tokens = arg(&args, "--new-tokens", 256)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..seq).map(|_| rng.random_range(0..49152u32)).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let labels = input.to_dtype(candle_core::DType::I64)?;
    let result = match mode.as_str() {
        "forward" => {
            let model = random_model(SMOLLM2_135M, false)?;
            let secs = seconds_per_step(steps, || {
                model.forward(&input, None)?;
                Ok(())
            })?;
            json!({"mode": mode, "seq": seq, "tokens_per_s": seq as f64 / secs, "step_s": secs})
        }
        "train-full" | "train-lora" => {
            let mut model = random_model(SMOLLM2_135M, mode == "train-full")?;
            if mode == "train-lora" {
                let settings = LoraSettings {
                    r: 16,
                    alpha: 32.0,
                    dropout: 0.0,
                    target: TargetModules::AllLinear,
                    modules_to_save: vec![],
                    use_rslora: false,
                    layers_to_transform: None,
                };
                lora::attach_new(&mut model, &settings, 0)?;
            }
            let vars = model.trainable_params();
            let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
            let secs = seconds_per_step(steps, || {
                let grads = if checkpointing {
                    model
                        .checkpointed_loss_and_grads(&input, None, &labels, 1.0 / seq as f64)?
                        .2
                } else {
                    let logits = model.forward(&input, None)?;
                    ops::causal_lm_loss(&logits, &labels)?.mean()?.backward()?
                };
                for (name, var) in &vars {
                    if grads.get(var).is_none() {
                        bail!("no gradient for {name}");
                    }
                }
                Ok(())
            })?;
            json!({"mode": mode, "seq": seq, "gradient_checkpointing": checkpointing, "tokens_per_s": seq as f64 / secs, "step_s": secs})
        }
        "generate" => {
            let model = random_model(SMOLLM2_135M, false)?;
            let prompt = &ids[..16.min(ids.len())];
            let mut decoder = Decoder::new(&model, 0);
            let mut logits = decoder.feed(prompt)?;
            let mut per_token = Vec::with_capacity(new_tokens);
            for _ in 0..new_tokens {
                let next = logits
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b })
                    .0 as u32;
                let start = Instant::now();
                logits = decoder.feed(&[next])?;
                per_token.push(start.elapsed().as_secs_f64());
            }
            let window = (new_tokens / 8).max(1);
            let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
            let first = mean(&per_token[..window]);
            let last = mean(&per_token[new_tokens - window..]);
            json!({
                "mode": mode,
                "new_tokens": new_tokens,
                "tokens_per_s": new_tokens as f64 / per_token.iter().sum::<f64>(),
                "first_ms_per_token": first * 1e3,
                "last_ms_per_token": last * 1e3,
                "last_over_first": last / first,
            })
        }
        other => bail!("unknown mode {other}"),
    };
    let mut result = result;
    result["peak_rss_mib"] = json!(peak_rss_mib());
    result["threads"] = json!(std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()));
    println!("{result}");
    Ok(())
}
