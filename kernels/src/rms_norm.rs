//! RMS normalization over the last dimension, `x / sqrt(mean(x²) + eps) · w`, or `· (1 + w)`
//! in Gemma's form, computed in f32 as transformers computes it, in one pass forward and one
//! backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, lane_sum_of_products, tensor, with_slices};
use crate::vectorized;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm of `x` (any shape, normalized over its last dimension) with `weight` of the last
/// dimension's size. `one_plus_weight` selects Gemma's `(1 + w)` scaling.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, one_plus_weight: bool) -> Result<Tensor> {
    if !crate::fused_applies(&[x, weight]) {
        return reference(x, weight, eps, one_plus_weight);
    }
    let width = x.dim(D::Minus1)?;
    if weight.dims() != [width] {
        candle_core::bail!(
            "rms_norm: weight of shape {:?} for rows of {width}",
            weight.dims()
        );
    }
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        FusedRmsNorm {
            eps: eps as f32,
            one_plus_weight,
        },
    )
}

/// The same normalization composed of differentiable candle primitives.
pub fn reference(x: &Tensor, weight: &Tensor, eps: f64, one_plus_weight: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_mul(&(mean_square + eps)?.sqrt()?.recip()?)?;
    let weight = weight.to_dtype(candle_core::DType::F32)?;
    let scale = if one_plus_weight {
        (weight + 1.0)?
    } else {
        weight
    };
    normed.broadcast_mul(&scale)?.to_dtype(dtype)
}

struct FusedRmsNorm {
    eps: f32,
    one_plus_weight: bool,
}

impl FusedRmsNorm {
    fn scale(&self, w: f32) -> f32 {
        if self.one_plus_weight {
            1.0 + w
        } else {
            w
        }
    }

    #[inline(always)]
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let mean_square = lane_sum_of_products(row, row) / row.len() as f32;
        1.0 / (mean_square + self.eps).sqrt()
    }
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let w = contiguous_f32(w, w_layout, self.name())?;
        let width = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(width * ROWS_PER_TASK)
            .zip(x.par_chunks(width * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                vectorized!({
                    for (out, x) in out.chunks_mut(width).zip(x.chunks(width)) {
                        let inv = self.inv_rms(x);
                        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                            *o = v * inv * self.scale(w);
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_slices(&[x, w, grad], self.name(), |s| {
            let (x, w, grad) = (s[0], s[1], s[2]);
            let width = w.len();
            let mut dx = vec![0f32; x.len()];
            // With n = x·r, r = 1/rms: dw = Σ dy·n, and
            // dx = r·(dy·s − n·mean(dy·s·n)) where s is the weight's scale.
            let dw = dx
                .par_chunks_mut(width * ROWS_PER_TASK)
                .zip(x.par_chunks(width * ROWS_PER_TASK))
                .zip(grad.par_chunks(width * ROWS_PER_TASK))
                .map(|((dx, x), dy)| {
                    vectorized!({
                        let mut dw = vec![0f32; width];
                        for ((dx, x), dy) in dx
                            .chunks_mut(width)
                            .zip(x.chunks(width))
                            .zip(dy.chunks(width))
                        {
                            let inv = self.inv_rms(x);
                            let mut dot = 0f32;
                            for (((&x, &dy), &w), dw) in x.iter().zip(dy).zip(w).zip(dw.iter_mut())
                            {
                                let n = x * inv;
                                *dw += dy * n;
                                dot += dy * self.scale(w) * n;
                            }
                            let mean = dot / width as f32;
                            for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                                *dx = inv * (dy * self.scale(w) - x * inv * mean);
                            }
                        }
                        dw
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                // Summed in a fixed order, so that the result does not depend on scheduling.
                .fold(vec![0f32; width], |mut a, b| {
                    for (a, b) in a.iter_mut().zip(&b) {
                        *a += b;
                    }
                    a
                });
            Ok((dx, dw))
        })?;
        Ok((Some(tensor(dx, x.dims())?), Some(tensor(dw, w.dims())?)))
    }
}
