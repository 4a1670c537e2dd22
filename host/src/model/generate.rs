//! Autoregressive decoding with a KV cache: the prompt runs once, then each new token costs
//! one token's forward pass. Greedy or sampled (temperature, top-k, top-p), with
//! transformers' repetition penalty, stopping on end-of-sequence / end-of-turn ids.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::{ModelError, Result};
use super::transformer::{CausalLm, KvCache};

/// How tokens are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Sample (true) or take the most likely token (false).
    pub do_sample: bool,
    /// Divides the logits before sampling.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches this mass (1 = all).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Penalizes tokens already present (1 = none), as transformers does.
    pub repetition_penalty: f64,
    /// Seed of the sampling stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop id was produced (it is not part of the output).
    Stop,
    /// `max_new_tokens` were produced.
    Length,
    /// The callback asked to stop.
    Interrupted,
}

/// A decoding session over one model, keeping its KV cache between steps.
pub struct Decoder<'m> {
    model: &'m CausalLm,
    cache: KvCache,
    rng: ChaCha8Rng,
}

impl<'m> Decoder<'m> {
    /// A session with an empty cache.
    pub fn new(model: &'m CausalLm, seed: u64) -> Self {
        Self {
            model,
            cache: KvCache::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Number of positions in the cache.
    pub fn position(&self) -> usize {
        self.cache.len()
    }

    /// Runs `ids` through the model after the cached positions and returns the logits of the
    /// last one.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::Invalid("nothing to feed the model".into()));
        }
        let limit = self.model.config.max_position_embeddings;
        if self.cache.len() + ids.len() > limit {
            return Err(ModelError::Invalid(format!(
                "the context would exceed max_position_embeddings = {limit} of this model"
            )));
        }
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let hidden = self.model.hidden_states(&input, Some(&mut self.cache))?;
        let last = hidden.narrow(1, ids.len() - 1, 1)?;
        let logits = self.model.logits(&last)?;
        Ok(logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }

    /// Generates after `prompt`, calling `on_token` with each new token id (return `false`
    /// to stop). Returns the new ids (without the stop id) and why it stopped.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        stop_ids: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, StopReason)> {
        let mut seen: Vec<u32> = prompt.to_vec();
        let mut out = Vec::new();
        if params.max_new_tokens == 0 {
            return Ok((out, StopReason::Length));
        }
        let mut logits = self.feed(prompt)?;
        loop {
            let next = choose(&mut logits, &seen, params, &mut self.rng);
            if stop_ids.contains(&next) {
                return Ok((out, StopReason::Stop));
            }
            out.push(next);
            seen.push(next);
            if !on_token(next) {
                return Ok((out, StopReason::Interrupted));
            }
            if out.len() >= params.max_new_tokens {
                return Ok((out, StopReason::Length));
            }
            logits = self.feed(&[next])?;
        }
    }
}

/// Picks the next token from `logits` (modified in place by the penalty and warpers).
pub fn choose(
    logits: &mut [f32],
    seen: &[u32],
    params: &SamplingParams,
    rng: &mut impl Rng,
) -> u32 {
    if params.repetition_penalty != 1.0 {
        let p = params.repetition_penalty as f32;
        let mut ids: Vec<u32> = seen.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if !params.do_sample || params.temperature <= 0.0 {
        return argmax();
    }
    let t = params.temperature as f32;
    let mut ranked: Vec<(usize, f32)> = logits.iter().map(|&l| l / t).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if params.top_k > 0 && params.top_k < ranked.len() {
        ranked.truncate(params.top_k);
    }
    let max = ranked[0].1;
    let mut probs: Vec<f32> = ranked.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut mass = 0.0f32;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let draw: f32 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if draw < acc {
            return ranked[i].0 as u32;
        }
    }
    ranked[probs.len() - 1].0 as u32
}

/// Turns a growing list of token ids into text pieces as they become printable: a piece is
/// released once the decoded text no longer ends in an incomplete character.
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds a token and returns the text that became printable, if any.
    pub fn push(
        &mut self,
        id: u32,
        decode: impl Fn(&[u32]) -> Result<String>,
    ) -> Result<Option<String>> {
        self.ids.push(id);
        let text = decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(None);
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(piece))
    }
}

impl TextStream {
    /// The text not yet released, once no more tokens will come.
    pub fn finish(&mut self, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        let text = decode(&self.ids)?;
        let rest = if text.len() > self.printed && text.is_char_boundary(self.printed) {
            text[self.printed..].to_string()
        } else {
            String::new()
        };
        self.printed = text.len();
        Ok(rest)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}
