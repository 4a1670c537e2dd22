use axl_sdk::testing::TestHost;

use super::*;

fn plugin(train_on_inputs: bool) -> PromptStrategiesPlugin {
    let mut plugin = PromptStrategiesPlugin::default();
    let run = RunContext {
        config: json!({ "train_on_inputs": train_on_inputs }),
        ..RunContext::default()
    };
    plugin.configure(&run, &mut TestHost::default()).unwrap();
    plugin
}

fn entry(config: Value) -> DatasetEntry {
    let dataset_type = match config.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => USER_DEFINED_TYPE.to_string(),
    };
    DatasetEntry {
        dataset_type,
        config,
    }
}

fn row(value: Value) -> Row {
    match value {
        Value::Object(map) => map,
        _ => panic!("a row is an object"),
    }
}

fn format(
    plugin: &mut PromptStrategiesPlugin,
    config: Value,
    r: Value,
) -> Result<Formatted, PluginError> {
    plugin.format_example(&entry(config), &row(r), &mut TestHost::default())
}

fn pieces(f: &Formatted) -> Vec<(&str, bool)> {
    f.segments
        .iter()
        .map(|s| (s.text.as_str(), s.train))
        .collect()
}

#[test]
fn the_manifest_is_valid_and_lists_every_type() {
    let manifest = PromptStrategiesPlugin::default().manifest();
    manifest.validate().unwrap();
    for name in [
        "alpaca",
        "alpaca_chat.load_qa",
        "user_defined",
        "completion",
        "input_output",
        "chat_template",
    ] {
        assert!(
            manifest.provides.strategies.iter().any(|s| s == name),
            "{name}"
        );
    }
}

#[test]
fn alpaca_masks_the_prompt_unless_train_on_inputs() {
    let r = json!({"instruction": "Add.", "input": "1 2", "output": "3"});
    let f = format(&mut plugin(false), json!({"type": "alpaca"}), r.clone()).unwrap();
    assert_eq!(
        pieces(&f),
        vec![
            ("Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n", false),
            ("3", true),
        ]
    );
    assert!(f.add_special_tokens && f.append_eos && !f.train_all && !f.chunk);
    let f = format(&mut plugin(true), json!({"type": "alpaca"}), r).unwrap();
    assert!(f.segments.iter().all(|s| s.train) && f.train_all);
}

#[test]
fn an_empty_response_gets_no_eos() {
    let f = format(
        &mut plugin(false),
        json!({"type": "alpaca"}),
        json!({"instruction": "Hi"}),
    )
    .unwrap_err();
    assert_eq!(f.message, "field `output`: missing");
    let f = format(
        &mut plugin(false),
        json!({"type": "alpaca"}),
        json!({"instruction": "Hi", "output": ""}),
    )
    .unwrap();
    assert!(!f.append_eos);
}

#[test]
fn errors_name_the_field() {
    let mut p = plugin(false);
    let err = format(&mut p, json!({"type": "alpaca"}), json!({"output": "b"})).unwrap_err();
    assert_eq!(err.message, "field `instruction`: missing");
    let err = format(
        &mut p,
        json!({"type": "alpaca"}),
        json!({"instruction": [1], "output": "b"}),
    )
    .unwrap_err();
    assert_eq!(
        err.message,
        "field `instruction`: expected text, found a list"
    );
    let err = format(
        &mut p,
        json!({"type": "alpaca_chat", "conversation": "vicuna"}),
        json!({"instruction": "a", "output": "b"}),
    )
    .unwrap_err();
    assert!(
        err.message
            .starts_with("the entry's `conversation`: unknown prompt style `vicuna`"),
        "{}",
        err.message
    );
}

#[test]
fn the_strategy_follows_the_entry_it_is_given() {
    let mut p = plugin(false);
    let r = json!({"instruction": "Hi", "output": "Yo"});
    let chat = format(&mut p, json!({"type": "alpaca_chat"}), r.clone()).unwrap();
    let chatml = format(
        &mut p,
        json!({"type": "alpaca_chat", "conversation": "chatml"}),
        r,
    )
    .unwrap();
    assert!(
        chat.segments[0].text.ends_with("USER: Hi\nASSISTANT:"),
        "{chat:?}"
    );
    assert!(
        chatml.segments[0].text.ends_with("<|im_start|>assistant\n"),
        "{chatml:?}"
    );
}

#[test]
fn inline_formats_use_their_fields_and_axolotls_defaults() {
    let config = json!({"type": {"field_instruction": "q", "field_output": "a", "format": "Q: {instruction} ({input})\nA: ", "no_input_format": "Q: {instruction}\nA: ", "system_prompt": null}});
    let mut p = plugin(false);
    let f = format(
        &mut p,
        config.clone(),
        json!({"q": "Why?", "a": "Because."}),
    )
    .unwrap();
    assert_eq!(
        pieces(&f),
        vec![("Q: Why?\nA: ", false), ("Because.", true)]
    );
    let f = format(
        &mut p,
        config,
        json!({"q": "Why?", "input": "sky", "a": "Because."}),
    )
    .unwrap();
    assert_eq!(f.segments[0].text, "Q: Why? (sky)\nA: ");
    let f = format(&mut p, json!({"type": {}}), json!({"instruction": "Hi"})).unwrap();
    assert_eq!(pieces(&f), vec![("Hi ", false), ("", true)]);
}

#[test]
fn inference_prompts_are_the_untrained_prompt() {
    let alpaca = InstructStrategy::by_name("alpaca", None, false)
        .unwrap()
        .unwrap();
    assert_eq!(
        alpaca.prompt("Say hi."),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    );
    let chat = InstructStrategy::by_name("alpaca:chatml", None, false)
        .unwrap()
        .unwrap();
    assert!(chat
        .prompt("Hi")
        .ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn completion_trains_everything_in_pieces_and_skips_empty_text() {
    let mut p = plugin(false);
    let f = format(
        &mut p,
        json!({"type": "completion"}),
        json!({"text": "Once upon a time"}),
    )
    .unwrap();
    assert_eq!(pieces(&f), vec![("Once upon a time", true)]);
    assert!(f.train_all && f.chunk && f.add_special_tokens && f.append_eos);
    let f = format(
        &mut p,
        json!({"type": "completion", "field": "body"}),
        json!({"body": ""}),
    )
    .unwrap();
    assert_eq!(f, Formatted::nothing());
    let err = format(&mut p, json!({"type": "completion"}), json!({"body": "x"})).unwrap_err();
    assert_eq!(err.message, "field `text`: missing");
}

#[test]
fn input_output_keeps_the_segments_as_written() {
    let r =
        json!({"segments": [{"text": "<s>Q ", "label": false}, {"text": "A</s>", "label": true}]});
    let f = format(
        &mut plugin(false),
        json!({"type": "input_output"}),
        r.clone(),
    )
    .unwrap();
    assert_eq!(pieces(&f), vec![("<s>Q ", false), ("A</s>", true)]);
    assert!(!f.add_special_tokens && !f.append_eos && !f.train_all);
    let f = format(&mut plugin(true), json!({"type": "input_output"}), r).unwrap();
    assert!(f.segments.iter().all(|s| s.train));
    let err = format(
        &mut plugin(false),
        json!({"type": "input_output"}),
        json!({"segments": [{"text": "x", "label": "yes"}]}),
    )
    .unwrap_err();
    assert_eq!(
        err.message,
        "field `segments[0].label`: expected true or false, found a string"
    );
}

#[test]
fn chat_templates_are_rendered_by_the_host() {
    let f = format(
        &mut plugin(false),
        json!({"type": "chat_template.default"}),
        json!({"messages": []}),
    )
    .unwrap();
    assert_eq!(f.base.as_deref(), Some("chat_template"));
}

#[test]
fn bad_entries_stop_the_run_at_configure() {
    let run = RunContext {
        config: json!({
            "datasets": [
                {"path": "a.jsonl", "type": "alpaca"},
                {"path": "b.jsonl", "type": "alpaca_chat", "conversation": "vicuna"},
                {"path": "c.jsonl", "type": {"format": "{instruction}"}},
            ],
            "test_datasets": [{"path": "d.jsonl", "type": "user_defined"}],
        }),
        ..RunContext::default()
    };
    let err = PromptStrategiesPlugin::default()
        .configure(&run, &mut TestHost::default())
        .unwrap_err();
    assert!(
        err.message
            .starts_with("datasets[1].conversation: unknown prompt style `vicuna`"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains(
            "; test_datasets[0].type: `user_defined` is the type of an inline prompt format"
        ),
        "{}",
        err.message
    );
}

#[test]
fn an_empty_input_output_row_is_an_empty_example() {
    let f = format(
        &mut plugin(false),
        json!({"type": "input_output"}),
        json!({"segments": []}),
    )
    .unwrap();
    assert_eq!(pieces(&f), vec![("", false)]);
}
