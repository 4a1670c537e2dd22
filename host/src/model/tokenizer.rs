//! A model directory's tokenizer: `tokenizer.json`, the special tokens and chat template of
//! `tokenizer_config.json` (or a separate `chat_template.jinja`), and `generation_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::byte_bpe::ByteLevelBpe;
use super::error::{ModelError, Result};

/// Generation defaults a model ships in `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Whether the model's authors sample by default.
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Top-k sampling.
    pub top_k: Option<usize>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// Length limit of new tokens.
    pub max_new_tokens: Option<usize>,
}

/// A loaded tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct ModelTokenizer {
    /// The fast tokenizer.
    pub inner: tokenizers::Tokenizer,
    /// `bos_token`, with its id.
    pub bos: Option<(String, u32)>,
    /// `eos_token`, with its id.
    pub eos: Option<(String, u32)>,
    /// `pad_token`, with its id.
    pub pad: Option<(String, u32)>,
    /// Whether the tokenizer prepends BOS when encoding with special tokens
    /// (`add_bos_token`, as LlamaTokenizer has it).
    pub add_bos_token: bool,
    /// The chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The generation defaults.
    pub generation: GenerationDefaults,
    /// Where the tokenizer was read from.
    pub dir: PathBuf,
    /// The bytes of each token id, when the vocabulary is byte-level (see [`Self::token_bytes`]).
    token_bytes: std::sync::Arc<std::sync::OnceLock<Vec<Option<Vec<u8>>>>>,
    /// The fast encoder, when the configuration allows one (see [`Self::byte_level_bpe`]).
    byte_bpe: std::sync::Arc<std::sync::OnceLock<Option<ByteLevelBpe>>>,
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        None => vec![],
    }
}

impl ModelTokenizer {
    /// Loads the tokenizer files of a model directory. `tokenizer.json` is required.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::file(
                &path,
                "missing (axl needs a fast tokenizer's tokenizer.json)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::file(&path, format!("cannot load: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let special = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(content) = config.get(key).and_then(token_content) else {
                return Ok(None);
            };
            let id = inner.token_to_id(&content).ok_or_else(|| {
                ModelError::key(
                    &config_path,
                    key,
                    format!("`{content}` is not in the vocabulary of tokenizer.json"),
                )
            })?;
            Ok(Some((content, id)))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let pad = special("pad_token")?;
        let add_bos_token = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let chat_template = Self::read_chat_template(dir, &config, &config_path)?;
        let generation = match read_json(&dir.join("generation_config.json"))? {
            None => GenerationDefaults::default(),
            Some(g) => GenerationDefaults {
                eos_token_ids: ids(g.get("eos_token_id")),
                bos_token_id: ids(g.get("bos_token_id")).first().copied(),
                pad_token_id: ids(g.get("pad_token_id")).first().copied(),
                do_sample: g.get("do_sample").and_then(Value::as_bool),
                temperature: g.get("temperature").and_then(Value::as_f64),
                top_p: g.get("top_p").and_then(Value::as_f64),
                top_k: g.get("top_k").and_then(Value::as_u64).map(|n| n as usize),
                repetition_penalty: g.get("repetition_penalty").and_then(Value::as_f64),
                max_new_tokens: g
                    .get("max_new_tokens")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize),
            },
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            add_bos_token,
            chat_template,
            generation,
            dir: dir.to_path_buf(),
            token_bytes: Default::default(),
            byte_bpe: Default::default(),
        })
    }

    fn read_chat_template(
        dir: &Path,
        config: &Value,
        config_path: &Path,
    ) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja)
                .map(Some)
                .map_err(|e| ModelError::file(&jinja, e));
        }
        if let Some(v) = read_json(&dir.join("chat_template.json"))? {
            if let Some(t) = v.get("chat_template").and_then(Value::as_str) {
                return Ok(Some(t.to_string()));
            }
        }
        match config.get("chat_template") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(named)) => {
                // A list of {name, template}; the one named "default" is what apply_chat_template uses.
                let pick = named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| named.first());
                Ok(pick
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string))
            }
            Some(other) => Err(ModelError::key(
                config_path,
                "chat_template",
                format!("expected a string, found {other}"),
            )),
        }
    }

    /// Token ids of `text`; with `add_special_tokens`, the tokenizer's post-processor (and
    /// `add_bos_token`) apply as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Invalid(format!("tokenization failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some((_, bos)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// The id batches are padded with: `pad_token`, else `eos_token`, else 0.
    pub fn padding_id(&self) -> u32 {
        self.pad.as_ref().or(self.eos.as_ref()).map_or(0, |t| t.1)
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Invalid(format!("detokenization failed: {e}")))
    }

    /// The byte-level BPE encoder that reproduces this tokenizer, if its configuration is one
    /// [`ByteLevelBpe`] knows. Built once, on first use.
    pub fn byte_level_bpe(&self) -> Option<&ByteLevelBpe> {
        self.byte_bpe
            .get_or_init(|| {
                let json = serde_json::to_value(&self.inner).ok()?;
                ByteLevelBpe::from_json(&json)
            })
            .as_ref()
    }

    /// The text bytes each token id stands for: the content of added tokens, and for the
    /// vocabulary the bytes of its byte-level (GPT-2 style) spelling; `None` for an id whose
    /// spelling is not byte-level. Computed once.
    pub fn token_bytes(&self) -> &[Option<Vec<u8>>] {
        self.token_bytes.get_or_init(|| {
            let byte_of = super::byte_bpe::byte_level_decoding_table();
            let size = self.inner.get_vocab_size(true);
            let mut table: Vec<Option<Vec<u8>>> = vec![None; size];
            for (token, id) in self.inner.get_vocab(false) {
                let bytes: Option<Vec<u8>> =
                    token.chars().map(|c| byte_of.get(&c).copied()).collect();
                if let Some(slot) = table.get_mut(id as usize) {
                    *slot = bytes;
                }
            }
            for (id, added) in self.inner.get_added_tokens_decoder() {
                if let Some(slot) = table.get_mut(id as usize) {
                    *slot = Some(added.content.as_bytes().to_vec());
                }
            }
            table
        })
    }

    /// Every id that ends generation: the generation config's EOS ids, the tokenizer's EOS,
    /// and the end-of-turn tokens of common chat formats that are in the vocabulary.
    pub fn stop_ids(&self, model_eos: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = self.generation.eos_token_ids.clone();
        out.extend_from_slice(model_eos);
        if let Some((_, id)) = &self.eos {
            out.push(*id);
        }
        for eot in [
            "<|im_end|>",
            "<|eot_id|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end|>",
        ] {
            if let Some(id) = self.inner.token_to_id(eot) {
                if self.inner.get_added_vocabulary().is_special_token(eot) {
                    out.push(id);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
