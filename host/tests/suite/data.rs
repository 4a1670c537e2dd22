//! The data pipeline: every prompt strategy's texts and labels, length policies, sources and
//! the errors bad data gets.

use std::path::Path;

use axl::data::config::DatasetConfig;
use axl::data::example::Tokenized;
use axl::data::pipeline::{prepare, DataSettings, DatasetReport, ExcessLength};
use axl::model::resolve::HubSettings;
use axl::model::tokenizer::ModelTokenizer;

use super::common::{axl, fixture};

pub fn tokenizer() -> ModelTokenizer {
    ModelTokenizer::load(&fixture("llama")).unwrap()
}

pub fn settings() -> DataSettings {
    DataSettings {
        sequence_len: 512,
        train_on_inputs: false,
        excess_length: ExcessLength::Drop,
        min_sample_len: 2,
        shuffle: false,
        seed: 42,
        chat_template: None,
        chat_template_jinja: None,
        eot_tokens: None,
        chat_template_kwargs: None,
    }
}

pub fn offline() -> HubSettings {
    HubSettings {
        cache_dirs: vec![],
        offline: true,
        endpoint: None,
        token: None,
    }
}

/// Prepares one dataset described in YAML (with `{dir}` replaced by `dir`).
pub fn run(
    dir: &Path,
    yaml: &str,
    s: &DataSettings,
) -> Result<(Vec<Tokenized>, Vec<DatasetReport>), axl::data::DataError> {
    let ds: DatasetConfig =
        serde_yaml::from_str(&yaml.replace("{dir}", &dir.display().to_string())).unwrap();
    prepare(&[ds], s, &tokenizer(), &offline(), dir)
}

/// (full text, trained text) of an example.
pub fn texts(t: &Tokenized) -> (String, String) {
    let tok = tokenizer();
    let trained: Vec<u32> = t
        .labels
        .iter()
        .filter(|l| **l >= 0)
        .map(|l| *l as u32)
        .collect();
    (
        tok.decode(&t.input_ids, false).unwrap(),
        tok.decode(&trained, false).unwrap(),
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const ALPACA_ROWS: &str = r#"{"instruction": "Say hi.", "input": "", "output": "Hi!"}
{"instruction": "Add.", "input": "2 and 3", "output": "5"}
"#;

#[test]
fn alpaca_uses_axolotls_prompt_and_trains_the_response_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    let (examples, reports) =
        run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &settings()).unwrap();
    assert_eq!(reports[0].rows, 2);
    let (full, trained) = texts(&examples[0]);
    assert_eq!(full, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!<|im_end|>");
    assert_eq!(trained, "Hi!<|im_end|>");
    let (full, trained) = texts(&examples[1]);
    assert_eq!(full, "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>");
    assert_eq!(trained, "5<|im_end|>");

    let mut all = settings();
    all.train_on_inputs = true;
    let (examples, _) = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &all).unwrap();
    let (full, trained) = texts(&examples[0]);
    assert_eq!(full, trained, "train_on_inputs trains everything");
}

#[test]
fn alpaca_styles_and_loaders_have_axolotls_texts() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    write(
        dir.path(),
        "qa.jsonl",
        "{\"question\": \"Why?\", \"answer\": \"Because.\"}\n",
    );
    write(
        dir.path(),
        "orca.jsonl",
        "{\"system_prompt\": \"Be brief.\", \"question\": \"Q?\", \"response\": \"A.\"}\n",
    );
    write(dir.path(), "sys.jsonl", "{\"system\": \"Be brief.\", \"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}\n");
    write(
        dir.path(),
        "camel.jsonl",
        "{\"message_1\": \"Hi?\", \"message_2\": \"Hello.\"}\n",
    );
    write(dir.path(), "ctx.jsonl", "{\"article\": \"Sky is blue.\", \"question\": \"Colour?\", \"answer\": \"Blue.\", \"context\": \"Sky is blue.\", \"unanswerable_question\": \"Size?\"}\n");
    let cases: &[(&str, &str, &str)] = &[
        ("a.jsonl", "alpaca:chatml", "<|im_start|>system\nBelow is an instruction that describes a task. Write a response that appropriately completes the request.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"),
        ("a.jsonl", "alpaca:phi", "<|system|>\nBelow is an instruction that describes a task. Write a response that appropriately completes the request.<|end|>\n<|user|>\nSay hi.<|end|>\n<|assistant|>\n"),
        ("a.jsonl", "alpaca_chat", "SYSTEM: Below is an instruction that describes a task. Write a response that appropriately completes the request.\nUSER: Say hi.\nASSISTANT:"),
        ("a.jsonl", "alpaca_chat.load_concise", "SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that appropriately and concisely completes the request.\n\n\nUSER: Say hi.\nASSISTANT:"),
        ("qa.jsonl", "alpaca_chat.load_qa", "SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that appropriately and concisely completes the request.\n\n\nUSER: Why?\nASSISTANT:"),
        ("orca.jsonl", "alpaca_w_system.load_open_orca", "### System:\nBe brief.\n### Human:\nQ?\n### Assistant:\n"),
        ("a.jsonl", "alpaca:chat", "SYSTEM: Below is an instruction that describes a task. Write a response that appropriately completes the request.\nUSER: Say hi.\nASSISTANT:"),
        ("a.jsonl", "alpaca_instruct.load_no_prompt", "### Instruction:\nSay hi.\n\n### Response:\n"),
        ("a.jsonl", "alpaca_chat.load_no_prompt", "USER: Say hi.\nASSISTANT:"),
        ("camel.jsonl", "alpaca_chat.load_camel_ai", "SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that appropriately and concisely completes the request.\n\n\nUSER: Hi?\nASSISTANT:"),
        ("sys.jsonl", "alpaca_w_system", "SYSTEM: Be brief.\nUSER: Say hi.\nASSISTANT:"),
        ("sys.jsonl", "alpaca_w_system.load_instruct", "Be brief.\n\n### Instruction:\nSay hi.\n\n### Response:\n"),
        ("orca.jsonl", "alpaca_w_system.load_open_orca_chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"),
        ("orca.jsonl", "orcamini", "### System:\nBe brief.\n\n### User:\nQ?\n\n### Response:\n"),
        ("ctx.jsonl", "context_qa", "SYSTEM: Use the following contextual information to concisely answer the question.\n\nUSER: Sky is blue.\n===\nColour?\nASSISTANT:"),
        ("ctx.jsonl", "context_qa.load_v2", "Context: Sky is blue.\nQuestion: Colour?\n"),
    ];
    for (file, kind, prompt) in cases {
        let (examples, _) = run(
            dir.path(),
            &format!("path: {{dir}}/{file}\ntype: {kind}"),
            &settings(),
        )
        .unwrap();
        let (full, trained) = texts(&examples[0]);
        assert!(full.starts_with(prompt), "{kind}: {full:?}");
        assert_eq!(
            format!("{prompt}{trained}"),
            full,
            "{kind}: only the response is trained"
        );
    }
}

#[test]
fn user_defined_format_fills_fields_and_masks_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "u.jsonl", "{\"q\": \"hi\", \"a\": \"hello\"}\n");
    let yaml = "path: {dir}/u.jsonl\ntype:\n  system_prompt: SYS\n  field_instruction: q\n  field_output: a\n  format: \"[INST] {instruction} {input} [/INST]\"\n  no_input_format: \"[INST] {instruction} [/INST]\"\n";
    let (examples, _) = run(dir.path(), yaml, &settings()).unwrap();
    assert_eq!(
        texts(&examples[0]),
        (
            "SYS[INST] hi [/INST]hello<|im_end|>".into(),
            "hello<|im_end|>".into()
        )
    );
}

#[test]
fn completion_trains_everything_and_splits_long_texts_into_sequence_len_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(40);
    write(
        dir.path(),
        "c.jsonl",
        &format!("{{\"body\": \"{long}\"}}\n{{\"body\": \"short\"}}\n"),
    );
    let mut s = settings();
    s.sequence_len = 16;
    let (examples, reports) = run(
        dir.path(),
        "path: {dir}/c.jsonl\ntype: completion\nfield: body",
        &s,
    )
    .unwrap();
    assert!(examples.len() >= 3, "the long text is split");
    assert!(examples.iter().all(|e| e.len() <= 16));
    let joined: String = examples[..examples.len() - 1]
        .iter()
        .map(|e| texts(e).0)
        .collect();
    // A final piece holding only the EOS is shorter than min_sample_len and left out.
    let expected = if reports[0].dropped_too_short == 1 {
        long.clone()
    } else {
        format!("{long}<|im_end|>")
    };
    assert_eq!(joined, expected);
    assert_eq!(texts(examples.last().unwrap()).0, "short<|im_end|>");
    for e in &examples {
        let (full, trained) = texts(e);
        assert_eq!(full, trained);
    }
}

#[test]
fn input_output_trains_exactly_the_labelled_segments() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "io.jsonl",
        r#"{"segments": [{"text": "<|im_start|>Hello\n", "label": false}, {"text": "hi there.<|im_end|>", "label": true}, {"text": " goodbye ", "label": false}, {"text": "farewell<|im_end|>", "label": true}]}"#,
    );
    let (examples, _) = run(
        dir.path(),
        "path: {dir}/io.jsonl\ntype: input_output",
        &settings(),
    )
    .unwrap();
    let (full, trained) = texts(&examples[0]);
    assert_eq!(
        full,
        "<|im_start|>Hello\nhi there.<|im_end|> goodbye farewell<|im_end|>"
    );
    // The text is tokenized as a whole: the token " f" overlaps the trained segment, so it is
    // trained (the model must emit it to produce "farewell").
    assert_eq!(trained, "hi there.<|im_end|> farewell<|im_end|>");
}

#[test]
fn pre_tokenized_rows_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t.jsonl", "{\"input_ids\": [271, 299, 99], \"attention_mask\": [1, 1, 1], \"labels\": [271, -100, 99]}\n");
    let (examples, _) = run(dir.path(), "path: {dir}/t.jsonl", &settings()).unwrap();
    assert_eq!(examples[0].input_ids, vec![271, 299, 99]);
    assert_eq!(examples[0].labels, vec![271, -100, 99]);
}

#[test]
fn chat_template_trains_assistant_content_and_its_end_of_turn_only() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "chat.jsonl",
        r#"{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]}"#,
    );
    let yaml = "path: {dir}/chat.jsonl\ntype: chat_template\nfield_messages: conversations\nmessage_property_mappings:\n  role: from\n  content: value\n";
    let (examples, _) = run(dir.path(), yaml, &settings()).unwrap();
    let (full, trained) = texts(&examples[0]);
    assert_eq!(full, "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you.<|im_end|>\n");
    assert_eq!(trained, "Hello!<|im_end|>See you.<|im_end|>");

    let last = format!("{yaml}train_on_eos: last\n");
    let (examples, _) = run(dir.path(), &last, &settings()).unwrap();
    assert_eq!(texts(&examples[0]).1, "Hello!See you.<|im_end|>");
    let none = format!("{yaml}train_on_eos: none\nroles_to_train: [user]\n");
    let (examples, _) = run(dir.path(), &none, &settings()).unwrap();
    assert_eq!(texts(&examples[0]).1, "HiBye");
    let dropped = format!("{yaml}drop_system_message: true\n");
    let (examples, _) = run(dir.path(), &dropped, &settings()).unwrap();
    assert!(texts(&examples[0]).0.starts_with("<|im_start|>user\nHi"));
}

#[test]
fn chat_template_honours_per_message_training_flags_and_details() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "chat.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi", "train": true}, {"role": "assistant", "content": "Hello there!", "train": false}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "Fine thanks", "detail": [{"begin_offset": 0, "end_offset": 4, "train": true}, {"begin_offset": 5, "end_offset": 10, "train": false}]}]}"#,
    );
    let yaml = "path: {dir}/chat.jsonl\ntype: chat_template\nmessage_field_training: train\nmessage_field_training_detail: detail\ntrain_on_eos: none\n";
    let (examples, _) = run(dir.path(), yaml, &settings()).unwrap();
    // " thanks" straddles the trained and untrained pieces: only whole tokens of a detail train.
    assert_eq!(texts(&examples[0]).1, "HiFine");
}

#[test]
fn long_examples_are_dropped_truncated_or_raised_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    let (all, _) = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &settings()).unwrap();
    let (short, long) = (all[0].len(), all[1].len());
    assert!(short < long);
    let mut s = settings();
    s.sequence_len = 30;
    let err = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &s)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no training example is left") && err.contains("2 rows, 2 too long"),
        "{err}"
    );
    s.sequence_len = short;
    let (examples, reports) = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &s).unwrap();
    assert_eq!((examples.len(), reports[0].dropped_too_long), (1, 1));
    s.sequence_len = 30;
    s.excess_length = ExcessLength::Truncate;
    let (examples, reports) = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &s).unwrap();
    assert_eq!(reports[0].truncated, 2);
    assert!(examples.iter().all(|e| e.len() == 30));
    s.excess_length = ExcessLength::Raise;
    let err = run(dir.path(), "path: {dir}/a.jsonl\ntype: alpaca", &s)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.jsonl line 1") && err.contains("exceeds sequence_len 30"),
        "{err}"
    );
}

#[test]
fn sources_json_csv_parquet_directories_globs_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "rows.json",
        r#"[{"text": "one"}, {"text": "two"}, {"text": "three"}]"#,
    );
    write(dir.path(), "cols.json", r#"{"text": ["four", "five"]}"#);
    write(dir.path(), "rows.csv", "text,other\nsix,x\n\"se,ven\",y\n");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(
        &dir.path().join("sub"),
        "a.jsonl",
        "{\"text\": \"eight\"}\n",
    );
    let count = |yaml: &str| run(dir.path(), yaml, &settings()).unwrap().0.len();
    assert_eq!(count("path: {dir}/rows.json\ntype: completion"), 3);
    assert_eq!(count("path: {dir}/cols.json\ntype: completion"), 2);
    assert_eq!(count("path: {dir}/rows.csv\ntype: completion"), 2);
    assert_eq!(count("path: {dir}/sub\ntype: completion"), 1);
    assert_eq!(count("path: \"{dir}/*.json\"\ntype: completion"), 5);
    assert_eq!(
        count("path: {dir}/rows.json\ntype: completion\nshards: 2\nshards_idx: 1"),
        1
    );
    let (examples, _) = run(
        dir.path(),
        "path: {dir}/rows.csv\ntype: completion",
        &settings(),
    )
    .unwrap();
    assert_eq!(texts(&examples[1]).0, "se,ven<|im_end|>");
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("config.yml");
    std::fs::write(
        &path,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}/a.jsonl\n    type: alpaca\ndataset_prepared_path: {}/prepared\n{extra}",
            fixture("llama").display(),
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn cache_is_reused_unchanged_and_rebuilt_when_one_row_of_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    let cfg = axl::config::LoadedConfig::load(&write_config(dir.path(), "")).unwrap();
    let tok = tokenizer();
    let hub = offline();
    let (first, status) = axl::data::prepare_cached(&cfg, &tok, &hub).unwrap();
    assert!(!status.reused);
    let (again, status_again) = axl::data::prepare_cached(&cfg, &tok, &hub).unwrap();
    assert!(status_again.reused && status_again.dir == status.dir);
    assert_eq!(again, first);

    write(
        dir.path(),
        "a.jsonl",
        &ALPACA_ROWS.replace("\"Hi!\"", "\"Hello!\""),
    );
    let (edited, status_edited) = axl::data::prepare_cached(&cfg, &tok, &hub).unwrap();
    assert!(
        !status_edited.reused && status_edited.dir != status.dir,
        "editing one row must invalidate the cache"
    );
    assert_eq!(texts(&edited.examples[0]).1, "Hello!<|im_end|>");

    let other =
        axl::config::LoadedConfig::load(&write_config(dir.path(), "train_on_inputs: true\n"))
            .unwrap();
    let (_, status_other) = axl::data::prepare_cached(&other, &tok, &hub).unwrap();
    assert_ne!(
        status_other.dir, status_edited.dir,
        "a setting that shapes the result changes the key"
    );
}

#[test]
fn preprocess_debug_marks_masked_tokens_and_json_gives_ids_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    let config = write_config(dir.path(), "");
    let out = axl("preprocess", &config, &["--debug"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("[Bel](-100, ") && stdout.contains("<|im_end|>(2, 2)"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 rows -> 2 examples"));

    let out = axl(
        "preprocess",
        &config,
        &["--debug", "--json", "--debug-num-examples", "2"],
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["text"]
        .as_str()
        .unwrap()
        .ends_with("### Response:\nHi!<|im_end|>"));
    assert_eq!(
        lines[0]["input_ids"].as_array().unwrap().len(),
        lines[0]["labels"].as_array().unwrap().len()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reused the prepared dataset"));
}

#[test]
fn bad_rows_are_named_by_dataset_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": \"b\"\n",
    );
    let err = run(
        dir.path(),
        "path: {dir}/bad.jsonl\ntype: alpaca",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("datasets[0]") && err.contains("bad.jsonl line 2: malformed JSON"),
        "{err}"
    );

    write(
        dir.path(),
        "missing.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"output\": \"b\"}\n",
    );
    let err = run(
        dir.path(),
        "path: {dir}/missing.jsonl\ntype: alpaca",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing.jsonl line 2: field `instruction`: missing"),
        "{err}"
    );

    write(
        dir.path(),
        "roles.jsonl",
        r#"{"messages": [{"role": "human", "content": "hi"}, {"role": "robot", "content": "beep"}]}"#,
    );
    let err = run(
        dir.path(),
        "path: {dir}/roles.jsonl\ntype: chat_template\nchat_template: chatml",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("roles.jsonl line 1: field `messages[1].role`: role `robot` is not in the roles mapping"), "{err}");

    write(
        dir.path(),
        "chat.jsonl",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    );
    let raising = "path: {dir}/chat.jsonl\ntype: chat_template\nchat_template: jinja\nchat_template_jinja: \"{{ raise_exception('roles must alternate') }}\"";
    let err = run(dir.path(), raising, &settings())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat.jsonl line 1") && err.contains("roles must alternate"),
        "{err}"
    );

    let unknown_template =
        "path: {dir}/chat.jsonl\ntype: chat_template\nchat_template: no_such_template";
    let err = run(dir.path(), unknown_template, &settings())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("datasets[0]")
            && !err.contains("line 1")
            && err.contains(
                "field `chat_template`: no built-in chat template named `no_such_template`"
            ),
        "{err}"
    );

    write(dir.path(), "empty.jsonl", "");
    let err = run(
        dir.path(),
        "path: {dir}/empty.jsonl\ntype: alpaca",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no training example is left"), "{err}");

    let err = run(
        dir.path(),
        "path: {dir}/nope.jsonl\ntype: alpaca",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nope.jsonl: no such file or directory"),
        "{err}"
    );
    let err = run(
        dir.path(),
        "path: {dir}/chat.jsonl\ntype: alpaca_chat:load_qa",
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("did you mean `alpaca_chat.load_qa`?"), "{err}");
}

#[test]
fn unknown_dataset_keys_name_the_nearest_one_with_its_line() {
    let text = "base_model: x\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n  - path: b.jsonl\n    feild_messages: conversations\n";
    let err = axl::config::LoadedConfig::from_str(text, Path::new("c.yml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 6: datasets[1].feild_messages: unknown dataset key; did you mean `field_messages`?"), "{err}");
}

#[test]
fn split_thinking_moves_reasoning_out_of_the_content_for_the_template() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "think.jsonl",
        r#"{"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>\nBecause of physics.\n</think>\nRayleigh scattering."}]}"#,
    );
    let yaml = "path: {dir}/think.jsonl\ntype: chat_template\nchat_template: qwen3\nsplit_thinking: true\n";
    let (examples, _) = run(dir.path(), yaml, &settings()).unwrap();
    let (full, trained) = texts(&examples[0]);
    assert_eq!(full, "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n<think>\nBecause of physics.\n</think>\n\nRayleigh scattering.<|im_end|>\n");
    assert_eq!(trained, "Rayleigh scattering.<|im_end|>");
}

#[test]
fn chat_template_kwargs_reach_the_template() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "c.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#,
    );
    let mut s = settings();
    s.chat_template_jinja =
        Some("{% for m in messages %}{{ greeting }}{{ m.content }}|{% endfor %}".into());
    s.chat_template_kwargs = Some(r#"{"greeting": "> "}"#.into());
    let (examples, _) = run(
        dir.path(),
        "path: {dir}/c.jsonl\ntype: chat_template\ntrain_on_eos: none",
        &s,
    )
    .unwrap();
    assert_eq!(texts(&examples[0]), ("> Hi|> Yo|".into(), "Yo".into()));
}

#[test]
fn pretraining_dataset_streams_packed_batches_of_every_document_in_order() {
    use axl::data::pretraining::PretrainingStream;
    let dir = tempfile::tempdir().unwrap();
    let docs = [
        "first document",
        "the second, somewhat longer document of the corpus",
        "third",
        "skipped?",
    ];
    let lines: String = docs
        .iter()
        .map(|d| format!("{{\"body\": \"{d}\"}}\n"))
        .collect();
    write(dir.path(), "corpus.jsonl", &lines);
    let ds: DatasetConfig = serde_yaml::from_str(&format!(
        "path: {}/corpus.jsonl\ntext_column: body\nskip: 1",
        dir.path().display()
    ))
    .unwrap();
    let s = settings();
    let tok = tokenizer();
    let ctx = axl::data::pipeline::strategy_context(&s, &tok, dir.path(), None).unwrap();
    let (files, forced) = axl::data::pipeline::dataset_files(&ds, dir.path(), &offline()).unwrap();
    let mut stream = PretrainingStream::new(&ds, files, forced, ctx, 8, 2).unwrap();
    let mut text = String::new();
    let mut batches = 0;
    while let Some(batch) = stream.next_batch().unwrap() {
        batches += 1;
        assert_eq!(
            batch.input_ids[0].len(),
            16,
            "bins of micro_batch_size × sequence_len"
        );
        let pad = tok.pad.as_ref().unwrap().1;
        let mut ids = batch.input_ids[0].clone();
        while ids.last() == Some(&pad) {
            ids.pop();
        }
        // Every token is trained but the first of each packed piece (nothing before it in
        // its own sequence predicts it; position 0 is never predicted at all) and the padding.
        let layout = batch.layout.as_ref().unwrap();
        for (i, label) in batch.labels[0].iter().enumerate().take(ids.len()) {
            let starts_piece = i > 0 && layout.sequence_ids[0][i] != layout.sequence_ids[0][i - 1];
            assert_eq!(*label == -100, starts_piece, "label {i} of batch {batches}");
        }
        text.push_str(&tok.decode(&ids, false).unwrap());
    }
    assert!(batches >= 2);
    let expected: String = docs[1..].iter().map(|d| format!("{d}<|im_end|>")).collect();
    assert_eq!(text, expected);
    assert!(!text.contains("first"), "skip: 1 skips the first row");

    let config = "base_model: x\npretraining_dataset:\n  - path: corpus.jsonl\n";
    let err = axl::config::LoadedConfig::from_str(config, Path::new("c.yml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_steps: required with pretraining_dataset"),
        "{err}"
    );
}

#[test]
fn parquet_files_written_by_pyarrow_read_with_lists_and_structs() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    let (examples, reports) = run(
        &data,
        "path: {dir}/alpaca.parquet\ntype: alpaca",
        &settings(),
    )
    .unwrap();
    assert_eq!(reports[0].rows, 3);
    assert_eq!(texts(&examples[1]).1, "5<|im_end|>");
    assert!(texts(&examples[1]).0.contains("### Input:\n2 and 3"));
    let (examples, _) = run(
        &data,
        "path: {dir}/chat.parquet\ntype: chat_template",
        &settings(),
    )
    .unwrap();
    assert_eq!(texts(&examples[1]).1, "See you.<|im_end|>");
}

#[test]
fn several_datasets_are_merged_and_shuffled_reproducibly_with_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..20)
        .map(|i| format!("{{\"text\": \"row {i}\"}}\n"))
        .collect();
    write(dir.path(), "a.jsonl", &rows);
    write(
        dir.path(),
        "b.jsonl",
        "{\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}\n",
    );
    let datasets: Vec<DatasetConfig> = serde_yaml::from_str(&format!(
        "- path: {d}/a.jsonl\n  type: completion\n- path: {d}/b.jsonl\n  type: alpaca\n",
        d = dir.path().display()
    ))
    .unwrap();
    let mut s = settings();
    s.shuffle = true;
    let order = |s: &DataSettings| {
        let (examples, reports) =
            prepare(&datasets, s, &tokenizer(), &offline(), dir.path()).unwrap();
        assert_eq!(reports.iter().map(|r| r.examples).sum::<usize>(), 21);
        examples.iter().map(|e| texts(e).0).collect::<Vec<_>>()
    };
    let first = order(&s);
    assert_eq!(first, order(&s), "the same seed gives the same order");
    assert!(first.iter().any(|t| t.contains("### Response:\nHi!")));
    s.seed = 7;
    assert_ne!(first, order(&s));
    s.shuffle = false;
    assert_eq!(order(&s)[0], "row 0<|im_end|>");
}

#[test]
fn special_tokens_from_the_config_override_the_tokenizer_and_unknown_ones_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", ALPACA_ROWS);
    let preprocess = |extra: &str| {
        let config = write_config(dir.path(), extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
            .args(["preprocess", config.to_str().unwrap(), "--debug", "--json"])
            .output()
            .unwrap()
    };
    let out = preprocess("special_tokens:\n  eos_token: \"<|endoftext|>\"\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        line["text"].as_str().unwrap().ends_with("Hi!<|endoftext|>"),
        "{line}"
    );
    let out = preprocess("special_tokens:\n  eos_token: \"</s>\"\n");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("special_tokens.eos_token: `</s>` is not in the vocabulary"),
        "{stderr}"
    );
}
