//! Every built-in chat template renders byte for byte what transformers renders for it
//! (`tests/fixtures/chat_templates/renders.json`, made by the generator script beside it, which
//! also checks the texts against Axolotl's templates of the same names), and raises where
//! transformers raises.

use axl::chat_template::{builtin, ChatTemplate, SpecialTokens, BUILTIN_NAMES};
use serde_json::Value;

fn today_utc() -> String {
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}").unwrap();
    t.render_values(&[], None, false, &SpecialTokens::default())
        .unwrap()
}

#[test]
fn builtin_templates_render_exactly_what_transformers_renders() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates/renders.json");
    let records: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let today = today_utc();
    let mut covered = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for r in &records {
        let name = r["template"].as_str().unwrap();
        let case = r["case"].as_str().unwrap();
        covered.insert(name.to_string());
        let template =
            ChatTemplate::new(builtin(name).unwrap_or_else(|| panic!("no built-in {name}")))
                .unwrap();
        let special = SpecialTokens {
            bos_token: r["bos_token"].as_str().map(str::to_string),
            eos_token: r["eos_token"].as_str().map(str::to_string),
            ..SpecialTokens::default()
        };
        let tools = r.get("tools").filter(|t| !t.is_null());
        let kwargs = r["kwargs"].as_object().cloned().unwrap_or_default();
        let got = template.render_with(
            r["messages"].as_array().unwrap(),
            tools,
            r["add_generation_prompt"].as_bool().unwrap(),
            &special,
            &kwargs,
        );
        match (&got, r.get("text"), r.get("error")) {
            (Ok(text), Some(expected), _) => {
                let expected = expected.as_str().unwrap().replace("{today}", &today);
                if *text != expected {
                    failures.push(format!(
                        "{name}/{case}:\n  axl:          {text:?}\n  transformers: {expected:?}"
                    ));
                }
            }
            (Err(e), _, Some(expected)) => {
                let expected = expected.as_str().unwrap();
                let raised_by_template = r["raised_by_template"].as_bool().unwrap_or(true);
                if raised_by_template && !e.to_string().contains(expected) {
                    failures.push(format!(
                        "{name}/{case}: raised {e}, transformers raised {expected:?}"
                    ));
                }
            }
            (Ok(text), None, Some(expected)) => failures.push(format!(
                "{name}/{case}: rendered {text:?}, transformers raised {expected}"
            )),
            (Err(e), Some(_), _) => {
                failures.push(format!("{name}/{case}: raised {e}, transformers rendered"))
            }
            _ => unreachable!(),
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let missing: Vec<&&str> = BUILTIN_NAMES
        .iter()
        .filter(|n| !covered.contains(**n))
        .collect();
    assert!(
        missing.is_empty(),
        "built-in templates without renderings: {missing:?}"
    );
}

/// The trained parts of a conversation, as text, for a built-in template.
fn trained_parts(template: &str, eot: &[&str], messages: Value) -> Vec<String> {
    use axl::data::config::DatasetConfig;
    use axl::data::example::Formatted;
    use axl::data::source::Row;
    use axl::data::strategy::{Strategy, StrategyContext};
    let tokenizer = super::data::tokenizer();
    let ds = DatasetConfig {
        kind: Some(axl::data::config::DatasetType::Name("chat_template".into())),
        chat_template: Some(template.into()),
        eot_tokens: Some(eot.iter().map(|s| s.to_string()).collect()),
        ..DatasetConfig::default()
    };
    let ctx = StrategyContext {
        train_on_inputs: false,
        chat_template: None,
        chat_template_jinja: None,
        eot_tokens: None,
        chat_template_kwargs: serde_json::Map::new(),
        base_dir: std::path::Path::new("."),
        tokenizer: &tokenizer,
        plugins: axl::data::strategy::PluginFormats::builtin(false).unwrap(),
    };
    let strategy = Strategy::for_dataset(&ds, &ctx).unwrap();
    let row = Row {
        fields: serde_json::Map::from_iter([("messages".to_string(), messages)]),
        file: std::sync::Arc::new("test.jsonl".into()),
        location: axl::data::Location::Line(1),
    };
    let Formatted::Text(example) = strategy.format(&row, &tokenizer).unwrap().remove(0) else {
        panic!()
    };
    example
        .trainable
        .iter()
        .map(|r| example.text[r.clone()].to_string())
        .collect()
}

#[test]
fn every_builtin_template_trains_exactly_the_assistant_turns_and_their_end_of_turn_markers() {
    let with_system = serde_json::json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]);
    let without_system = serde_json::json!([
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]);
    // (template, end-of-turn marker, whether the template accepts a system message)
    let cases: &[(&str, &str, bool)] = &[
        ("chatml", "<|im_end|>", true),
        ("qwen_25", "<|im_end|>", true),
        ("qwen3", "<|im_end|>", true),
        ("nemotron_h", "<|im_end|>", true),
        ("llama3", "<|eot_id|>", true),
        ("llama3_2_vision", "<|eot_id|>", true),
        ("llama4", "<|eot|>", true),
        ("mistral_v1", "<|im_end|>", true),
        ("mistral_v2v3", "<|im_end|>", true),
        ("mistral_v3_tekken", "<|im_end|>", true),
        ("mistral_v7_tekken", "<|im_end|>", true),
        ("gemma", "<end_of_turn>", false),
        ("gemma3", "<end_of_turn>", true),
        ("phi_3", "<|end|>", true),
        ("phi_35", "<|end|>", true),
        ("deepseek_v2", "<|im_end|>", true),
        ("deepseek_v3", "<｜end▁of▁sentence｜>", true),
        ("cohere", "<|END_OF_TURN_TOKEN|>", true),
        ("jamba", "<|eom|>", true),
        ("alpaca", "<|im_end|>", true),
    ];
    let mut failures = Vec::new();
    for (template, eot, system) in cases {
        let messages = if *system {
            with_system.clone()
        } else {
            without_system.clone()
        };
        let got = trained_parts(template, &[eot], messages);
        let expected = vec![
            "Hello.".to_string(),
            eot.to_string(),
            "Four.".to_string(),
            eot.to_string(),
        ];
        if got != expected {
            failures.push(format!(
                "{template}: trained {got:?}, expected {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // metharme closes only the conversation, with EOS.
    assert_eq!(
        trained_parts("metharme", &["<|im_end|>"], with_system),
        vec!["Hello.", "Four.", "<|im_end|>"]
    );
}
