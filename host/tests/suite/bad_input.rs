//! Bad input gets one clear message naming the file and the key or tensor, a non-zero exit,
//! and no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use axl::model::safetensors_io::{self, SaveDtype};
use axl::model::{CausalLm, LoadOptions};
use candle_core::{DType, Device, Tensor};

use super::common::fixture;

fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    CausalLm::load(dir, &LoadOptions::default())
        .unwrap_err()
        .to_string()
}

/// Runs `axl merge-lora` on a config naming `model_dir`; returns (exit code, stderr).
fn cli_error(model_dir: &Path, extra_yaml: &str) -> (i32, String) {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config.yml");
    let yaml = format!(
        "base_model: {}\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nlora_model_dir: {}\noutput_dir: {}\n{extra_yaml}",
        model_dir.display(),
        fixture("peft_llama_lora").display(),
        work.path().join("out").display()
    );
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_axl"))
        .arg("merge-lora")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "a panic: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_config_json_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains(&dir.join("config.json").display().to_string()),
        "{err}"
    );
    let (code, stderr) = cli_error(&dir, "");
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("config.json"),
        "{stderr}"
    );
}

#[test]
fn config_key_of_the_wrong_type_names_file_and_key() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |v| v["hidden_size"] = "64".into());
    let err = load_error(&dir);
    assert!(
        err.contains(
            "config.json: key `hidden_size`: expected a non-negative integer, found \"64\""
        ),
        "{err}"
    );
    edit_config(&dir, |v| {
        v["hidden_size"] = 64.into();
        v["rope_scaling"]["factor"] = "eight".into();
    });
    let err = load_error(&dir);
    assert!(err.contains("key `rope_scaling.factor`"), "{err}");
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |v| v["model_type"] = "gpt2".into());
    let err = load_error(&dir);
    assert!(
        err.contains(
            "model_type `gpt2` is not supported; supported: llama, mistral, qwen2, qwen3, gemma2"
        ),
        "{err}"
    );
    let (code, stderr) = cli_error(&dir, "");
    assert_eq!(code, 1);
    assert!(stderr.contains("gpt2"), "{stderr}");
}

#[test]
fn truncated_or_corrupt_safetensors_name_the_file() {
    let (_tmp, dir) = copy_fixture("llama");
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains(&weights.display().to_string())
            && err.contains("not a valid safetensors file"),
        "{err}"
    );
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = load_error(&dir);
    assert!(err.contains(&weights.display().to_string()), "{err}");
    let (code, stderr) = cli_error(&dir, "");
    assert_eq!(code, 1);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn wrong_shape_missing_and_extra_tensors_are_named() {
    let (_tmp, dir) = copy_fixture("llama");
    let weights = dir.join("model.safetensors");
    let mut set = safetensors_io::load_file(&weights, DType::F32, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        set.drain().into_iter().map(|(n, t, _)| (n, t)).collect();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let i = tensors.iter().position(|(n, _)| n == q).unwrap();
    tensors[i].1 = Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap();
    safetensors_io::save_file(&weights, &tensors, SaveDtype::F32).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains(&format!(
            "{}: tensor `{q}`: has shape [64, 32], expected [64, 64]",
            weights.display()
        )),
        "{err}"
    );

    tensors.remove(i);
    safetensors_io::save_file(&weights, &tensors, SaveDtype::F32).unwrap();
    let err = load_error(&dir);
    assert!(err.contains(&format!("tensor `{q}`: missing")), "{err}");

    tensors.push((
        q.into(),
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    ));
    tensors.push((
        "model.layers.9.mlp.up_proj.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    ));
    safetensors_io::save_file(&weights, &tensors, SaveDtype::F32).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.9.mlp.up_proj.weight")
            && err.contains("not part of the llama architecture"),
        "{err}"
    );
}

#[test]
fn shard_index_naming_a_missing_shard_names_it() {
    let (_tmp, dir) = copy_fixture("llama_linear_bf16_sharded");
    let shard = dir.join("model-00003-of-00006.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let err = load_error(&dir);
    assert!(err.contains(&shard.display().to_string()), "{err}");
}

#[test]
fn untied_model_without_lm_head_says_so() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |v| v["tie_word_embeddings"] = false.into());
    let err = load_error(&dir);
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings is false"),
        "{err}"
    );
}

#[test]
fn yaml_key_of_the_wrong_type_names_file_key_and_line() {
    let (code, stderr) = cli_error(&fixture("llama"), "sequence_len: long\nlora_dropuot: 0.1\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("config.yml: 2 problems"), "{stderr}");
    assert!(
        stderr.contains("line 8: sequence_len: invalid type: string \"long\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 9: lora_dropuot: unknown key; did you mean `lora_dropout`?"),
        "{stderr}"
    );
}

#[test]
fn adapter_that_does_not_fit_the_model_is_named() {
    let (_tmp, dir) = copy_fixture("peft_llama_lora");
    let config = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(&config, text).unwrap();
    let mut model = CausalLm::load(&fixture("llama"), &LoadOptions::default()).unwrap();
    let err = axl::model::lora::load_adapter(&mut model, &dir, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("has rank 4 but adapter_config.json says r = 8"),
        "{err}"
    );
    let mut model = CausalLm::load(&fixture("qwen3"), &LoadOptions::default()).unwrap();
    let err = axl::model::lora::load_adapter(&mut model, &fixture("peft_llama_lora"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors: tensor"), "{err}");
}
