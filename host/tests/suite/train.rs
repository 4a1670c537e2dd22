//! Training: optimizers and schedules against torch, transformers and Axolotl.

use std::path::PathBuf;

use axl::train::optimizer::{decays, Optimizer, OptimizerKind, OptimizerSettings};
use axl::train::schedule::{warmup_steps, Schedule, ScheduleKind};
use serde_json::Value;

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
