//! The first-party integration plugins (grokfast, spectrum, knowledge distillation, lm-eval,
//! SwanLab, rewards) end to end: `axl train` with a config that lists each.

use serde_json::Value;

use super::train::train_in;

/// The logged values of every step of a run.
fn logged_steps(output_dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `plugins: [grokfast]`: the first step's gradient is the plain run's times 1 + λ (the
/// moving average starts as the gradient), and the loss before it is the same.
#[test]
fn grokfast_amplifies_the_first_gradient_by_one_plus_lamb() {
    let dir = tempfile::tempdir().unwrap();
    let common = "max_steps: 2\noptimizer: sgd\nmax_grad_norm: 0\nval_set_size: 0\n";
    let (plain, plain_dir) = train_in(dir.path(), "plain", common);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let (grok, grok_dir) = train_in(
        dir.path(),
        "grok",
        &format!(
            "{common}plugins:\n  - axolotl.integrations.grokfast.GrokfastPlugin\ngrokfast_lamb: 2.0\n"
        ),
    );
    assert!(grok.status.success(), "{}", stderr(&grok));
    assert!(
        stderr(&grok).contains("[grokfast] info: gradient filter: alpha 0.98, lamb 2"),
        "{}",
        stderr(&grok)
    );
    let (plain, grok) = (logged_steps(&plain_dir), logged_steps(&grok_dir));
    assert_eq!(plain[0]["loss"], grok[0]["loss"]);
    let ratio = grok[0]["grad_norm"].as_f64().unwrap() / plain[0]["grad_norm"].as_f64().unwrap();
    assert!((ratio - 3.0).abs() < 1e-4, "grad norm ratio {ratio}");
    assert_ne!(plain[1]["loss"], grok[1]["loss"]);
}
