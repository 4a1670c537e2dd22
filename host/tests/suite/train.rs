//! Training: optimizers and schedules against torch, transformers and Axolotl.

use std::path::PathBuf;

use axl::train::optimizer::{decays, Optimizer, OptimizerKind, OptimizerSettings};
use axl::train::schedule::{warmup_steps, Schedule, ScheduleKind};
use serde_json::Value;

use super::common::{axl, max_abs_diff};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn optimizers_follow_their_reference_implementations() {
    let f = fixture("optimizers.json");
    let lr = f["lr"].as_f64().unwrap();
    for (name, kind, tolerance) in [
        ("adamw", OptimizerKind::AdamW, 1e-6),
        ("sgd", OptimizerKind::Sgd, 1e-6),
        ("lion", OptimizerKind::Lion, 1e-6),
        ("adafactor", OptimizerKind::Adafactor, 1e-5),
    ] {
        let mut optimizer = Optimizer::new(OptimizerSettings {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: f["weight_decay"].as_f64().unwrap(),
            groups: Vec::new(),
        });
        let start = f["start"].as_object().unwrap();
        let mut params: Vec<(String, Vec<usize>, Vec<f32>)> = start
            .iter()
            .map(|(n, v)| {
                let shape = v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (n.clone(), shape, floats(&v["values"]))
            })
            .collect();
        for (step, expected) in f[name].as_array().unwrap().iter().enumerate() {
            optimizer.begin_step();
            for (n, shape, values) in &mut params {
                let grad = floats(&f["grads"][step][n.as_str()]);
                optimizer.update(n, shape, values, &grad, lr);
                for (i, (got, want)) in values.iter().zip(floats(&expected[n.as_str()])).enumerate()
                {
                    assert!(
                        (got - want).abs() <= tolerance * (1.0 + want.abs()),
                        "{name} step {step} {n}[{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn weight_decay_skips_biases_and_norm_weights() {
    assert!(decays("model.layers.0.self_attn.q_proj.weight"));
    assert!(decays("model.embed_tokens.weight"));
    assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
    assert!(!decays("model.layers.0.input_layernorm.weight"));
    assert!(!decays("model.layers.0.post_feedforward_layernorm.weight"));
    assert!(!decays("model.norm.weight"));
    assert!(!decays("model.layers.0.self_attn.q_norm.weight"));
}

#[test]
fn schedules_match_transformers_and_axolotl() {
    let f = fixture("schedules.json");
    let total = f["total_steps"].as_u64().unwrap() as usize;
    let warmup = f["warmup_steps"].as_u64().unwrap() as usize;
    let min_ratio = f["cosine_min_lr_ratio"].as_f64().unwrap();
    for (name, kind, ratio) in [
        ("cosine", ScheduleKind::Cosine, None),
        ("linear", ScheduleKind::Linear, None),
        ("constant", ScheduleKind::Constant, None),
        (
            "constant_with_warmup",
            ScheduleKind::ConstantWithWarmup,
            None,
        ),
        ("cosine_min_lr", ScheduleKind::Cosine, Some(min_ratio)),
        ("rex", ScheduleKind::Rex, None),
    ] {
        let schedule = Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: ratio,
        };
        for (step, want) in f[name].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr(step);
            assert!(
                (got - want).abs() < 1e-12,
                "{name} step {step}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn warmup_defaults_follow_axolotl() {
    assert_eq!(warmup_steps(Some(7), Some(0.5), 100), 7);
    assert_eq!(warmup_steps(None, Some(0.1), 55), 5);
    assert_eq!(warmup_steps(None, None, 1000), 30);
    assert_eq!(warmup_steps(None, None, 10_000), 100);
    assert_eq!(warmup_steps(None, None, 40), 2);
    assert_eq!(warmup_steps(None, None, 20), 0);
}

pub(super) fn examples(count: usize, seed: u64) -> Vec<axl::data::example::Tokenized> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let len = rng.random_range(5..40);
            let input_ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..320)).collect();
            let prompt = rng.random_range(1..len / 2 + 2);
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(i, id)| if i < prompt { -100 } else { *id as i64 })
                .collect();
            axl::data::example::Tokenized {
                input_ids,
                labels,
                fields: None,
            }
        })
        .collect()
}

pub(super) fn trainable_llama(lora: bool) -> axl::model::CausalLm {
    use axl::model::lora::{self, LoraSettings, TargetModules};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let options = axl::model::LoadOptions {
        trainable: !lora,
        ..Default::default()
    };
    let mut model = axl::model::CausalLm::load(&dir, &options).unwrap();
    if lora {
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target: TargetModules::AllLinear,
            modules_to_save: vec![],
            use_rslora: false,
            layers_to_transform: None,
        };
        lora::attach_new(&mut model, &settings, 3).unwrap();
        // A fresh adapter's B is zero; move off it so every adapter weight has a gradient.
        for (_, var) in model.trainable_params() {
            let t = var.as_tensor();
            var.set(&(t + 0.01).unwrap()).unwrap();
        }
    }
    model
}

/// `micro_batch_size: 8, gradient_accumulation_steps: 1`, `1, 8` and `2, 4` give the same loss
/// and gradient norm (and the same update), packed or not, for full fine-tuning and LoRA.
#[test]
fn loss_and_gradients_do_not_depend_on_the_accumulation_split() {
    use axl::train::plan::{micro_batches, TrainSettings};
    use axl::train::step::accumulate;
    let data = examples(8, 11);
    let refs: Vec<&axl::data::example::Tokenized> = data.iter().collect();
    let mut config = axl::config::AxlConfig::default();
    config.training.learning_rate = Some(axl::config::training::Number::Number(1e-3));
    config.sequence_len = 64;
    for lora in [false, true] {
        let model = trainable_llama(lora);
        let params = model.trainable_params();
        for packing in [false, true] {
            let mut results = Vec::new();
            for (mbs, accumulation) in [(8, 1), (1, 8), (2, 4)] {
                config.micro_batch_size = mbs;
                config.training.gradient_accumulation_steps = accumulation;
                let settings = TrainSettings::from_config(&config).unwrap();
                let batches = micro_batches(&refs, &settings, packing, 0);
                let (grads, outcome) = accumulate(&model, &params, &batches, false, None).unwrap();
                results.push((mbs, accumulation, outcome, grads.to_vecs(&params).unwrap()));
            }
            let (_, _, first, first_grads) = &results[0];
            for (mbs, accumulation, outcome, grads) in &results[1..] {
                let what = format!("lora {lora}, packing {packing}, {mbs}x{accumulation}");
                let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
                assert!(
                    rel(outcome.loss, first.loss) < 1e-5,
                    "{what}: loss {} vs {}",
                    outcome.loss,
                    first.loss
                );
                assert!(
                    rel(outcome.grad_norm, first.grad_norm) < 1e-5,
                    "{what}: grad norm {} vs {}",
                    outcome.grad_norm,
                    first.grad_norm
                );
                assert_eq!(outcome.trained_tokens, first.trained_tokens);
                for (a, b) in grads.iter().flatten().zip(first_grads.iter().flatten()) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()) + 1e-6 * first.grad_norm as f32,
                        "{what}: gradient {a} vs {b}"
                    );
                }
            }
            assert!(first.grad_norm > 0.0 && first.loss.is_finite());
        }
    }
}

/// A configuration training the llama fixture on 40 small alpaca rows written into `dir`.
pub(super) fn training_config(dir: &std::path::Path, extra: &str) -> PathBuf {
    use std::fmt::Write as _;
    let words = [
        "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "big", "red", "tree",
    ];
    let mut rows = String::new();
    for i in 0..40usize {
        let text = |n: usize, salt: usize| {
            (0..n)
                .map(|j| words[(i * 7 + j * 3 + salt) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
            rows,
            "{}",
            serde_json::json!({"instruction": text(4, 1), "input": "", "output": text(6 + i % 5, 2)})
        )
        .unwrap();
    }
    std::fs::write(dir.join("data.jsonl"), rows).unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let path = dir.join("config.yml");
    std::fs::write(
        &path,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: alpaca\nsequence_len: 128\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nlearning_rate: 0.001\nlogging_steps: 1\ndataset_prepared_path: {}\n{extra}",
            model.display(),
            dir.join("data.jsonl").display(),
            dir.join("prepared").display()
        ),
    )
    .unwrap();
    path
}

/// Runs `axl train` on [`training_config`] with `extra` in `dir/name`, output in
/// `dir/name/out`, whether it succeeds or not.
pub(super) fn train_in(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
) -> (std::process::Output, PathBuf) {
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir).unwrap();
    let config = training_config(&run_dir, extra);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["train", config.to_str().unwrap(), "--output-dir"])
        .arg(run_dir.join("out"))
        .output()
        .unwrap();
    (out, run_dir.join("out"))
}

fn axl_train(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    axl("train", config, args)
}

fn step_losses(output_dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// A run resumed from its step-5 checkpoint logs the same losses for steps 6 on as the run
/// that was never interrupted, for LoRA and for full fine-tuning, with AdamW and dropout.
#[test]
fn resumed_run_continues_with_the_same_losses() {
    for (name, extra) in [
        (
            "lora",
            "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_linear: true\n",
        ),
        ("full", "weight_decay: 0.01\n"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = training_config(
            dir.path(),
            &format!("{extra}num_epochs: 2\nsave_steps: 5\nwarmup_steps: 2\n"),
        );
        let whole = dir.path().join("whole");
        axl_train(&config, &["--output-dir", whole.to_str().unwrap()]);
        let checkpoint = whole.join("checkpoint-5");
        assert!(checkpoint.join("trainer_state.json").is_file(), "{name}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state["global_step"], 5, "{name}");
        assert_eq!(state["log_history"].as_array().unwrap().len(), 5, "{name}");
        let resumed = dir.path().join("resumed");
        axl_train(
            &config,
            &[
                "--output-dir",
                resumed.to_str().unwrap(),
                "--resume-from-checkpoint",
                checkpoint.to_str().unwrap(),
            ],
        );
        let a = step_losses(&whole);
        let b = step_losses(&resumed);
        assert_eq!(a.len(), 20, "{name}: {a:?}");
        assert_eq!(b.first().map(|s| s.0), Some(6), "{name}: {b:?}");
        for (x, y) in a[5..].iter().zip(&b) {
            assert_eq!(x.0, y.0);
            assert!((x.1 - y.1).abs() <= 1e-6 * x.1.abs(), "{name} step {}: {} vs {}", x.0, x.1, y.1);
        }
        assert_eq!(a.len() - 5, b.len(), "{name}");
    }
}

/// Killing the process at moments spread over a run that saves at every step leaves every
/// `checkpoint-N` it finds complete and loadable (unfinished saves stay in `.partial`
/// directories, which are never read).
#[test]
fn a_killed_run_leaves_only_loadable_checkpoints() {
    use axl::train::optimizer::{Optimizer, OptimizerSettings};
    let dir = tempfile::tempdir().unwrap();
    let config = training_config(dir.path(), "num_epochs: 3\nsave_steps: 1\n");
    let output = dir.path().join("out");
    let mut seen_checkpoints = 0;
    for delay_ms in (0..12u64).map(|k| 150 + 97 * k) {
        let _ = std::fs::remove_dir_all(&output);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
            .arg("train")
            .arg(&config)
            .args(["--output-dir", output.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Every directory named like a checkpoint, not only those the trainer would pick.
        let named: Vec<PathBuf> = std::fs::read_dir(&output)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_prefix("checkpoint-"))
                            .is_some_and(|n| n.parse::<usize>().is_ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        for checkpoint in named {
            seen_checkpoints += 1;
            for file in [
                "progress.json",
                "trainer_state.json",
                "optimizer.safetensors",
                "config.json",
            ] {
                assert!(
                    checkpoint.join(file).is_file(),
                    "{} lacks {file}",
                    checkpoint.display()
                );
            }
            axl::model::CausalLm::load(&checkpoint, &axl::model::LoadOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", checkpoint.display()));
            let mut optimizer = Optimizer::new(OptimizerSettings::default());
            axl::train::checkpoint::restore(&checkpoint, &mut optimizer)
                .unwrap_or_else(|e| panic!("{}: {e}", checkpoint.display()));
        }
        if let Some(latest) = axl::train::checkpoint::latest(&output) {
            // The run resumes from what the kill left.
            let resumed = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
                .arg("train")
                .arg(&config)
                .args([
                    "--output-dir",
                    output.to_str().unwrap(),
                    "--auto-resume-from-checkpoints",
                    "true",
                    "--max-steps",
                    "31",
                ])
                .output()
                .unwrap();
            assert!(
                resumed.status.success(),
                "resume from {}: {}",
                latest.display(),
                String::from_utf8_lossy(&resumed.stderr)
            );
        }
    }
    assert!(
        seen_checkpoints > 0,
        "no kill landed after a checkpoint; lengthen the delays"
    );
}

/// `axl evaluate` after `axl train` (with `test_datasets` as the evaluation set) writes
/// `eval_results.json` whose loss is the final evaluation of the run.
#[test]
fn evaluate_writes_eval_results_matching_the_runs_final_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let test_rows = dir.path().join("test.jsonl");
    std::fs::write(
        &test_rows,
        "{\"instruction\": \"the cat\", \"input\": \"\", \"output\": \"sat on the mat\"}\n{\"instruction\": \"a dog\", \"input\": \"red\", \"output\": \"ran fast\"}\n",
    )
    .unwrap();
    let config = training_config(
        dir.path(),
        &format!(
            "adapter: lora\nlora_r: 4\nlora_target_linear: true\nmax_steps: 4\noutput_dir: {}\ntest_datasets:\n  - path: {}\n    type: alpaca\n",
            output.display(),
            test_rows.display()
        ),
    );
    axl_train(&config, &[]);
    let final_eval = std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("eval_loss").and_then(Value::as_f64))
        .next_back()
        .expect("the run evaluated");
    axl("evaluate", &config, &[]);
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("eval_results.json")).unwrap())
            .unwrap();
    let loss = results["eval_loss"].as_f64().unwrap();
    assert!((loss - final_eval).abs() < 1e-6, "{loss} vs {final_eval}");
    assert!((results["eval_perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(results["eval_tokens"].as_u64().unwrap() > 0);
}

/// A trigger file in `output_dir` makes the run save a checkpoint at the next check and is
/// deleted; Ctrl-C (SIGINT) saves a checkpoint after the current step and exits with 130.
#[test]
fn trigger_file_and_ctrl_c_save_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    std::fs::create_dir_all(&output).unwrap();
    let config = training_config(
        dir.path(),
        &format!(
            "max_steps: 3\nsave_strategy: 'no'\noutput_dir: {}\ndynamic_checkpoint:\n  enabled: true\n  check_interval: 2\n  trigger_file_path: now.save\n",
            output.display()
        ),
    );
    std::fs::write(output.join("now.save"), "").unwrap();
    axl_train(&config, &[]);
    let found: Vec<usize> = axl::train::checkpoint::checkpoints(&output)
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(found, vec![2]);
    assert!(!output.join("now.save").exists());

    let long = dir.path().join("long");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .arg("train")
        .arg(&config)
        .args([
            "--output-dir",
            long.to_str().unwrap(),
            "--max-steps",
            "100000",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = long.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(started.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped; the run can continue from"),
        "{stderr}"
    );
    let latest = axl::train::checkpoint::latest(&long).expect("a checkpoint was saved");
    axl::model::CausalLm::load(&latest, &axl::model::LoadOptions::default()).unwrap();
}

/// NEFTune noise changes the forward pass only while training (dropout on), reproducibly for a
/// seed; evaluation sees the clean embeddings.
#[test]
fn neftune_noise_applies_only_while_training_and_is_seeded() {
    let mut model = trainable_llama(true);
    let ids = candle_core::Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], model.device()).unwrap();
    let clean = model.hidden_states(&ids, None).unwrap();
    model.set_embedding_noise(Some(5.0));
    model.set_dropout(Some(9));
    let noisy = model.hidden_states(&ids, None).unwrap();
    model.set_dropout(Some(9));
    let again = model.hidden_states(&ids, None).unwrap();
    model.set_dropout(None);
    let eval = model.hidden_states(&ids, None).unwrap();
    assert!(max_abs_diff(&noisy, &clean) > 1e-4);
    assert_eq!(max_abs_diff(&noisy, &again), 0.0);
    assert_eq!(max_abs_diff(&eval, &clean), 0.0);
}

/// The checkpointed backward pass returns the trainable parameters' gradients and nothing
/// else: the gradients its partial passes leave for frozen weights and other untracked inputs
/// are dropped a layer at a time instead of piling up until the step ends.
#[test]
fn gradient_checkpointing_keeps_only_the_trainable_gradients() {
    let model = trainable_llama(true);
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 13, 2, 7]], model.device()).unwrap();
    let labels = candle_core::Tensor::new(&[[5i64, 9, 13, 2, 7, -100]], model.device()).unwrap();
    let (_, count, grads) = model
        .checkpointed_loss_and_grads(&ids, None, &labels, 1.0)
        .unwrap();
    assert!(count > 0);
    for (name, param) in model.named_params() {
        match param {
            axl::model::layers::Param::Trainable(var) => {
                assert!(
                    grads.get(var.as_tensor()).is_some(),
                    "{name} has no gradient"
                )
            }
            axl::model::layers::Param::Frozen(tensor) => {
                assert!(
                    grads.get(&tensor).is_none(),
                    "frozen {name} kept a gradient"
                )
            }
        }
    }
}

/// Activation checkpointing gives the loss and gradients of the plain backward pass (1e-5),
/// with LoRA dropout replayed, packed or not, and on gemma2's sliding-window, tied layers.
#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    use axl::train::plan::{micro_batches, TrainSettings};
    use axl::train::step::accumulate;
    let data = examples(6, 5);
    let refs: Vec<&axl::data::example::Tokenized> = data.iter().collect();
    let config = axl::config::AxlConfig {
        sequence_len: 64,
        micro_batch_size: 3,
        ..Default::default()
    };
    let settings = TrainSettings::from_config(&config).unwrap();
    let gemma = || {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma2");
        let options = axl::model::LoadOptions {
            trainable: true,
            ..Default::default()
        };
        axl::model::CausalLm::load(&dir, &options).unwrap()
    };
    let lora_with_dropout = || {
        use axl::model::lora::{self, LoraSettings, TargetModules};
        let mut model = trainable_llama(false);
        lora::freeze_all(&mut model);
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.2,
            target: TargetModules::AllLinear,
            modules_to_save: vec!["lm_head".into()],
            use_rslora: false,
            layers_to_transform: None,
        };
        lora::attach_new(&mut model, &settings, 3).unwrap();
        for (_, var) in model.trainable_params() {
            var.set(&(var.as_tensor() + 0.01).unwrap()).unwrap();
        }
        model
    };
    let models: Vec<(&str, axl::model::CausalLm)> = vec![
        ("llama full", trainable_llama(false)),
        ("llama lora dropout", lora_with_dropout()),
        ("gemma2 full", gemma()),
    ];
    for (name, mut model) in models {
        let params = model.trainable_params();
        for packing in [false, true] {
            let batches = micro_batches(&refs, &settings, packing, 0);
            let mut runs = Vec::new();
            for checkpointing in [false, true] {
                model.set_dropout(Some(77));
                runs.push(accumulate(&model, &params, &batches, checkpointing, None).unwrap());
            }
            let ((plain, a), (checkpointed, b)) = (&runs[0], &runs[1]);
            let what = format!("{name}, packing {packing}");
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * a.loss.abs(),
                "{what}: {} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm,
                "{what}"
            );
            let (plain, checkpointed) = (
                plain.to_vecs(&params).unwrap(),
                checkpointed.to_vecs(&params).unwrap(),
            );
            for (g, h) in plain.iter().flatten().zip(checkpointed.iter().flatten()) {
                assert!(
                    (g - h).abs() <= 1e-5 * (1.0 + g.abs()),
                    "{what}: {g} vs {h}"
                );
            }
        }
    }
}

/// `reinit_weights: true` trains from fresh weights drawn as transformers draws them (normal
/// with `initializer_range`, norms one, the padding row zero), the same for the same seed, and
/// saves a full model that loads.
#[test]
fn reinit_weights_starts_from_seeded_fresh_weights() {
    use axl::model::hf_config::ModelConfig;
    use axl::model::{CausalLm, LoadOptions};
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let config = ModelConfig::from_dir(&fixture).unwrap();
    let model = CausalLm::random_init(config.clone(), 42, &LoadOptions::default()).unwrap();
    let params: std::collections::HashMap<String, candle_core::Tensor> = model
        .named_params()
        .into_iter()
        .map(|(n, p)| (n, p.tensor().clone()))
        .collect();
    let q = params["model.layers.0.self_attn.q_proj.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mean = q.iter().sum::<f32>() / q.len() as f32;
    let std = (q.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / q.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.002 && (std - 0.02).abs() < 0.002,
        "mean {mean}, std {std}"
    );
    let norm = params["model.layers.1.input_layernorm.weight"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(norm.iter().all(|&v| v == 1.0));
    let pad_row = params["model.embed_tokens.weight"]
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        pad_row.iter().all(|&v| v == 0.0),
        "pad_token_id 0 has a zero embedding"
    );
    let again = CausalLm::random_init(config.clone(), 42, &LoadOptions::default()).unwrap();
    let same = again.named_params()[3].1.tensor().clone();
    assert_eq!(max_abs_diff(&same, model.named_params()[3].1.tensor()), 0.0);

    let mut untied = config;
    untied.tie_word_embeddings = false;
    let untied = CausalLm::random_init(untied, 1, &LoadOptions::default()).unwrap();
    assert!(untied
        .named_params()
        .iter()
        .any(|(n, _)| n == "lm_head.weight"));

    let dir = tempfile::tempdir().unwrap();
    let config = training_config(dir.path(), "reinit_weights: true\nmax_steps: 2\nseed: 3\n");
    let out = dir.path().join("out");
    let run = axl_train(&config, &["--output-dir", out.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("randomly initialized"));
    let trained = CausalLm::load(&out, &LoadOptions::default()).unwrap();
    let base = CausalLm::load(&fixture, &LoadOptions::default()).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let find = |m: &CausalLm| {
        m.named_params()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .tensor()
            .clone()
    };
    assert!(
        max_abs_diff(&find(&trained), &find(&base)) > 0.01,
        "not the fixture's weights"
    );
    let first_loss = step_losses(&out)[0].1;
    // Fresh weights predict nearly uniformly over the fixture's 320 tokens.
    assert!(
        (first_loss - 320f64.ln()).abs() < 0.3,
        "first loss {first_loss}"
    );
}

/// `bf16: true` trains with the linear layers' products in bf16: the losses follow the f32
/// run's to bf16's precision without being identical to them. A CPU without AVX-512 BF16 is
/// told so before anything is loaded; `bf16: auto` says that it means f32.
#[test]
fn bf16_trains_close_to_f32_and_auto_says_it_means_f32() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, precision: &str| {
        train_in(
            dir.path(),
            name,
            &format!("pad_to_sequence_len: true\nmax_steps: 4\n{precision}"),
        )
    };
    let (f32_run, f32_dir) = run("f32", "");
    assert!(f32_run.status.success());
    let (auto_run, _) = run("auto", "bf16: auto\n");
    assert!(auto_run.status.success());
    let said = String::from_utf8_lossy(&auto_run.stderr);
    assert!(
        said.contains("bf16: auto: on CPU axl computes in f32"),
        "{said}"
    );
    let (bf16_run, bf16_dir) = run("bf16", "bf16: true\n");
    let said = String::from_utf8_lossy(&bf16_run.stderr);
    if !axl::model::Precision::bf16_available() {
        assert!(!bf16_run.status.success());
        assert!(
            said.contains("config.yml: bf16: true needs a CPU with AVX-512 BF16"),
            "{said}"
        );
        return;
    }
    assert!(bf16_run.status.success(), "{said}");
    let (exact, rounded) = (step_losses(&f32_dir), step_losses(&bf16_dir));
    assert_eq!(exact.len(), 4);
    assert_eq!(rounded.len(), 4);
    let mut largest = 0f64;
    for (a, b) in exact.iter().zip(&rounded) {
        largest = largest.max((a.1 - b.1).abs() / a.1.abs());
    }
    assert!(
        largest > 1e-7 && largest < 1e-2,
        "bf16 losses off f32 by {largest}: {exact:?} {rounded:?}"
    );
}
