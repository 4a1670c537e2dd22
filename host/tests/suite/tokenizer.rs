//! Tokenizer files: special tokens and the chat template from `chat_template.jinja` or from
//! `tokenizer_config.json`, and `generation_config.json`.

use axl::chat_template::{ChatTemplate, Message, SpecialTokens};
use axl::model::tokenizer::ModelTokenizer;

use super::common::fixture;

#[test]
fn special_tokens_template_and_generation_config_load_from_either_layout() {
    for name in ["llama", "qwen2"] {
        let dir = fixture(name);
        assert_eq!(
            dir.join("chat_template.jinja").is_file(),
            name == "llama",
            "fixture layout"
        );
        let tok = ModelTokenizer::load(&dir).unwrap();
        assert_eq!(tok.eos.as_ref().map(|e| e.0.as_str()), Some("<|im_end|>"));
        assert_eq!(
            tok.pad.as_ref().map(|e| e.0.as_str()),
            Some("<|endoftext|>")
        );
        assert_eq!(tok.generation.eos_token_ids, vec![2]);
        let template =
            ChatTemplate::new(tok.chat_template.as_deref().expect("a chat template")).unwrap();
        let text = template
            .render(
                &[
                    Message::new("user", "Hi"),
                    Message::new("assistant", "Hello!"),
                ],
                false,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "byte-level BPE round-trips"
        );
        assert!(tok.stop_ids(&[]).contains(&tok.eos.as_ref().unwrap().1));
    }
}
