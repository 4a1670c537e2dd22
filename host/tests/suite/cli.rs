//! The `axl` binary end to end: `merge-lora` writes a model that gives the adapter's logits,
//! `inference` streams a deterministic greedy completion of a piped prompt.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use axl::model::generate::{Decoder, SamplingParams};
use axl::model::tokenizer::ModelTokenizer;
use axl::model::{lora, CausalLm, LoadOptions};

use super::common::{axl, fixture, get, max_abs_diff, reference};

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("config.yml");
    let yaml = format!(
        "base_model: {}\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\noutput_dir: {}\n{extra}",
        fixture("llama").display(),
        dir.join("out").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn merge_lora_writes_an_hf_directory_with_the_adapter_logits() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), "");
    axl(
        "merge-lora",
        &config,
        &[
            "--lora-model-dir",
            fixture("peft_llama_lora").to_str().unwrap(),
        ],
    );
    let merged = work.path().join("out/merged");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(
            merged.join(file).is_file(),
            "{file} missing from the merged directory"
        );
    }
    let refs = reference("peft_llama_lora");
    let model = CausalLm::load(&merged, &LoadOptions::default()).unwrap();
    let diff = max_abs_diff(
        &model.forward(&get(&refs, "input_ids"), None).unwrap(),
        &get(&refs, "logits"),
    );
    assert!(
        diff <= 1e-4,
        "merged logits differ from the adapter's by {diff}"
    );
}

#[test]
fn merge_lora_without_an_adapter_says_where_it_looked() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["merge-lora", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lora_model_dir"), "{stderr}");
}

#[test]
fn inference_streams_the_greedy_completion_of_a_piped_prompt_through_the_chat_template() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "lora_model_dir: {}\nchat_template: tokenizer_default\n",
            fixture("peft_llama_lora").display()
        ),
    );
    let run = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_axl"))
            .args([
                "inference",
                config.to_str().unwrap(),
                "--greedy",
                "--max-new-tokens",
                "12",
                "--repetition-penalty",
                "1.0",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Say hello.")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = run();
    assert_eq!(printed, run(), "greedy decoding is deterministic");

    // The same completion, computed through the library.
    let tokenizer = ModelTokenizer::load(&fixture("llama")).unwrap();
    let mut model = CausalLm::load(&fixture("llama"), &LoadOptions::default()).unwrap();
    lora::load_adapter(&mut model, &fixture("peft_llama_lora"), false).unwrap();
    let prompt = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n";
    let ids = tokenizer.encode(prompt, false).unwrap();
    let params = SamplingParams {
        max_new_tokens: 12,
        ..SamplingParams::default()
    };
    let stop = tokenizer.stop_ids(&model.config.eos_token_ids);
    let (new, _) = Decoder::new(&model, 0)
        .generate(&ids, &params, &stop, &mut |_| true)
        .unwrap();
    assert_eq!(
        printed,
        format!("{}\n", tokenizer.decode(&new, true).unwrap())
    );
}

#[test]
fn inference_without_a_prompt_fails_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["inference", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no prompt"));
}
