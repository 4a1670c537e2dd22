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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Tokenizes a formatted example into one or more tokenized examples (several when chunked).
pub fn tokenize(formatted: Formatted, tokenizer: &ModelTokenizer, sequence_len: usize) -> Result<Vec<Tokenized>> {
    let example = match formatted {
        Formatted::Tokens { input_ids, labels } => {
            if input_ids.len() != labels.len() {
                return Err(DataError::msg(format!(
                    "input_ids has {} tokens but labels has {}",
                    input_ids.len(),
                    labels.len()
                )));
            }
            return Ok(vec![Tokenized { input_ids, labels }]);
        }
        Formatted::Text(t) => t,
    };
    let encoding = tokenizer
        .inner
        .encode(example.text.as_str(), example.add_special_tokens)
        .map_err(|e| DataError::msg(format!("tokenization failed: {e}")))?;
    let ids = encoding.get_ids();
    let offsets = encoding.get_offsets();
    let special = encoding.get_special_tokens_mask();
    let mut input_ids = Vec::with_capacity(ids.len() + 2);
    let mut labels = Vec::with_capacity(ids.len() + 2);
    if example.add_special_tokens && tokenizer.add_bos_token {
        if let Some((_, bos)) = &tokenizer.bos {
            if ids.first() != Some(bos) {
                input_ids.push(*bos);
                labels.push(if example.train_all { *bos as i64 } else { IGNORE_INDEX });
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
                    || example.trainable_whole_tokens.iter().any(|r| r.start <= start && end <= r.end)));
        input_ids.push(id);
        labels.push(if trained { id as i64 } else { IGNORE_INDEX });
    }
    if let Some(train_eos) = example.append_eos {
        let eos = tokenizer
            .eos
            .as_ref()
            .map(|e| e.1)
            .ok_or_else(|| DataError::msg("the tokenizer has no eos_token to append; set special_tokens.eos_token"))?;
        if input_ids.last() != Some(&eos) {
            input_ids.push(eos);
            labels.push(if train_eos || example.train_all { eos as i64 } else { IGNORE_INDEX });
        }
    }
    let all = Tokenized { input_ids, labels };
    if !example.chunk || sequence_len == 0 {
        return Ok(vec![all]);
    }
    Ok(all
        .input_ids
        .chunks(sequence_len)
        .zip(all.labels.chunks(sequence_len))
        .map(|(i, l)| Tokenized { input_ids: i.to_vec(), labels: l.to_vec() })
        .collect())
}
