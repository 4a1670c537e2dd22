//! The decoder's position and loss helpers: rotary frequency tables, Gemma 2's soft-capping
//! and the causal-LM loss. The fused ops themselves (attention, norms, activations, rotary
//! embeddings, cross-entropy) are in `axl-kernels`, each with its backward pass.

use candle_core::{DType, Device, Tensor};

use super::hf_config::{RopeConfig, RopeScaling};

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

    /// `(cos, sin)` of shape `[batch, len, head_dim]` for explicit positions per row.
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
            Tensor::from_vec(cos, (batch, len, dim), device)?,
            Tensor::from_vec(sin, (batch, len, dim), device)?,
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

/// The label value that marks a position as not trained.
pub const IGNORE_INDEX: i64 = axl_kernels::cross_entropy::IGNORE_INDEX;

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
/// `labels` is `[batch, len]` of integers. The last position of each row predicts nothing,
/// so the logits are used in place, without a shifted copy.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<TokenLoss> {
    let targets = shifted_targets(labels)?;
    let count = counted(&targets);
    let sum = axl_kernels::cross_entropy::cross_entropy_sum(logits, &targets, &Default::default())?;
    Ok(TokenLoss { sum, count })
}

/// The target of every position of `labels` (`[batch, len]`): the next position's label, and
/// [`IGNORE_INDEX`] for the last position of each row, which predicts nothing.
pub fn shifted_targets(labels: &Tensor) -> candle_core::Result<Vec<i64>> {
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut targets = Vec::with_capacity(labels.iter().map(Vec::len).sum());
    for row in &labels {
        targets.extend(row.iter().skip(1).copied());
        targets.push(IGNORE_INDEX);
    }
    Ok(targets)
}

/// How many of `targets` are counted (not [`IGNORE_INDEX`]).
pub fn counted(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
}
