//! The AdamW update (`torch.optim.AdamW`) fused: one pass over each parameter's values, its
//! gradient and both moments, in parallel chunks, instead of a dozen elementwise ops each
//! making its own pass and intermediate.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::vectorized;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// AdamW's hyperparameters for one update of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// `β₁`.
    pub beta1: f64,
    /// `β₂`.
    pub beta2: f64,
    /// `ε`, added to the bias-corrected root of the second moment.
    pub epsilon: f64,
    /// The learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The step, counted from 1 (for the bias corrections).
    pub step: u64,
}

/// Updates `param` in place from `grad`, and the moments `first` and `second`, all of the same
/// length: `p ← p·(1 − lr·wd)`, `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
/// `p ← p − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`.
pub fn update(
    h: &AdamWStep,
    param: &mut [f32],
    grad: &[f32],
    first: &mut [f32],
    second: &mut [f32],
) {
    assert!(
        grad.len() == param.len() && first.len() == param.len() && second.len() == param.len(),
        "adamw: parameter, gradient and moments differ in length"
    );
    let step = h.step.max(1) as i32;
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let bc1 = 1.0 - h.beta1.powi(step);
    let bc2_sqrt = (1.0 - h.beta2.powi(step)).sqrt() as f32;
    let step_size = (h.lr / bc1) as f32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let eps = h.epsilon as f32;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(first.par_chunks_mut(CHUNK))
        .zip(second.par_chunks_mut(CHUNK))
        .for_each(|(((param, grad), first), second)| {
            vectorized!({
                for (((p, g), m), v) in param.iter_mut().zip(grad).zip(first).zip(second) {
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            })
        });
}

/// The same update composed of candle ops: the new parameter and moments.
pub fn reference(
    h: &AdamWStep,
    param: &Tensor,
    grad: &Tensor,
    first: &Tensor,
    second: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let step = h.step.max(1) as i32;
    let param = (param * (1.0 - h.lr * h.weight_decay))?;
    let first = ((first * h.beta1)? + (grad * (1.0 - h.beta1))?)?;
    let second = ((second * h.beta2)? + (grad.sqr()? * (1.0 - h.beta2))?)?;
    let m_hat = (&first / (1.0 - h.beta1.powi(step)))?;
    let v_hat = (&second / (1.0 - h.beta2.powi(step)))?;
    let update = (m_hat / (v_hat.sqrt()? + h.epsilon)?)?;
    Ok(((param - (update * h.lr)?)?, first, second))
}
