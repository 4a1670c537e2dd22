//! What the three cross-entropy kernels share (over materialized logits in
//! [`cross_entropy`](crate::cross_entropy), fused with the language-model head in
//! [`fused_linear_cross_entropy`](crate::fused_linear_cross_entropy), and blockwise in
//! [`cut_cross_entropy`](crate::cut_cross_entropy)): the loss options, the loss and gradient of
//! one row of logits, the reference composition of candle primitives they are all checked
//! against, and the selection of the rows that count.
//!
//! The loss of a row with logits `z` (soft-capped first when asked: `c·tanh(z/c)`), target `y`
//! and log-sum-exp `L` is
//! `(1 − ε)·(L − z_y) + ε·(L − mean(z)) + s·L²` (label smoothing `ε`, z-loss scale `s`),
//! multiplied under token scaling by the detached probability of the target, `e^(z_y − L)`.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, D};

use crate::cpu::{contiguous_f32, lane_max, lane_sum, sum_exp_shifted};

/// The target id of a row that is not counted (transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// How each counted row's loss is formed. The default is the plain cross-entropy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossOptions {
    /// Label smoothing `ε` in `[0, 1)`: the target's weight is `1 − ε` and every id gets
    /// `ε / vocab` (as `torch.nn.functional.cross_entropy(label_smoothing=ε)`).
    pub label_smoothing: f32,
    /// The z-loss scale `s`: `s·logsumexp(z)²` is added to each row's loss (Liger's
    /// `lse_square_scale`).
    pub z_loss: f32,
    /// Soft-capping of the logits, `c·tanh(z/c)` (Gemma 2's `final_logit_softcapping`).
    pub softcap: Option<f32>,
    /// Scales each row's loss by the probability the model gives its target, detached from
    /// the graph (Liger's `use_token_scaling`, the "dynamic fine-tuning" loss).
    pub token_scaling: bool,
}

impl LossOptions {
    /// Checks the options' ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.label_smoothing) {
            candle_core::bail!(
                "label smoothing must lie in [0, 1), not {}",
                self.label_smoothing
            );
        }
        if !self.z_loss.is_finite() || self.z_loss < 0.0 {
            candle_core::bail!("the z-loss scale must be ≥ 0, not {}", self.z_loss);
        }
        if let Some(cap) = self.softcap {
            if !cap.is_finite() || cap <= 0.0 {
                candle_core::bail!("the logit soft cap must be > 0, not {cap}");
            }
        }
        Ok(())
    }

    /// Soft-caps a row of logits in place.
    #[inline(always)]
    pub(crate) fn cap_in_place(&self, row: &mut [f32]) {
        if let Some(cap) = self.softcap {
            let inv = 1.0 / cap;
            for v in row.iter_mut() {
                *v = cap * (*v * inv).tanh();
            }
        }
    }

    /// The loss of a counted row from its statistics, and the factor its gradient carries
    /// (the detached target probability under token scaling, else 1).
    pub(crate) fn row_loss(&self, stats: &RowStats, vocab: usize) -> (f32, f32) {
        let lse = stats.lse();
        let nll = lse - stats.target_logit;
        let eps = self.label_smoothing;
        let mut loss = if eps > 0.0 {
            (1.0 - eps) * nll + eps * (lse - stats.logit_sum / vocab as f32)
        } else {
            nll
        };
        loss += self.z_loss * lse * lse;
        let weight = if self.token_scaling {
            (stats.target_logit - lse).exp()
        } else {
            1.0
        };
        (loss * weight, weight)
    }

    /// Replaces the (capped) logits `row`, whose columns start at vocabulary id `offset`, by
    /// `scale` times the loss's gradient with respect to the uncapped logits, for a row with
    /// target `target`, log-sum-exp `lse` and gradient factor `weight` ([`Self::row_loss`]).
    /// Inlined, so that inside a [`vectorized!`](crate::vectorized) block it gets that block's
    /// vectors.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gradient_in_place(
        &self,
        row: &mut [f32],
        offset: usize,
        vocab: usize,
        target: usize,
        lse: f32,
        weight: f32,
        scale: f32,
    ) {
        let factor = weight * scale;
        let a = factor * (1.0 + 2.0 * self.z_loss * lse);
        let b = factor * self.label_smoothing / vocab as f32;
        let target_column = target.checked_sub(offset).filter(|&t| t < row.len());
        let target_logit = target_column.map(|t| row[t]);
        match self.softcap {
            None => {
                for v in row.iter_mut() {
                    *v = a * crate::cpu::exp(*v - lse) - b;
                }
            }
            Some(cap) => {
                let inv = 1.0 / cap;
                for v in row.iter_mut() {
                    let tanh = *v * inv;
                    *v = (a * crate::cpu::exp(*v - lse) - b) * (1.0 - tanh * tanh);
                }
            }
        }
        if let (Some(t), Some(z)) = (target_column, target_logit) {
            let cap_slope = self.softcap.map_or(1.0, |cap| 1.0 - (z / cap) * (z / cap));
            row[t] = (a * crate::cpu::exp(z - lse) - b - factor * (1.0 - self.label_smoothing))
                * cap_slope;
        }
    }
}

/// A row's running statistics over the vocabulary: the maximum and the sum of `e^(z − max)`
/// (merged block by block), the sum of the logits, and the target's logit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowStats {
    max: f32,
    sum_exp: f32,
    pub logit_sum: f32,
    pub target_logit: f32,
}

impl Default for RowStats {
    fn default() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum_exp: 0.0,
            logit_sum: 0.0,
            target_logit: 0.0,
        }
    }
}

impl RowStats {
    /// Adds a block of (capped) logits whose columns start at vocabulary id `offset`.
    /// Inlined like [`LossOptions::gradient_in_place`].
    #[inline(always)]
    pub fn add_block(&mut self, block: &[f32], offset: usize, target: usize, smoothing: bool) {
        let block_max = lane_max(block);
        let max = self.max.max(block_max);
        let rescaled = if self.max == f32::NEG_INFINITY {
            0.0
        } else {
            self.sum_exp * (self.max - max).exp()
        };
        self.sum_exp = rescaled + sum_exp_shifted(block, max);
        self.max = max;
        if smoothing {
            self.logit_sum += lane_sum(block);
        }
        if let Some(t) = target.checked_sub(offset).filter(|&t| t < block.len()) {
            self.target_logit = block[t];
        }
    }

    /// `log Σ e^z` over the blocks added.
    pub fn lse(&self) -> f32 {
        self.max + self.sum_exp.ln()
    }
}

/// The rows whose target counts, and their targets as vocabulary indices.
pub(crate) struct CountedRows {
    /// Index of each counted row among all rows.
    pub rows: Vec<usize>,
    /// Its target.
    pub targets: Vec<usize>,
}

impl CountedRows {
    /// Checks `targets` against `rows` and `vocab` and keeps the counted ones.
    pub fn new(targets: &[i64], rows: usize, vocab: usize) -> Result<Self> {
        if targets.len() != rows {
            candle_core::bail!("cross-entropy: {} targets for {rows} rows", targets.len());
        }
        let mut counted = Self {
            rows: Vec::new(),
            targets: Vec::new(),
        };
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE_INDEX {
                continue;
            }
            if t < 0 || t as usize >= vocab {
                candle_core::bail!("label {t} is outside the vocabulary of {vocab} tokens");
            }
            counted.rows.push(r);
            counted.targets.push(t as usize);
        }
        Ok(counted)
    }

    /// The counted rows of `x` (`[rows, width]`) packed together; `x` itself when every row
    /// counts.
    pub fn packed<'a>(&self, x: &'a [f32], width: usize) -> Cow<'a, [f32]> {
        if self.rows.len() * width == x.len() {
            return Cow::Borrowed(x);
        }
        let mut packed = Vec::with_capacity(self.rows.len() * width);
        for &r in &self.rows {
            packed.extend_from_slice(&x[r * width..(r + 1) * width]);
        }
        Cow::Owned(packed)
    }

    /// `packed` (`[counted, width]`) spread back to `[rows, width]`, zeros in the rows not
    /// counted; `packed` itself when every row counts.
    pub fn unpacked(&self, packed: Vec<f32>, rows: usize, width: usize) -> Vec<f32> {
        if self.rows.len() == rows {
            return packed;
        }
        let mut full = vec![0f32; rows * width];
        for (i, &r) in self.rows.iter().enumerate() {
            full[r * width..(r + 1) * width].copy_from_slice(&packed[i * width..(i + 1) * width]);
        }
        full
    }
}

/// A language-model head's inputs as the fused head losses read them: the weight
/// `[vocab, features]`, and the hidden states' counted rows packed together.
pub(crate) struct HeadInputs<'a> {
    /// Rows of hidden states, counted or not.
    pub rows: usize,
    /// Features per row.
    pub features: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The counted rows and their targets.
    pub counted: CountedRows,
    /// The counted rows of the hidden states, `[counted, features]`.
    pub x: Cow<'a, [f32]>,
    /// The head's weight.
    pub weight: &'a [f32],
}

impl<'a> HeadInputs<'a> {
    /// The inputs of op `op`: `hidden` `[..., features]`, `weight` `[vocab, features]`, and a
    /// target per row (checked against the vocabulary).
    pub fn of(
        (hidden, hidden_layout): (&'a CpuStorage, &Layout),
        (weight, weight_layout): (&'a CpuStorage, &Layout),
        targets: &[i64],
        op: &str,
    ) -> Result<Self> {
        let hidden = contiguous_f32(hidden, hidden_layout, op)?;
        let weight = contiguous_f32(weight, weight_layout, op)?;
        let (rows, features) = crate::linear::rows_and_features(hidden_layout.shape())?;
        let (vocab, _) = weight_layout.shape().dims2()?;
        let counted = CountedRows::new(targets, rows, vocab)?;
        let x = counted.packed(hidden, features);
        Ok(Self {
            rows,
            features,
            vocab,
            counted,
            x,
            weight,
        })
    }
}

/// The summed loss of `logits` (`[..., vocab]`) against `targets`, composed of differentiable
/// candle primitives, in f32.
pub fn reference_from_logits(
    logits: &Tensor,
    targets: &[i64],
    options: &LossOptions,
) -> Result<Tensor> {
    options.validate()?;
    let (rows, vocab) = crate::linear::rows_and_features(logits.shape())?;
    CountedRows::new(targets, rows, vocab)?;
    let device = logits.device();
    let mut logits = logits.reshape((rows, vocab))?.to_dtype(DType::F32)?;
    if let Some(cap) = options.softcap {
        logits = ((logits / cap as f64)?.tanh()? * cap as f64)?;
    }
    let picked_ids: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let counts: Vec<f32> = targets
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let picked = logits
        .gather(&Tensor::from_vec(picked_ids, (rows, 1), device)?, 1)?
        .squeeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)?
        .squeeze(1)?;
    let nll = (&lse - &picked)?;
    let eps = options.label_smoothing as f64;
    let mut loss = if eps > 0.0 {
        let smooth = (&lse - logits.mean(D::Minus1)?)?;
        ((nll * (1.0 - eps))? + (smooth * eps)?)?
    } else {
        nll
    };
    if options.z_loss > 0.0 {
        loss = (loss + (lse.sqr()? * options.z_loss as f64)?)?;
    }
    if options.token_scaling {
        loss = (loss * (picked - &lse)?.exp()?.detach())?;
    }
    (loss * Tensor::from_vec(counts, rows, device)?)?.sum_all()
}

/// The summed loss of `hidden · weightᵀ` (`hidden` `[..., features]`, `weight`
/// `[vocab, features]`) against `targets`, composed of differentiable candle primitives: the
/// whole `[rows, vocab]` logits exist, as in transformers.
pub fn reference(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[i64],
    options: &LossOptions,
) -> Result<Tensor> {
    let logits = crate::linear::reference(hidden, weight)?;
    reference_from_logits(&logits, targets, options)
}
