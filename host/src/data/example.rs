//! What a prompt strategy makes of a row, and how that becomes token ids and labels.
//!
//! A strategy produces text with trainable byte ranges; the text is tokenized once, with
//! offsets, and a token is trained when it overlaps a trainable range (the model has to emit
//! that token to produce the trained text), or, for ranges marked whole-token, when it lies
//! entirely inside one. (Axolotl
//! tokenizes prompt and response separately and concatenates the ids, so its token boundaries
//! at the join can differ from what the model sees at inference time; axl tokenizes the text
//! the model will be given.)

use std::ops::Range;

use crate::model::ops::IGNORE_INDEX;
use crate::model::tokenizer::ModelTokenizer;

use super::error::{DataError, Result};

/// Text with trainable byte ranges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextExample {
    /// The full text.
    pub text: String,
    /// Byte ranges of `text` whose tokens are trained: every token overlapping one.
    pub trainable: Vec<Range<usize>>,
    /// Byte ranges of `text` whose tokens are trained only when entirely inside one.
    pub trainable_whole_tokens: Vec<Range<usize>>,
    /// Let the tokenizer add its special tokens (BOS), as `tokenizer(text)` does in Python.
    pub add_special_tokens: bool,
    /// Append the EOS token after the text, trained or not, unless the text already ends with it.
    pub append_eos: Option<bool>,
    /// Train on every token, special tokens included (`train_on_inputs`).
    pub train_all: bool,
    /// Cut the tokens into consecutive pieces of `sequence_len` (`completion`).
    pub chunk: bool,
    /// Values a plugin keeps with the example for its loss.
    pub fields: Option<serde_json::Map<String, serde_json::Value>>,
}

impl TextExample {
    /// Builds text from pieces, each trained or not.
    pub fn from_pieces(pieces: &[(&str, bool)]) -> Self {
        let mut example = Self::default();
        for (text, train) in pieces {
            let start = example.text.len();
            example.text.push_str(text);
            if *train && !text.is_empty() {
                example.trainable.push(start..example.text.len());
            }
        }
        example
    }
}

/// What a strategy makes of one row.
#[derive(Clone, Debug, PartialEq)]
pub enum Formatted {
    /// Text to tokenize.
    Text(TextExample),
    /// Ids and labels the row already holds.
    Tokens {
        /// Token ids.
        input_ids: Vec<u32>,
        /// Labels, −100 where not trained.
        labels: Vec<i64>,
    },
}

/// A tokenized example.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tokenized {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels: the id where trained, −100 elsewhere.
    pub labels: Vec<i64>,
    /// Values a plugin kept with the example for its loss (shared by the batches that hold
    /// the example).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
}

impl Tokenized {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|l| **l != IGNORE_INDEX).count()
    }
}

/// Token ids, byte offsets into the text, and the special-token mask.
type Encoded = (Vec<u32>, Vec<(usize, usize)>, Vec<u32>);

/// Token ids, byte offsets into `text` and the special-token mask.
///
/// Fastest path: the byte-level BPE encoder, for the tokenizer configurations it reproduces.
/// Then: the library's ids without offsets, and offsets from the bytes each token stands for,
/// used only when those bytes spell `text` exactly; otherwise the library computes the
/// offsets itself.
fn encode_with_offsets(
    tokenizer: &ModelTokenizer,
    text: &str,
    add_special_tokens: bool,
) -> Result<Encoded> {
    if let Some(encoding) = tokenizer
        .byte_level_bpe()
        .and_then(|bpe| bpe.encode(text, add_special_tokens))
    {
        return Ok((encoding.ids, encoding.offsets, encoding.special));
    }
    let fail = |e: tokenizers::Error| DataError::msg(format!("tokenization failed: {e}"));
    let fast = tokenizer
        .inner
        .encode_fast(text, add_special_tokens)
        .map_err(fail)?;
    if let Some(offsets) = offsets_from_bytes(
        tokenizer,
        fast.get_ids(),
        fast.get_special_tokens_mask(),
        text.as_bytes(),
    ) {
        return Ok((
            fast.get_ids().to_vec(),
            offsets,
            fast.get_special_tokens_mask().to_vec(),
        ));
    }
    let full = tokenizer
        .inner
        .encode(text, add_special_tokens)
        .map_err(fail)?;
    Ok((
        full.get_ids().to_vec(),
        full.get_offsets().to_vec(),
        full.get_special_tokens_mask().to_vec(),
    ))
}

/// Offsets of `ids` in `text` from the bytes of each token, if they spell `text` exactly.
/// Tokens the post-processor added (special, and spelling nothing of the text here) get an
/// empty range at their position.
fn offsets_from_bytes(
    tokenizer: &ModelTokenizer,
    ids: &[u32],
    special: &[u32],
    text: &[u8],
) -> Option<Vec<(usize, usize)>> {
    let table = tokenizer.token_bytes();
    let mut offsets = Vec::with_capacity(ids.len());
    let mut at = 0usize;
    for (i, &id) in ids.iter().enumerate() {
        let bytes = table.get(id as usize)?.as_deref()?;
        if text.get(at..at + bytes.len()) == Some(bytes) {
            offsets.push((at, at + bytes.len()));
            at += bytes.len();
        } else if special.get(i) == Some(&1) {
            offsets.push((at, at));
        } else {
            return None;
        }
    }
    (at == text.len()).then_some(offsets)
}

/// Tokenizes a formatted example into one or more tokenized examples (several when chunked).
pub fn tokenize(
    formatted: Formatted,
    tokenizer: &ModelTokenizer,
    sequence_len: usize,
) -> Result<Vec<Tokenized>> {
    let example = match formatted {
        Formatted::Tokens { input_ids, labels } => {
            if input_ids.len() != labels.len() {
                return Err(DataError::msg(format!(
                    "input_ids has {} tokens but labels has {}",
                    input_ids.len(),
                    labels.len()
                )));
            }
            return Ok(vec![Tokenized {
                input_ids,
                labels,
                fields: None,
            }]);
        }
        Formatted::Text(t) => t,
    };
    let (ids, offsets, special) =
        encode_with_offsets(tokenizer, &example.text, example.add_special_tokens)?;
    let mut input_ids = Vec::with_capacity(ids.len() + 2);
    let mut labels = Vec::with_capacity(ids.len() + 2);
    if example.add_special_tokens && tokenizer.add_bos_token {
        if let Some((_, bos)) = &tokenizer.bos {
            if ids.first() != Some(bos) {
                input_ids.push(*bos);
                labels.push(if example.train_all {
                    *bos as i64
                } else {
                    IGNORE_INDEX
                });
            }
        }
    }
    for (i, &id) in ids.iter().enumerate() {
        let (start, end) = offsets[i];
        let added_by_tokenizer = special[i] == 1 && start == end;
        let overlaps = |r: &Range<usize>| {
            if start == end {
                r.start <= start && start < r.end
            } else {
                start < r.end && r.start < end
            }
        };
        let trained = example.train_all
            || (!added_by_tokenizer
                && (example.trainable.iter().any(overlaps)
                    || example
                        .trainable_whole_tokens
                        .iter()
                        .any(|r| r.start <= start && end <= r.end)));
        input_ids.push(id);
        labels.push(if trained { id as i64 } else { IGNORE_INDEX });
    }
    if let Some(train_eos) = example.append_eos {
        let eos = tokenizer.eos.as_ref().map(|e| e.1).ok_or_else(|| {
            DataError::msg("the tokenizer has no eos_token to append; set special_tokens.eos_token")
        })?;
        if input_ids.last() != Some(&eos) {
            input_ids.push(eos);
            labels.push(if train_eos || example.train_all {
                eos as i64
            } else {
                IGNORE_INDEX
            });
        }
    }
    let all = Tokenized {
        input_ids,
        labels,
        fields: example.fields.map(std::sync::Arc::new),
    };
    if !example.chunk || sequence_len == 0 {
        return Ok(vec![all]);
    }
    Ok(all
        .input_ids
        .chunks(sequence_len)
        .zip(all.labels.chunks(sequence_len))
        .map(|(i, l)| Tokenized {
            input_ids: i.to_vec(),
            labels: l.to_vec(),
            fields: all.fields.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_from_token_bytes_equal_the_tokenizers_own() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        let tokenizer = ModelTokenizer::load(&dir).unwrap();
        let texts = [
            "Hello world",
            "  leading and trailing spaces  ",
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nüñíçødé — “quotes” 日本語 🚀<|im_end|>",
            "tabs\tand\nnewlines\r\n\n\nend",
            "numbers 0123456789 and punctuation!?.,;:'\"()[]{}",
            "",
        ];
        for text in texts {
            for add_special in [false, true] {
                let full = tokenizer.inner.encode(text, add_special).unwrap();
                let fast = tokenizer.inner.encode_fast(text, add_special).unwrap();
                assert_eq!(fast.get_ids(), full.get_ids());
                let offsets = offsets_from_bytes(
                    &tokenizer,
                    fast.get_ids(),
                    fast.get_special_tokens_mask(),
                    text.as_bytes(),
                )
                .unwrap_or_else(|| panic!("fast path refused {text:?}"));
                // Byte-exact where the tokenizer widens partial characters to whole ones; the
                // same tokens overlap every character-aligned range either way.
                let widened: Vec<(usize, usize)> = offsets
                    .iter()
                    .map(|o| crate::model::byte_bpe::tests::widen(text, *o))
                    .collect();
                assert_eq!(widened, full.get_offsets(), "{text:?}");
            }
        }
    }
}
