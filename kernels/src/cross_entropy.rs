//! The summed cross-entropy of logits against target ids, `Σ (logsumexp(x) − x[target])` over
//! the rows whose target is not ignored. The forward pass keeps one log-sum-exp per row; the
//! backward pass writes `softmax(x) − onehot(target)` straight into the gradient, with no
//! vocabulary-sized intermediates besides it.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, exp, lane_max, sum_exp_shifted, tensor, with_slices};
use crate::vectorized;

/// The target id of a row that is not counted (transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 4;

/// `Σ −log softmax(logits[r])[targets[r]]` over the rows `r` whose target is not
/// [`IGNORE_INDEX`], as a scalar. `logits` is `[..., vocab]`, its leading dimensions the rows.
pub fn cross_entropy_sum(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let (rows, vocab) = crate::linear::rows_and_features(logits.shape())?;
    if targets.len() != rows {
        candle_core::bail!("cross_entropy: {} targets for {rows} rows", targets.len());
    }
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        candle_core::bail!("label {t} is outside the vocabulary of {vocab} tokens");
    }
    if !crate::fused_applies(&[logits]) {
        return reference(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op1_arc(Arc::new(Box::new(FusedCrossEntropy {
            targets: targets.to_vec(),
            log_sum_exp: Mutex::new(Vec::new()),
        })))
}

/// The same loss composed of differentiable candle primitives.
pub fn reference(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let (rows, vocab) = crate::linear::rows_and_features(logits.shape())?;
    let logits = &logits.reshape((rows, vocab))?;
    let device = logits.device();
    let picked_ids: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let weights: Vec<f32> = targets
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let logits = logits.to_dtype(DType::F32)?;
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
    ((lse - picked)? * Tensor::from_vec(weights, rows, device)?)?.sum_all()
}

struct FusedCrossEntropy {
    targets: Vec<i64>,
    /// Filled by the forward pass for the backward pass.
    log_sum_exp: Mutex<Vec<f32>>,
}

fn log_sum_exp(row: &[f32]) -> f32 {
    vectorized!({
        let max = lane_max(row);
        max + sum_exp_shifted(row, max).ln()
    })
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, logits: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(logits, layout, self.name())?;
        let (_, vocab) = crate::linear::rows_and_features(layout.shape())?;
        let lse: Vec<f32> = logits
            .par_chunks(vocab)
            .with_min_len(ROWS_PER_TASK)
            .map(log_sum_exp)
            .collect();
        // Summed in row order in f64, so that the result does not depend on scheduling.
        let loss: f64 = self
            .targets
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != IGNORE_INDEX)
            .map(|(r, &t)| (lse[r] - logits[r * vocab + t as usize]) as f64)
            .sum();
        *self.log_sum_exp.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let lse = self.log_sum_exp.lock().unwrap_or_else(|e| e.into_inner());
        let (_, vocab) = crate::linear::rows_and_features(logits.shape())?;
        let d_logits = with_slices(&[logits], self.name(), |s| {
            let len = s[0].len();
            let mut d: Vec<f32> = Vec::with_capacity(len);
            d.spare_capacity_mut()[..len]
                .par_chunks_mut(vocab)
                .with_min_len(ROWS_PER_TASK)
                .zip(s[0].par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (d, x))| {
                    let target = self.targets[r];
                    if target == IGNORE_INDEX {
                        d.fill(MaybeUninit::new(0.0));
                        return;
                    }
                    let shift = lse[r];
                    vectorized!({
                        for (d, &x) in d.iter_mut().zip(x) {
                            d.write(scale * exp(x - shift));
                        }
                    });
                    d[target as usize] =
                        MaybeUninit::new(scale * exp(x[target as usize] - shift) - scale);
                });
            // SAFETY: every row was written above, ignored rows with zeros.
            unsafe { d.set_len(len) };
            Ok(d)
        })?;
        Ok(Some(tensor(d_logits, logits.dims())?))
    }
}
