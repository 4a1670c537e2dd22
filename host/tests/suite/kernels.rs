//! Kernel selection: the `liger` and `cut_cross_entropy` plugins choose the host's kernels,
//! runs with them train with the losses of the default kernels, and choices an architecture
//! cannot use fail before the model loads.

use std::path::Path;

use axl::model::hf_config::ModelConfig;
use axl::model::kernels::{Implementation, KernelSelection, LossKernel};
use axl::model::{CausalLm, LoadOptions};
use axl_kernels::token_loss::LossOptions;
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::common::{fixture, relative_error};
use super::train::train_in;

/// Per-step losses and evaluation losses of a run's `metrics.jsonl`.
fn losses(output_dir: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(output_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pick = |key: &str| {
        lines
            .iter()
            .filter_map(|v| v.get(key).and_then(Value::as_f64))
            .collect()
    };
    (pick("loss"), pick("eval_loss"))
}

fn run(dir: &Path, name: &str, extra: &str) -> (std::process::Output, std::path::PathBuf) {
    train_in(
        dir,
        name,
        &format!("max_steps: 4\nval_set_size: 0.1\neval_steps: 2\n{extra}"),
    )
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tolerance: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    assert!(!a.is_empty(), "{what}: nothing logged");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tolerance * y.abs(),
            "{what}: {a:?} vs {b:?}"
        );
    }
}

/// LoRA and full fine-tuning (where `lm_head`, tied to the embedding, trains) with every
/// liger kernel, with cut cross-entropy, and with both plugins' Axolotl paths: the training
/// and evaluation losses are the default kernels' to f32 rounding.
#[test]
fn liger_and_cut_cross_entropy_runs_train_with_the_default_losses() {
    let dir = tempfile::tempdir().unwrap();
    let liger = "plugins:\n  - axolotl.integrations.liger.LigerPlugin\nliger_rope: true\nliger_rms_norm: true\nliger_glu_activation: true\nliger_fused_linear_cross_entropy: true\n";
    let liger_ce = "plugins:\n  - liger\nliger_cross_entropy: true\n";
    let cce = "plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n";
    let lora = "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n";
    for (mode, base) in [("lora", lora), ("full", "")] {
        let (out, default_dir) = run(dir.path(), &format!("{mode}-default"), base);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (expected, expected_eval) = losses(&default_dir);
        assert_eq!(expected.len(), 4);
        for (name, plugin) in [("liger", liger), ("liger-ce", liger_ce), ("cce", cce)] {
            let (out, out_dir) = run(
                dir.path(),
                &format!("{mode}-{name}"),
                &format!("{base}{plugin}"),
            );
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{mode} {name}: {said}");
            assert!(said.contains("kernels: "), "{mode} {name}: {said}");
            let (got, got_eval) = losses(&out_dir);
            assert_close(&format!("{mode} {name} loss"), &got, &expected, 2e-5);
            assert_close(
                &format!("{mode} {name} eval_loss"),
                &got_eval,
                &expected_eval,
                2e-5,
            );
        }
    }
}

/// Token scaling changes the loss (each token's loss times its target probability, which
/// is below 1) and still trains.
#[test]
fn liger_token_scaling_scales_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (_, plain_dir) = run(dir.path(), "plain", "");
    let (out, scaled_dir) = run(
        dir.path(),
        "scaled",
        "plugins:\n  - liger\nliger_fused_linear_cross_entropy: true\nliger_use_token_scaling: true\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (plain, _) = losses(&plain_dir);
    let (scaled, _) = losses(&scaled_dir);
    assert!(scaled[0] < plain[0] * 0.1, "{scaled:?} vs {plain:?}");
    assert!(scaled.iter().all(|l| l.is_finite() && *l > 0.0));
}

/// Choices that cannot be used stop the run before the model loads, naming the key, the
/// plugins or the model type; nothing is written to the output directory.
#[test]
fn unusable_kernel_choices_fail_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra, expected) in [
        (
            "layer-norm",
            "plugins:\n  - liger\nliger_layer_norm: true\n",
            vec!["liger_layer_norm: true", "`llama` has no LayerNorm"],
        ),
        (
            "both-losses",
            "plugins:\n  - liger\n  - cut_cross_entropy\nliger_fused_linear_cross_entropy: true\n",
            vec!["cross_entropy", "liger", "cut_cross_entropy"],
        ),
        (
            "two-liger-losses",
            "plugins:\n  - liger\nliger_cross_entropy: true\nliger_fused_linear_cross_entropy: true\n",
            vec!["cannot have both `liger_cross_entropy` and `liger_fused_linear_cross_entropy`"],
        ),
        (
            "scaling-alone",
            "plugins:\n  - liger\nliger_use_token_scaling: true\n",
            vec!["liger_fused_linear_cross_entropy: true"],
        ),
        (
            "swiglu-twice",
            "plugins:\n  - liger\nliger_swiglu: true\nliger_glu_activation: true\n",
            vec!["both `liger_swiglu` and `liger_glu_activation`"],
        ),
        (
            "lora-on-lm-head",
            "plugins:\n  - cut_cross_entropy\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_modules:\n  - q_proj\n  - lm_head\n",
            vec!["cut cross-entropy", "lm_head", "LoRA adapter"],
        ),
        (
            "unknown-liger-key",
            "plugins:\n  - liger\nliger_rsm_norm: true\n",
            vec!["liger_rsm_norm"],
        ),
    ] {
        let (out, out_dir) = run(dir.path(), name, extra);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {said}");
        for e in expected {
            assert!(said.contains(e), "{name}: `{e}` not in: {said}");
        }
        assert!(!said.contains("panicked"), "{name}: {said}");
        assert!(
            !out_dir.join("metrics.jsonl").exists(),
            "{name}: training started"
        );
    }
}

/// Loads a fixture model with trainable weights and the given kernels.
fn trainable(name: &str, kernels: KernelSelection) -> CausalLm {
    let options = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let mut model = CausalLm::load(&fixture(name), &options).unwrap();
    model.set_kernels(kernels);
    model
}

/// Through the model, every loss kernel gives the default's loss and gradients on every
/// parameter — on Gemma 2, whose logits are soft-capped, and on Llama with tied embeddings —
/// and the reference compositions of the norms, activations and rotary embeddings give the
/// fused kernels' values.
#[test]
fn every_kernel_selection_gives_the_default_loss_and_gradients() {
    let fused_linear = LossKernel::FusedLinear(
        LossOptions::default(),
        axl_kernels::fused_linear_cross_entropy::Settings {
            chunk_rows: Some(5),
            ..Default::default()
        },
    );
    let cut = LossKernel::Cut(
        LossOptions::default(),
        axl_kernels::cut_cross_entropy::Settings {
            token_block: 7,
            vocab_block: 100,
            filter_eps: Some(0.0),
            ..Default::default()
        },
    );
    let reference = KernelSelection {
        rms_norm: Implementation::Reference,
        glu: Implementation::Reference,
        rope: Implementation::Reference,
        loss: LossKernel::Logits(Implementation::Reference, LossOptions::default()),
    };
    let selections = [
        KernelSelection {
            loss: fused_linear,
            ..Default::default()
        },
        KernelSelection {
            loss: cut,
            ..Default::default()
        },
        reference,
    ];
    for name in ["gemma2", "llama"] {
        let config = ModelConfig::from_dir(&fixture(name)).unwrap();
        let len = 11;
        let ids: Vec<u32> = (0..2 * len)
            .map(|i| (i * 37 % config.vocab_size) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (2, len), &Device::Cpu).unwrap();
        let labels: Vec<i64> = (0..2 * len)
            .map(|i| {
                if i % 5 == 1 {
                    -100
                } else {
                    (i * 13 % config.vocab_size) as i64
                }
            })
            .collect();
        let labels = Tensor::from_vec(labels, (2, len), &Device::Cpu).unwrap();
        let loss_and_grads = |model: &CausalLm| {
            let hidden = model.hidden_states(&ids, None).unwrap();
            let loss = model.token_loss(&hidden, &labels).unwrap();
            let grads = loss.sum.backward().unwrap();
            let grads: Vec<(String, Tensor)> = model
                .trainable_params()
                .into_iter()
                .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (loss.sum.to_scalar::<f32>().unwrap(), loss.count, grads)
        };
        let (expected, count, expected_grads) =
            loss_and_grads(&trainable(name, KernelSelection::default()));
        for selection in selections {
            let (got, got_count, grads) = loss_and_grads(&trainable(name, selection));
            assert_eq!(got_count, count);
            assert!(
                (got - expected).abs() <= 2e-5 * expected.abs(),
                "{name} {selection:?}: {got} vs {expected}"
            );
            for ((n, g), (_, e)) in grads.iter().zip(&expected_grads) {
                let err = relative_error(g, e);
                assert!(err < 1e-4, "{name} {selection:?}: {n} differs by {err}");
            }
        }
    }
}
