//! The language-model head and its cross-entropy fused, as Liger's fused linear cross-entropy
//! computes them: the logits `hidden · weightᵀ` are made a chunk of rows at a time, each
//! chunk is turned into its rows' losses and, in the same pass, into the gradient of the
//! logits, which two products carry to `∂hidden` (and `∂weight` when the weight trains). The
//! `[rows, vocab]` logits never exist whole: the largest buffer is one chunk of them. The
//! gradients are made in the forward pass and scaled by the incoming gradient in the backward
//! pass. Rows whose target is ignored are dropped before any product.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{par_matmul_in, tensor, Mat};
use crate::token_loss::{HeadInputs, LossOptions, RowStats};
use crate::{vectorized, Precision};

/// The bytes of logits one chunk may hold.
const CHUNK_BYTES: usize = 64 << 20;

/// How the fused op runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Precision of the three products.
    pub precision: Precision,
    /// Rows per chunk; by default as many as fit 64 MiB of logits (at least 16).
    pub chunk_rows: Option<usize>,
}

impl Settings {
    /// Rows per chunk for a vocabulary of `vocab`.
    pub fn rows_per_chunk(&self, vocab: usize) -> usize {
        self.chunk_rows
            .unwrap_or_else(|| (CHUNK_BYTES / (4 * vocab.max(1))).max(16))
            .max(1)
    }
}

/// The summed loss (a scalar) of the logits `hidden · weightᵀ` (`hidden` `[..., features]`,
/// `weight` `[vocab, features]`) against `targets` (one per row, [`IGNORE_INDEX`] for rows
/// not counted), formed as `options` say. Gradients are made for the inputs the graph tracks:
/// a detached `hidden` and a frozen `weight` cost no product.
///
/// [`IGNORE_INDEX`]: crate::token_loss::IGNORE_INDEX
pub fn fused_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[i64],
    options: &LossOptions,
    settings: Settings,
) -> Result<Tensor> {
    options.validate()?;
    crate::linear::check(hidden, weight)?;
    if !crate::fused_applies(&[hidden, weight]) {
        return crate::token_loss::reference(hidden, weight, targets, options);
    }
    let op = FusedLinearCrossEntropy {
        targets: targets.to_vec(),
        options: *options,
        settings,
        hidden_gradient: hidden.track_op(),
        weight_gradient: weight.track_op(),
        gradients: Mutex::new(None),
    };
    hidden
        .contiguous()?
        .apply_op2_arc(&weight.contiguous()?, Arc::new(Box::new(op)))
}

/// `∂loss/∂hidden` and `∂loss/∂weight`, each where asked for.
type Gradients = (Option<Vec<f32>>, Option<Vec<f32>>);

struct FusedLinearCrossEntropy {
    targets: Vec<i64>,
    options: LossOptions,
    settings: Settings,
    hidden_gradient: bool,
    weight_gradient: bool,
    /// `∂loss/∂hidden` and `∂loss/∂weight`, made by the forward pass where asked for.
    gradients: Mutex<Option<Gradients>>,
}

impl CustomOp2 for FusedLinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let HeadInputs {
            rows,
            features,
            vocab,
            counted,
            x,
            weight,
        } = HeadInputs::of(
            (hidden, hidden_layout),
            (weight, weight_layout),
            &self.targets,
            self.name(),
        )?;
        let x: &[f32] = &x;
        let n = counted.rows.len();
        let chunk = self.settings.rows_per_chunk(vocab).min(n.max(1));
        let precision = self.settings.precision;
        let gradient = self.hidden_gradient || self.weight_gradient;
        let mut logits = vec![0f32; chunk * vocab];
        let mut grad_x = self.hidden_gradient.then(|| vec![0f32; n * features]);
        let mut grad_w = self.weight_gradient.then(|| vec![0f32; vocab * features]);
        let mut losses = vec![0f32; n];
        let smoothing = self.options.label_smoothing > 0.0;
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            let x_chunk = &x[start * features..(start + m) * features];
            let block = &mut logits[..m * vocab];
            // SAFETY: row-major operands and destination of the sizes given.
            unsafe {
                par_matmul_in(
                    precision,
                    m,
                    vocab,
                    features,
                    block.as_mut_ptr(),
                    vocab,
                    false,
                    Mat::rows(x_chunk.as_ptr(), features),
                    Mat::rows(weight.as_ptr(), features).t(),
                    1.0,
                )
            };
            let options = &self.options;
            block
                .par_chunks_mut(vocab)
                .zip(losses[start..start + m].par_iter_mut())
                .zip(counted.targets[start..start + m].par_iter())
                .for_each(|((row, loss), &target)| {
                    vectorized!({
                        options.cap_in_place(row);
                        let mut stats = RowStats::default();
                        stats.add_block(row, 0, target, smoothing);
                        let (value, factor) = options.row_loss(&stats, vocab);
                        *loss = value;
                        if gradient {
                            options.gradient_in_place(
                                row,
                                0,
                                vocab,
                                target,
                                stats.lse(),
                                factor,
                                1.0,
                            );
                        }
                    })
                });
            let block = &logits[..m * vocab];
            if let Some(grad_x) = &mut grad_x {
                // SAFETY: as above; the destination rows belong to this chunk alone.
                unsafe {
                    par_matmul_in(
                        precision,
                        m,
                        features,
                        vocab,
                        grad_x[start * features..].as_mut_ptr(),
                        features,
                        false,
                        Mat::rows(block.as_ptr(), vocab),
                        Mat::rows(weight.as_ptr(), features),
                        1.0,
                    )
                };
            }
            if let Some(grad_w) = &mut grad_w {
                // SAFETY: as above.
                unsafe {
                    par_matmul_in(
                        precision,
                        vocab,
                        features,
                        m,
                        grad_w.as_mut_ptr(),
                        features,
                        true,
                        Mat::rows(block.as_ptr(), vocab).t(),
                        Mat::rows(x_chunk.as_ptr(), features),
                        1.0,
                    )
                };
            }
        }
        drop(logits);
        let grad_x = grad_x.map(|g| counted.unpacked(g, rows, features));
        *self.gradients.lock().unwrap_or_else(|e| e.into_inner()) = Some((grad_x, grad_w));
        // Summed in row order in f64, so that the result does not depend on scheduling.
        let loss: f64 = losses.iter().map(|&l| l as f64).sum();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let Some((grad_x, grad_w)) = self
            .gradients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            candle_core::bail!("{}: backward pass without a forward pass", self.name());
        };
        let scaled = |g: Option<Vec<f32>>, shape: &[usize]| -> Result<Option<Tensor>> {
            g.map(|mut g| {
                if scale != 1.0 {
                    g.par_chunks_mut(1 << 14)
                        .for_each(|c| vectorized!({ c.iter_mut().for_each(|v| *v *= scale) }));
                }
                tensor(g, shape)
            })
            .transpose()
        };
        Ok((
            scaled(grad_x, hidden.dims())?,
            scaled(grad_w, weight.dims())?,
        ))
    }
}
