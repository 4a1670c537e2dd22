//! Differentiable building blocks of the decoder: norms, activations, rotary embeddings,
//! softmax, attention masks and the causal-LM loss.
//!
//! Each op is composed from candle primitives that have a backward pass. candle's fused
//! `rms_norm`, `softmax_last_dim`, `rope*` and `sdpa` have none and silently cut the graph,
//! so they are never used here.

use candle_core::{DType, Device, Tensor, D};

use super::hf_config::{RopeConfig, RopeScaling};

/// RMS normalization over the last dimension: `x / sqrt(mean(x²) + eps) * w`, or
/// `* (1 + w)` in Gemma's form. Computed in f32 like transformers.
pub fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    one_plus_weight: bool,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_mul(&(mean_square + eps)?.sqrt()?.recip()?)?;
    let weight = weight.to_dtype(DType::F32)?;
    let scale = if one_plus_weight {
        (weight + 1.0)?
    } else {
        weight
    };
    normed.broadcast_mul(&scale)?.to_dtype(dtype)
}

/// Softmax over the last dimension. The subtracted maximum is a constant for the gradient,
/// which is exact: softmax does not depend on it.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// `log(sum(exp(x)))` over the last dimension, kept as a trailing dimension of size 1.
pub fn log_sum_exp_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * 0.044715)?)? * SQRT_2_OVER_PI)?;
    ((inner.tanh()? + 1.0)? * x)? * 0.5
}

/// `cap * tanh(x / cap)`: Gemma 2's soft-capping.
pub fn soft_cap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    ((x / cap)?.tanh()?) * cap
}

/// Rotary embedding frequencies, computed in f32 exactly as transformers computes them.
#[derive(Clone, Debug)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    /// The frequencies for heads of size `head_dim`.
    pub fn new(config: &RopeConfig, head_dim: usize) -> Self {
        let base: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / config.theta.powf(i as f32 / head_dim as f32))
            .collect();
        let inv_freq = match config.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
                        let scaled = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        };
        Self { inv_freq }
    }

    /// `(cos, sin)` tables of shape `[len, head_dim]` for positions `start..start + len`.
    pub fn tables(
        &self,
        start: usize,
        len: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dim = self.inv_freq.len() * 2;
        let (cos, sin) = self.angles(start..start + len);
        Ok((
            Tensor::from_vec(cos, (len, dim), device)?,
            Tensor::from_vec(sin, (len, dim), device)?,
        ))
    }

    /// `(cos, sin)` of shape `[batch, 1, len, head_dim]` for explicit positions per row.
    pub fn tables_for_positions(
        &self,
        positions: &[Vec<usize>],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dim = self.inv_freq.len() * 2;
        let batch = positions.len();
        let len = positions.first().map_or(0, Vec::len);
        let (cos, sin) = self.angles(positions.iter().flatten().copied());
        Ok((
            Tensor::from_vec(cos, (batch, 1, len, dim), device)?,
            Tensor::from_vec(sin, (batch, 1, len, dim), device)?,
        ))
    }

    /// Cosines and sines of `position * inv_freq`, each frequency twice (rotate-half layout),
    /// position after position.
    fn angles(&self, positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            let position = p as f32;
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let angle = position * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }
}

/// Applies rotary embeddings to `x` of shape `[batch, heads, len, head_dim]` with tables of
/// shape `[len, head_dim]`, in transformers' rotate-half convention.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// An additive attention mask of shape `[rows * repeat, kv_len]` (0 where a query may attend,
/// −∞ elsewhere) for `rows` queries at positions `past..past + rows` over `kv_len` keys,
/// causal and, with `window`, limited to the last `window` positions. The mask is repeated
/// `repeat` times along the rows, for query heads folded onto their shared key/value head.
pub fn attention_mask(
    rows: usize,
    past: usize,
    kv_len: usize,
    window: Option<usize>,
    repeat: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut one = Vec::with_capacity(rows * kv_len);
    for i in 0..rows {
        let q = past + i;
        for k in 0..kv_len {
            let visible = k <= q && window.is_none_or(|w| q - k < w);
            one.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
        }
    }
    let mut all = Vec::with_capacity(one.len() * repeat);
    for _ in 0..repeat {
        all.extend_from_slice(&one);
    }
    Tensor::from_vec(all, (rows * repeat, kv_len), device)
}

/// The additive mask of packed rows, shape `[batch, 1, len * repeat, len]`: a token attends
/// only to earlier tokens of its own sequence (and, with `window`, only to the last `window`
/// positions of it).
pub fn packed_attention_mask(
    position_ids: &[Vec<usize>],
    sequence_ids: &[Vec<usize>],
    window: Option<usize>,
    repeat: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let batch = position_ids.len();
    let len = position_ids.first().map_or(0, Vec::len);
    let mut all = Vec::with_capacity(batch * repeat * len * len);
    for (positions, sequences) in position_ids.iter().zip(sequence_ids) {
        let mut one = Vec::with_capacity(len * len);
        for q in 0..len {
            for k in 0..len {
                let visible = k <= q
                    && sequences[k] == sequences[q]
                    && window.is_none_or(|w| positions[q] - positions[k] < w);
                one.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
        for _ in 0..repeat {
            all.extend_from_slice(&one);
        }
    }
    Tensor::from_vec(all, (batch, 1, repeat * len, len), device)
}

/// The label value that marks a position as not trained.
pub const IGNORE_INDEX: i64 = -100;

/// Summed next-token negative log-likelihood and the number of positions it counts.
pub struct TokenLoss {
    /// Sum of `-log p(label)` over the counted positions (a scalar, differentiable).
    pub sum: Tensor,
    /// Number of positions whose (shifted) label is not [`IGNORE_INDEX`].
    pub count: usize,
}

impl TokenLoss {
    /// The mean over counted positions, as transformers' causal-LM loss reports it
    /// (NaN when nothing is counted, as there).
    pub fn mean(&self) -> candle_core::Result<Tensor> {
        self.sum.clone() / self.count as f64
    }
}

/// Causal-LM cross-entropy with transformers' shift semantics: logits at position `t` predict
/// `labels[t + 1]`; labels equal to −100 are not counted. `logits` is `[batch, len, vocab]`,
/// `labels` is `[batch, len]` of integers.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<TokenLoss> {
    let (batch, len, vocab) = logits.dims3()?;
    if len < 2 {
        return Ok(TokenLoss {
            sum: Tensor::zeros((), DType::F32, logits.device())?,
            count: 0,
        });
    }
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut targets = Vec::with_capacity(batch * (len - 1));
    let mut weights = Vec::with_capacity(batch * (len - 1));
    let mut count = 0usize;
    for row in &labels {
        for &label in &row[1..] {
            if label == IGNORE_INDEX {
                targets.push(0u32);
                weights.push(0f32);
            } else {
                if label < 0 || label as usize >= vocab {
                    candle_core::bail!("label {label} is outside the vocabulary of {vocab} tokens");
                }
                targets.push(label as u32);
                weights.push(1f32);
                count += 1;
            }
        }
    }
    let device = logits.device();
    let rows = batch * (len - 1);
    let shifted = logits
        .narrow(1, 0, len - 1)?
        .to_dtype(DType::F32)?
        .reshape((rows, vocab))?;
    let targets = Tensor::from_vec(targets, (rows, 1), device)?;
    let weights = Tensor::from_vec(weights, rows, device)?;
    let picked = shifted.gather(&targets, 1)?.squeeze(1)?;
    let lse = log_sum_exp_last_dim(&shifted)?.squeeze(1)?;
    let sum = ((lse - picked)? * weights)?.sum_all()?;
    Ok(TokenLoss { sum, count })
}
