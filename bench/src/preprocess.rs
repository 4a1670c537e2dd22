//! Sets up the preprocessing benchmark: 100,000 alpaca rows and 20,000 multi-turn chat rows
//! of deterministic pseudo-text, a byte-level BPE tokenizer (8,192 tokens) trained on them,
//! a model directory holding that tokenizer, and configurations for `axl preprocess` and
//! `axolotl preprocess` over the same files.
//!
//! `axl-bench-preprocess DIR [--alpaca N] [--chat N]`; `bench/preprocess.sh` runs the rest.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn words(rng: &mut ChaCha8Rng) -> Vec<String> {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "mi", "ten", "ra", "sho", "ve", "dun", "pi", "or", "el", "an", "qui", "st",
        "ba", "ne", "tho", "ri", "gu", "ma", "ex", "zo", "ly", "con",
    ];
    (0..3000)
        .map(|_| {
            (0..rng.random_range(1..4))
                .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                .collect()
        })
        .collect()
}

fn sentence(rng: &mut ChaCha8Rng, vocab: &[String], min: usize, max: usize) -> String {
    let n = rng.random_range(min..=max);
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(if rng.random_ratio(1, 12) { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
        }
        s.push_str(&vocab[rng.random_range(0..vocab.len())]);
    }
    s.push('.');
    s
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(
        args.first()
            .context("usage: axl-bench-preprocess DIR [--alpaca N] [--chat N]")?,
    );
    let count = |flag: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(args.get(i + 1).context("missing value")?.parse()?),
            None => Ok(default),
        }
    };
    let (alpaca_rows, chat_rows) = (count("--alpaca", 100_000)?, count("--chat", 20_000)?);
    std::fs::create_dir_all(dir.join("model"))?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = words(&mut rng);

    let mut alpaca = String::new();
    for _ in 0..alpaca_rows {
        let input = if rng.random_bool(0.5) {
            sentence(&mut rng, &vocab, 5, 30)
        } else {
            String::new()
        };
        let row = serde_json::json!({
            "instruction": sentence(&mut rng, &vocab, 8, 20),
            "input": input,
            "output": sentence(&mut rng, &vocab, 20, 80),
        });
        writeln!(alpaca, "{row}")?;
    }
    std::fs::write(dir.join("alpaca.jsonl"), &alpaca)?;

    let mut chat = String::new();
    for _ in 0..chat_rows {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": sentence(&mut rng, &vocab, 5, 15)}),
        ];
        for _ in 0..rng.random_range(2..=4) {
            messages.push(
                serde_json::json!({"role": "user", "content": sentence(&mut rng, &vocab, 10, 40)}),
            );
            messages.push(serde_json::json!({"role": "assistant", "content": sentence(&mut rng, &vocab, 15, 60)}));
        }
        writeln!(chat, "{}", serde_json::json!({"messages": messages}))?;
    }
    std::fs::write(dir.join("chat.jsonl"), &chat)?;

    // A byte-level BPE tokenizer of the GPT-2 / Llama-3 kind, trained on the corpus.
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let corpus = format!("{alpaca}\n{chat}");
    axl_example_data::train_byte_level_bpe(&corpus, 8192, &specials, None, &dir.join("model"))?;
    std::fs::write(
        dir.join("model/tokenizer_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 4096,
        }))?,
    )?;
    std::fs::write(
        dir.join("model/config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "eos_token_id": 2,
        }))?,
    )?;
    for (name, dataset) in [
        ("alpaca", "  - path: {dir}/alpaca.jsonl\n    type: alpaca\n"),
        (
            "chat",
            "  - path: {dir}/chat.jsonl\n    type: chat_template\n    chat_template: chatml\n",
        ),
    ] {
        let d = dir.display().to_string();
        let common = format!(
            "base_model: {d}/model\nsequence_len: 2048\ndatasets:\n{}dataset_prepared_path: {d}/prepared-{name}\n",
            dataset.replace("{dir}", &d)
        );
        std::fs::write(dir.join(format!("axl-{name}.yml")), &common)?;
        // Axolotl needs a few more keys to validate a configuration it only preprocesses.
        let axolotl = format!(
            "{common}output_dir: {d}/out-{name}\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\nnum_epochs: 1\nlearning_rate: 0.0001\ndataset_processes: 2\n{}",
            if name == "chat" { "chat_template: chatml\n" } else { "" }
        );
        std::fs::write(dir.join(format!("axolotl-{name}.yml")), axolotl)?;
    }
    println!(
        "{alpaca_rows} alpaca rows and {chat_rows} chat rows in {}",
        dir.display()
    );
    Ok(())
}
