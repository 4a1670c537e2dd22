//! The summed cross-entropy of materialized logits against target ids (Liger's fused
//! cross-entropy), formed as [`LossOptions`] say. The forward pass keeps one log-sum-exp and
//! one gradient factor per row; the backward pass writes the gradient straight into a buffer
//! of the logits' size, with no other vocabulary-sized intermediates. Soft-capping is applied
//! inside, so the capped logits are never stored.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, tensor, with_slices};
use crate::token_loss::{CountedRows, LossOptions, RowStats};
use crate::vectorized;

pub use crate::token_loss::IGNORE_INDEX;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 4;

/// The summed loss over the rows `r` whose target is not [`IGNORE_INDEX`], as a scalar;
/// `logits` is `[..., vocab]`, its leading dimensions the rows. With default options, this is
/// `Σ −log softmax(logits[r])[targets[r]]`.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &[i64],
    options: &LossOptions,
) -> Result<Tensor> {
    options.validate()?;
    let (rows, vocab) = crate::linear::rows_and_features(logits.shape())?;
    CountedRows::new(targets, rows, vocab)?;
    if !crate::fused_applies(&[logits]) {
        return reference(logits, targets, options);
    }
    logits
        .contiguous()?
        .apply_op1_arc(Arc::new(Box::new(FusedCrossEntropy {
            targets: targets.to_vec(),
            options: *options,
            saved: Mutex::new(Vec::new()),
        })))
}

/// The same loss composed of differentiable candle primitives.
pub fn reference(logits: &Tensor, targets: &[i64], options: &LossOptions) -> Result<Tensor> {
    crate::token_loss::reference_from_logits(logits, targets, options)
}

struct FusedCrossEntropy {
    targets: Vec<i64>,
    options: LossOptions,
    /// Filled by the forward pass for the backward pass: per row, the log-sum-exp of the
    /// capped logits and the gradient factor.
    saved: Mutex<Vec<(f32, f32)>>,
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, logits: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(logits, layout, self.name())?;
        let (_, vocab) = crate::linear::rows_and_features(layout.shape())?;
        let options = &self.options;
        let smoothing = options.label_smoothing > 0.0;
        let rows: Vec<(f32, f32, f32)> = logits
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .map(|(row, &target)| {
                if target == IGNORE_INDEX {
                    return (0.0, 0.0, 0.0);
                }
                vectorized!({
                    let mut stats = RowStats::default();
                    if options.softcap.is_some() {
                        let mut capped = row.to_vec();
                        options.cap_in_place(&mut capped);
                        stats.add_block(&capped, 0, target as usize, smoothing);
                    } else {
                        stats.add_block(row, 0, target as usize, smoothing);
                    }
                    let (loss, factor) = options.row_loss(&stats, vocab);
                    (loss, stats.lse(), factor)
                })
            })
            .collect();
        // Summed in row order in f64, so that the result does not depend on scheduling.
        let loss: f64 = rows.iter().map(|&(l, _, _)| l as f64).sum();
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) =
            rows.into_iter().map(|(_, lse, f)| (lse, f)).collect();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let (_, vocab) = crate::linear::rows_and_features(logits.shape())?;
        let options = &self.options;
        let d_logits = with_slices(&[logits], self.name(), |s| {
            let mut d = vec![0f32; s[0].len()];
            d.par_chunks_mut(vocab)
                .with_min_len(ROWS_PER_TASK)
                .zip(s[0].par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (d, x))| {
                    let target = self.targets[r];
                    if target == IGNORE_INDEX {
                        return;
                    }
                    let (lse, factor) = saved[r];
                    vectorized!({
                        d.copy_from_slice(x);
                        options.cap_in_place(d);
                        options.gradient_in_place(d, 0, vocab, target as usize, lse, factor, scale);
                    });
                });
            Ok(d)
        })?;
        Ok(Some(tensor(d_logits, logits.dims())?))
    }
}
