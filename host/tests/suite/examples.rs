//! The shipped examples: the built-in model loads and is what `examples/pretrain.yml` says it
//! is, both example configurations are valid, and a short quickstart run from the repository
//! root lowers the held-out loss, with no network.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn axl_in_root(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "axl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn eval_loss(dir: &Path) -> f64 {
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval_results.json")).unwrap())
            .unwrap();
    results["eval_loss"].as_f64().unwrap()
}

#[test]
fn the_built_in_model_is_small_and_the_quickstart_trains_it() {
    let root = repo_root();
    let weights = root.join("examples/tiny-llama/model.safetensors");
    let size = std::fs::metadata(&weights).unwrap().len();
    assert!(size <= 10 * 1024 * 1024, "{size} bytes");
    let model = axl::model::CausalLm::load(
        &root.join("examples/tiny-llama"),
        &axl::model::LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(model.config.architecture.model_type(), "llama");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("examples/tiny-llama/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["global_step"].as_u64().unwrap() > 1000,
        "pretrained by axl train"
    );
    axl::config::LoadedConfig::load(&root.join("examples/pretrain.yml")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("quickstart");
    let prepared = dir.path().join("prepared");
    let common = [
        "--output-dir",
        out.to_str().unwrap(),
        "--dataset-prepared-path",
        prepared.to_str().unwrap(),
    ];
    let mut before = vec!["evaluate", "examples/quickstart.yml"];
    before.extend(common);
    axl_in_root(&before);
    let loss_before = eval_loss(&out);
    let mut train = vec!["train", "examples/quickstart.yml", "--max-steps", "20"];
    train.extend(common);
    axl_in_root(&train);
    let mut after = vec!["evaluate", "examples/quickstart.yml"];
    after.extend(common);
    axl_in_root(&after);
    let loss_after = eval_loss(&out);
    assert!(
        loss_after < loss_before / 2.0,
        "held-out loss {loss_before} -> {loss_after}"
    );
}
