//! Model-runtime and trainer benchmark: forward tokens/s, KV-cache generation tokens/s, and
//! training steps (forward, backward, clipping, AdamW) of a randomly initialized model of a
//! given shape, each with the process's peak resident memory.
//!
//! `axl-bench-model forward|generate [--seq N] [--steps N] [--new-tokens N]` (SmolLM2-135M
//! shape), and `axl-bench-model train --shape tiny|smol --mode full|lora [--seq N]
//! [--steps N] [--gradient-checkpointing] [--bf16]`. Prints one JSON line. `bench/model_runtime.sh`
//! and `bench/train.sh` run it beside their Python peers.

use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use axl::data::packing::Batch;
use axl::model::generate::Decoder;
use axl::model::hf_config::ModelConfig;
use axl::model::kernels::{Implementation, KernelSelection, LossKernel};
use axl::model::lora::{self, LoraSettings, TargetModules};
use axl::model::Precision;
use axl::model::{CausalLm, LoadOptions};
use axl::plugins::spec::parse_entry;
use axl::plugins::{PluginManager, PluginSpec, Services};
use axl::train::optimizer::{Optimizer, OptimizerSettings};
use axl::train::step;
use axl_plugin_api::payload::{Event, ModelInfo, RunContext, TrainState};
use axl_plugin_api::Hook;
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

/// The "tiny" shape of the trainer benchmark (untied, as the peer's).
const TINY: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
  "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
  "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 10000,
  "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2
}"#;

fn random_model(config_json: &str, trainable: bool) -> anyhow::Result<CausalLm> {
    let config = ModelConfig::from_json_str(config_json, std::path::Path::new("<bench config>"))?;
    let options = LoadOptions {
        trainable,
        ..LoadOptions::default()
    };
    Ok(CausalLm::random_init(config, 0, &options)?)
}

/// Training steps as `axl train` runs them: one micro-batch of random tokens, forward and
/// backward, clipping to norm 1, AdamW at 1e-4 (the peer's loop).
fn train(args: &[String], seq: usize, steps: usize) -> anyhow::Result<serde_json::Value> {
    let value = |name: &str| -> anyhow::Result<String> {
        let i = args
            .iter()
            .position(|a| a == name)
            .with_context(|| format!("train needs {name}"))?;
        Ok(args.get(i + 1).context("missing value")?.clone())
    };
    let (shape, mode) = (value("--shape")?, value("--mode")?);
    let (config, batch) = match shape.as_str() {
        "tiny" => (TINY, 2),
        "smol" => (SMOLLM2_135M, 1),
        other => bail!("unknown shape {other} (tiny, smol)"),
    };
    let full = match mode.as_str() {
        "full" => true,
        "lora" => false,
        other => bail!("unknown mode {other} (full, lora)"),
    };
    let mut model = random_model(config, full)?;
    let kernels = value("--kernels").unwrap_or_else(|_| "default".into());
    model.set_kernels(kernel_selection(&kernels, &model.config)?);
    if !full {
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
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let bf16 = args.iter().any(|a| a == "--bf16");
    if bf16 {
        if !Precision::bf16_available() {
            bail!("--bf16 needs a CPU with AVX-512 BF16");
        }
        model.set_precision(Precision::Bf16);
    }
    let vocab = model.config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let batches = vec![Batch {
        labels: rows
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect(),
        input_ids: rows,
        layout: None,
        examples: Vec::new(),
    }];
    let params = model.trainable_params();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = Optimizer::new(OptimizerSettings::default());
    let mut last_loss = f64::NAN;
    // `--plugins a.wasm,b.so`: the loop events of every step (on_step_end, and on_log as
    // with logging_steps: 1) go to these plugins, timed apart from the rest of the step.
    let mut plugins = match value("--plugins") {
        Ok(list) => {
            let specs: Vec<PluginSpec> = list
                .split(',')
                .map(|path| {
                    parse_entry(&path.into(), &|p| std::path::PathBuf::from(p))
                        .map_err(|e| anyhow::anyhow!(e))
                })
                .collect::<anyhow::Result<_>>()?;
            let scratch = std::env::temp_dir().join("axl-bench-plugins");
            Some(
                PluginManager::load(&specs, std::path::Path::new("."), &scratch).map_err(|e| {
                    anyhow::anyhow!(e
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "))
                })?,
            )
        }
        Err(_) => None,
    };
    let mut hook_seconds = 0.0;
    let mut global_step = 0u64;
    let secs = seconds_per_step(steps, || {
        let (mut grads, outcome) =
            step::accumulate(&model, &params, &batches, checkpointing, None)?;
        grads.clip(outcome.grad_norm, 1.0)?;
        step::apply(&mut optimizer, &params, &grads, 1e-4)?;
        last_loss = outcome.loss;
        global_step += 1;
        if let Some(manager) = plugins.as_mut() {
            let started = Instant::now();
            let mut services = Services::default();
            for (hook, metrics) in [
                (Hook::OnStepEnd, vec![]),
                (
                    Hook::OnLog,
                    vec![
                        ("loss".to_string(), outcome.loss),
                        ("grad_norm".to_string(), outcome.grad_norm),
                        ("learning_rate".to_string(), 1e-4),
                    ],
                ),
            ] {
                let event = Event {
                    hook,
                    state: TrainState {
                        global_step,
                        max_steps: steps as u64 + 1,
                        epoch: 0.0,
                    },
                    metrics: metrics.into_iter().collect(),
                    dir: None,
                    message: None,
                };
                manager.event(&event, &mut services)?;
            }
            hook_seconds += started.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    let hook_s = hook_seconds / (steps + 1) as f64;
    let loaded: Vec<String> = plugins
        .iter()
        .flat_map(|m| {
            m.plugins()
                .iter()
                .map(|p| format!("{} ({})", p.manifest.name, p.transport.name()))
        })
        .collect();
    Ok(json!({
        "shape": shape, "mode": mode, "kernels": kernels, "bf16": bf16,
        "gradient_checkpointing": checkpointing,
        "batch": batch, "seq": seq, "steps": steps, "trainable_params": trainable,
        "tokens_per_s": (batch * seq) as f64 / secs, "step_s": secs, "last_loss": last_loss,
        "plugins": loaded, "hook_s_per_step": hook_s,
        "hook_share_of_step": hook_s / secs,
    }))
}

/// The kernels of a benchmark row: `reference` (every fused op replaced by its composition
/// of plain ops), `default` (axl's kernels, no plugin), or the choices of the built-in
/// plugins as a config listing them makes them: `liger` (every liger kernel, fused linear
/// cross-entropy included), `cce` (cut cross-entropy), `liger+cce` (liger's norm, activation
/// and rotary kernels with cut cross-entropy).
fn kernel_selection(name: &str, config: &ModelConfig) -> anyhow::Result<KernelSelection> {
    let (plugins, keys) = match name {
        "default" => return Ok(KernelSelection::default()),
        "reference" => {
            return Ok(KernelSelection {
                rms_norm: Implementation::Reference,
                glu: Implementation::Reference,
                rope: Implementation::Reference,
                loss: LossKernel::Logits(Implementation::Reference, Default::default()),
            })
        }
        "liger" => (
            vec!["liger"],
            json!({"liger_rope": true, "liger_rms_norm": true, "liger_glu_activation": true,
                   "liger_fused_linear_cross_entropy": true}),
        ),
        "cce" => (vec!["cut_cross_entropy"], json!({})),
        "liger+cce" => (
            vec!["liger", "cut_cross_entropy"],
            json!({"liger_rope": true, "liger_rms_norm": true, "liger_glu_activation": true}),
        ),
        other => bail!("unknown kernels {other} (reference, default, liger, cce, liger+cce)"),
    };
    let specs: Vec<PluginSpec> = plugins
        .iter()
        .map(|name| {
            parse_entry(&(*name).into(), &|p| std::path::PathBuf::from(p))
                .map_err(|e| anyhow::anyhow!(e))
        })
        .collect::<anyhow::Result<_>>()?;
    let scratch = std::env::temp_dir().join("axl-bench-plugins");
    let mut manager = PluginManager::load(&specs, std::path::Path::new("."), &scratch)
        .map_err(|e| anyhow::anyhow!("{}", e[0]))?;
    let mut services = Services::default();
    manager.configure(
        &RunContext {
            command: "train".into(),
            config: keys,
            ..Default::default()
        },
        &mut services,
    )?;
    let info = ModelInfo {
        model_type: config.architecture.model_type().into(),
        config: serde_json::Value::Object(config.raw.clone()),
        parameters: Vec::new(),
    };
    let choices = manager
        .pre_model_load(&info, &mut services)?
        .into_iter()
        .map(|(kernel, c)| (kernel, (c.plugin, c.value)))
        .collect();
    Ok(KernelSelection::from_choices(&choices, config)?)
}

/// The loss path alone at the SmolLM2-135M head's shape (`--seq` rows of hidden 576, vocab
/// 49152, the head frozen as in LoRA): forward and backward of `--kernel logits|fused_linear|cut`,
/// with the memory it adds to the process's resident set at its peak.
fn loss_path(args: &[String], seq: usize, steps: usize) -> anyhow::Result<serde_json::Value> {
    let kernel = args
        .iter()
        .position(|a| a == "--kernel")
        .and_then(|i| args.get(i + 1))
        .context("loss needs --kernel logits|fused_linear|cut")?
        .clone();
    let model = random_model(SMOLLM2_135M, false)?;
    let loss = match kernel.as_str() {
        "logits" => LossKernel::default(),
        "fused_linear" => LossKernel::FusedLinear(Default::default(), Default::default()),
        "cut" => LossKernel::Cut(Default::default(), Default::default()),
        other => bail!("unknown loss kernel {other}"),
    };
    let mut model = model;
    model.set_kernels(KernelSelection {
        loss,
        ..Default::default()
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let values: Vec<f32> = (0..seq * 576)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let hidden = candle_core::Var::from_vec(values, (1, seq, 576), &Device::Cpu)?;
    let labels: Vec<i64> = (0..seq).map(|_| rng.random_range(0..49152i64)).collect();
    let labels = Tensor::from_vec(labels, (1, seq), &Device::Cpu)?;
    let run = || -> anyhow::Result<()> {
        let loss = model.token_loss(hidden.as_tensor(), &labels)?;
        let grads = loss.sum.backward()?;
        anyhow::ensure!(grads.get(hidden.as_tensor()).is_some(), "no gradient");
        Ok(())
    };
    let before = current_rss_mib();
    reset_peak_rss();
    let secs = seconds_per_step(steps, run)?;
    Ok(json!({
        "kernel": kernel, "seq": seq, "step_s": secs,
        "loss_path_mib": peak_rss_mib() - before,
    }))
}

/// The matrix products of a SmolLM2-135M step at `--seq` rows: each linear layer's shape
/// (`rows × out × in`) forward and backward (`x·Wᵀ`, then `∂x = ∂y·W` and `∂W = ∂yᵀ·x`: both
/// transposed operands of the backward pass), in f32 and, where the CPU has AVX-512 BF16, in
/// bf16 with f32 sums; GFLOP/s of the three products together, alone (best of `steps`
/// repetitions, into buffers allocated once) and as a training step runs them (through
/// [`axl_kernels::linear`] and autograd, with their allocations; mean of `steps`), beside the
/// machine's peaks ([`peak_gflops`]).
fn gemm(seq: usize, steps: usize) -> anyhow::Result<serde_json::Value> {
    use axl_kernels::matmul::{product, Layout};
    use axl_kernels::{linear, Precision};
    let shapes = [
        ("q_proj, o_proj", 576, 576),
        ("k_proj, v_proj", 192, 576),
        ("gate_proj, up_proj", 1536, 576),
        ("down_proj", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut random =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let mut rows = Vec::new();
    for (name, out, inp) in shapes {
        let (x, w, dy) = (random(seq * inp), random(out * inp), random(seq * out));
        let x_var = candle_core::Var::from_slice(&x, (seq, inp), &Device::Cpu)?;
        let w_var = candle_core::Var::from_slice(&w, (out, inp), &Device::Cpu)?;
        let (mut y, mut dx, mut dw) = (
            vec![0f32; seq * out],
            vec![0f32; seq * inp],
            vec![0f32; out * inp],
        );
        for precision in [Precision::F32, Precision::Bf16] {
            if precision == Precision::Bf16 && !Precision::bf16_available() {
                continue;
            }
            let flops = 3.0 * 2.0 * (seq * out * inp) as f64;
            let mut products = || {
                product(
                    precision,
                    seq,
                    out,
                    inp,
                    &x,
                    Layout::Rows,
                    &w,
                    Layout::Transposed,
                    &mut y,
                );
                product(
                    precision,
                    seq,
                    inp,
                    out,
                    &dy,
                    Layout::Rows,
                    &w,
                    Layout::Rows,
                    &mut dx,
                );
                product(
                    precision,
                    out,
                    inp,
                    seq,
                    &dy,
                    Layout::Transposed,
                    &x,
                    Layout::Rows,
                    &mut dw,
                );
            };
            products();
            let alone = (0..steps.max(1))
                .map(|_| {
                    let start = Instant::now();
                    products();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            let in_step = seconds_per_step(steps, || {
                let y = linear::linear(x_var.as_tensor(), w_var.as_tensor(), precision)?;
                let grads = y.sum_all()?.backward()?;
                anyhow::ensure!(grads.get(w_var.as_tensor()).is_some(), "no gradient");
                Ok(())
            })?;
            rows.push(json!({
                "layer": name, "rows": seq, "out": out, "in": inp,
                "precision": format!("{precision:?}"),
                "alone_gflops": flops / alone / 1e9,
                "in_step_gflops": flops / in_step / 1e9,
            }));
        }
    }
    Ok(json!({"mode": "gemm", "seq": seq, "peak_gflops": peak_gflops(), "products": rows}))
}

/// The most GFLOP/s this machine's vector units reach on rayon's threads, f32 and (with
/// AVX-512 BF16) bf16: each thread runs independent fused multiply-adds (`vfmadd231ps`,
/// `vdpbf16ps`) on 24 accumulators held in registers, which no product can exceed.
fn peak_gflops() -> serde_json::Value {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const STEPS: usize = 20_000_000;
        const FLOPS_PER_STEP: f64 = 24.0 * 32.0;
        #[target_feature(enable = "avx512f")]
        fn f32_steps() -> f32 {
            let mut sums = [_mm512_setzero_ps(); 24];
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..STEPS {
                for sum in sums.iter_mut() {
                    *sum = _mm512_fmadd_ps(*sum, a, b);
                }
            }
            _mm512_reduce_add_ps(
                sums.iter()
                    .fold(_mm512_setzero_ps(), |t, &s| _mm512_add_ps(t, s)),
            )
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn bf16_steps() -> f32 {
            let mut sums = [_mm512_setzero_ps(); 24];
            // SAFETY: any 512 bits are a valid vector of 32 bf16.
            let pairs: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3380_3380)) };
            for _ in 0..STEPS {
                for sum in sums.iter_mut() {
                    *sum = _mm512_dpbf16_ps(*sum, pairs, pairs);
                }
            }
            _mm512_reduce_add_ps(
                sums.iter()
                    .fold(_mm512_setzero_ps(), |t, &s| _mm512_add_ps(t, s)),
            )
        }
        let on_every_thread = |steps: fn() -> f32, flops_per_step: f64| {
            let threads = rayon::current_num_threads();
            let start = Instant::now();
            rayon::broadcast(|_| std::hint::black_box(steps()));
            threads as f64 * STEPS as f64 * flops_per_step / start.elapsed().as_secs_f64() / 1e9
        };
        let mut peaks = serde_json::Map::new();
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            peaks.insert(
                "f32".into(),
                json!(on_every_thread(|| unsafe { f32_steps() }, FLOPS_PER_STEP)),
            );
        }
        if Precision::bf16_available() {
            // SAFETY: the CPU has AVX-512 BF16.
            peaks.insert(
                "bf16".into(),
                json!(on_every_thread(
                    || unsafe { bf16_steps() },
                    2.0 * FLOPS_PER_STEP
                )),
            );
        }
        serde_json::Value::Object(peaks)
    }
    #[cfg(not(target_arch = "x86_64"))]
    json!({})
}

/// The resident set now, in MiB.
fn current_rss_mib() -> f64 {
    status_kib("VmRSS:") / 1024.0
}

/// Starts the peak resident set (`VmHWM`) over from the current one.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()))
        .unwrap_or(0.0)
}

fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") / 1024.0
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
    axl::threads::no_idle_spinning();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().context("usage: axl-bench-model forward|generate|train [--seq N] [--steps N] [--new-tokens N] [--shape tiny|smol --mode full|lora] [--kernels reference|default|liger|cce|liger+cce] [--gradient-checkpointing] [--bf16] | loss --kernel logits|fused_linear|cut | gemm")?.clone();
    let seq = arg(&args, "--seq", 512)?;
    let steps = arg(&args, "--steps", 3)?;
    let new_tokens = arg(&args, "--new-tokens", 256)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..seq).map(|_| rng.random_range(0..49152u32)).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let result = match mode.as_str() {
        "forward" => {
            let model = random_model(SMOLLM2_135M, false)?;
            let secs = seconds_per_step(steps, || {
                model.forward(&input, None)?;
                Ok(())
            })?;
            json!({"mode": mode, "seq": seq, "tokens_per_s": seq as f64 / secs, "step_s": secs})
        }
        "train" => train(&args, seq, steps)?,
        "loss" => loss_path(&args, seq, steps)?,
        "gemm" => gemm(seq, steps)?,
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
