//! One optimizer step and one evaluation pass: forward and backward over the micro-batches of
//! the step, gradients summed, the loss normalized by the trained tokens of the whole step (so
//! the split between micro-batch size and accumulation does not change it), clipping, and the
//! optimizer update.

use candle_core::{Tensor, Var};

use axl_kernels::inplace;
use axl_kernels::vectorized;
use rayon::prelude::*;

use crate::data::packing::Batch;
use crate::model::ops::causal_lm_loss;
use crate::model::{CausalLm, Result};

use super::optimizer::Optimizer;
use super::plan::trained_positions;

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Mean loss per trained token over the step.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained tokens of the step.
    pub trained_tokens: usize,
    /// All tokens of the step (padding included).
    pub tokens: usize,
}

/// The final hidden states of one micro-batch, with their graph, and its labels.
fn batch_hidden(model: &CausalLm, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (ids, labels) = batch.tensors(model.device())?;
    let hidden = match &batch.layout {
        Some(layout) => model.hidden_states_packed(&ids, layout)?,
        None => model.hidden_states(&ids, None)?,
    };
    Ok((hidden, labels))
}

/// The logits of one micro-batch, with their graph, and its labels.
fn batch_logits(model: &CausalLm, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (hidden, labels) = batch_hidden(model, batch)?;
    Ok((model.logits(&hidden)?, labels))
}

/// Loss sum and trained-position count of one micro-batch through the model's loss kernel,
/// with the graph (none with `detached`, for evaluation).
fn batch_loss(model: &CausalLm, batch: &Batch, detached: bool) -> Result<(Tensor, usize)> {
    let (hidden, labels) = batch_hidden(model, batch)?;
    let hidden = if detached { hidden.detach() } else { hidden };
    let loss = model.token_loss(&hidden, &labels)?;
    Ok((loss.sum, loss.count))
}

/// A loss computed outside the graph: given a micro-batch's logits, the batch and the
/// step's trained-token count, the normalized loss and its gradient with respect to the
/// logits, or `None` to use the built-in loss.
pub type LossHook<'a> = dyn FnMut(&Tensor, &Batch, usize) -> Result<Option<(f64, Tensor)>> + 'a;

/// Gradients of a step, summed over its micro-batches, in the order of the parameters; `None`
/// where no gradient reached a parameter (zero).
pub struct Gradients {
    /// One contiguous f32 tensor per trainable parameter, or `None` for zero.
    pub values: Vec<Option<Tensor>>,
}

impl Gradients {
    /// The global L2 norm.
    pub fn norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for g in self.values.iter().flatten() {
            sum += inplace::read(g, |g| {
                // Chunks summed in order, so that the norm does not depend on scheduling.
                g.par_chunks(CHUNK)
                    .map(|chunk| vectorized!({ sum_of_squares(chunk) }))
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum::<f64>()
            })?;
        }
        Ok(sum.sqrt())
    }

    /// Scales every gradient so the global norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`: by `max_norm / (norm + 1e-6)` when below 1).
    pub fn clip(&mut self, norm: f64, max_norm: f64) -> Result<()> {
        if max_norm <= 0.0 {
            return Ok(());
        }
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let coef = coef as f32;
            for g in self.values.iter().flatten() {
                inplace::update(g, |g| {
                    g.par_chunks_mut(CHUNK).for_each(|chunk| {
                        vectorized!({ chunk.iter_mut().for_each(|x| *x *= coef) })
                    })
                })?;
            }
        }
        Ok(())
    }

    /// The gradients as flat vectors (zeros where none reached a parameter).
    pub fn to_vecs(&self, params: &[(String, Var)]) -> Result<Vec<Vec<f32>>> {
        self.values
            .iter()
            .zip(params)
            .map(|(g, (_, var))| match g {
                Some(g) => Ok(g.flatten_all()?.to_vec1::<f32>()?),
                None => Ok(vec![0f32; var.as_tensor().elem_count()]),
            })
            .collect()
    }
}

/// Elements per parallel task of the gradient norm and clipping.
const CHUNK: usize = 1 << 16;

/// `Σ x²` in f64, over eight interleaved partial sums so that it vectorizes.
#[inline(always)]
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += (x as f64) * (x as f64);
        }
    }
    lanes.iter().sum::<f64>()
        + chunks
            .remainder()
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
}

/// Forward and backward over `batches` (with activation checkpointing when `checkpointing`);
/// returns the summed gradients and the step's loss. The first micro-batch's gradients are
/// kept as they are; later ones are added into them in place.
pub fn accumulate(
    model: &CausalLm,
    params: &[(String, Var)],
    batches: &[Batch],
    checkpointing: bool,
    mut loss_hook: Option<&mut LossHook<'_>>,
) -> Result<(Gradients, StepOutcome)> {
    let trained_tokens: usize = batches.iter().map(trained_positions).sum();
    let tokens: usize = batches
        .iter()
        .map(|b| b.input_ids.iter().map(Vec::len).sum::<usize>())
        .sum();
    let mut values: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0f64;
    for batch in batches {
        let mut grads = if checkpointing {
            let (ids, labels) = batch.tensors(model.device())?;
            let (sum, count, grads) = model.checkpointed_loss_and_grads(
                &ids,
                batch.layout.as_ref(),
                &labels,
                1.0 / trained_tokens.max(1) as f64,
            )?;
            if count == 0 {
                continue;
            }
            loss_sum += sum;
            grads
        } else if let Some(hook) = loss_hook.as_deref_mut() {
            if trained_positions(batch) == 0 {
                continue;
            }
            let (logits, labels) = batch_logits(model, batch)?;
            match hook(&logits, batch, trained_tokens)? {
                Some((loss, grad)) => {
                    loss_sum += loss * trained_tokens as f64;
                    // d/d(logits) of Σ logits·grad is `grad`: the plugin's gradient enters
                    // the backward pass here.
                    (logits * grad.detach())?.sum_all()?.backward()?
                }
                None => {
                    let loss = causal_lm_loss(&logits, &labels)?;
                    loss_sum += loss.sum.to_scalar::<f32>()? as f64;
                    (loss.sum / trained_tokens as f64)?.backward()?
                }
            }
        } else {
            let (sum, count) = batch_loss(model, batch, false)?;
            if count == 0 {
                continue;
            }
            loss_sum += sum.to_scalar::<f32>()? as f64;
            (sum / trained_tokens as f64)?.backward()?
        };
        for ((_, var), acc) in params.iter().zip(&mut values) {
            let Some(g) = grads.remove(var.as_tensor()) else {
                continue;
            };
            match acc {
                Some(acc) => inplace::update_with(acc, &g.contiguous()?, |acc, g| {
                    vectorized!({ acc.iter_mut().zip(g).for_each(|(a, x)| *a += x) })
                })?,
                None => *acc = Some(g.contiguous()?),
            }
        }
    }
    let gradients = Gradients { values };
    let outcome = StepOutcome {
        loss: if trained_tokens == 0 {
            f64::NAN
        } else {
            loss_sum / trained_tokens as f64
        },
        grad_norm: gradients.norm()?,
        trained_tokens,
        tokens,
    };
    Ok((gradients, outcome))
}

/// Applies one optimizer update to every trainable parameter, in place.
pub fn apply(
    optimizer: &mut Optimizer,
    params: &[(String, Var)],
    gradients: &Gradients,
    lr: f64,
) -> Result<()> {
    optimizer.begin_step();
    for ((name, var), grad) in params.iter().zip(&gradients.values) {
        let param = var.as_tensor();
        let shape = param.dims().to_vec();
        let zeros;
        let grad = match grad {
            Some(g) => g,
            None => {
                zeros = Tensor::zeros(param.shape(), param.dtype(), param.device())?;
                &zeros
            }
        };
        inplace::update_with(param, grad, |p, g| optimizer.update(name, &shape, p, g, lr))?;
    }
    Ok(())
}

/// Evaluation loss over `batches`: the mean per trained token, and the token count. With
/// `hook`, a `compute_loss` plugin's loss (each micro-batch normalized by its own trained
/// tokens, then weighted back by them) instead of the built-in one.
pub fn evaluate(
    model: &CausalLm,
    batches: &[Batch],
    mut hook: Option<&mut LossHook<'_>>,
) -> Result<(f64, usize)> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for batch in batches {
        if let Some(hook) = hook.as_deref_mut() {
            let trained = trained_positions(batch);
            if trained == 0 {
                continue;
            }
            let (logits, _) = batch_logits(model, batch)?;
            if let Some((loss, _)) = hook(&logits.detach(), batch, trained)? {
                sum += loss * trained as f64;
                count += trained;
                continue;
            }
        }
        let (s, c) = batch_loss(model, batch, true)?;
        sum += s.detach().to_scalar::<f32>()? as f64;
        count += c;
    }
    Ok((
        if count == 0 {
            f64::NAN
        } else {
            sum / count as f64
        },
        count,
    ))
}
