//! Layer normalization over the last dimension, `(x − mean(x)) / sqrt(var(x) + eps) · w + b`
//! (biased variance, as `torch.nn.LayerNorm`), in one pass forward and one backward; the
//! forward pass keeps each row's mean and inverse deviation for the backward pass.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, lane_sum, tensor, with_slices};
use crate::vectorized;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// LayerNorm of `x` (any shape, normalized over its last dimension) with `weight` and `bias`
/// of the last dimension's size.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if weight.dims() != [width] || bias.dims() != [width] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} for rows of {width}",
            weight.dims(),
            bias.dims()
        );
    }
    if !crate::fused_applies(&[x, weight, bias]) {
        return reference(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        FusedLayerNorm {
            eps: eps as f32,
            stats: Mutex::new(Vec::new()),
        },
    )
}

/// The same normalization composed of differentiable candle primitives.
pub fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?;
    normed
        .broadcast_mul(&weight.to_dtype(candle_core::DType::F32)?)?
        .broadcast_add(&bias.to_dtype(candle_core::DType::F32)?)?
        .to_dtype(dtype)
}

struct FusedLayerNorm {
    eps: f32,
    /// Per row, from the forward pass: the mean and `1 / sqrt(var + eps)`.
    stats: Mutex<Vec<(f32, f32)>>,
}

impl FusedLayerNorm {
    #[inline(always)]
    fn row_stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = lane_sum(row) / n;
        // E[(x − mean)²] from E[x²] − mean² loses precision for large means; the centered
        // sum of squares is one more pass over a row in cache.
        let mut centered_square = 0f32;
        for &v in row {
            centered_square += (v - mean) * (v - mean);
        }
        (mean, 1.0 / (centered_square / n + self.eps).sqrt())
    }
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let w = contiguous_f32(w, w_layout, self.name())?;
        let b = contiguous_f32(b, b_layout, self.name())?;
        let width = w.len();
        let mut out = vec![0f32; x.len()];
        let mut stats = vec![(0f32, 0f32); x.len() / width.max(1)];
        out.par_chunks_mut(width * ROWS_PER_TASK)
            .zip(x.par_chunks(width * ROWS_PER_TASK))
            .zip(stats.par_chunks_mut(ROWS_PER_TASK))
            .for_each(|((out, x), stats)| {
                vectorized!({
                    for ((out, x), stats) in out.chunks_mut(width).zip(x.chunks(width)).zip(stats) {
                        let (mean, inv) = self.row_stats(x);
                        *stats = (mean, inv);
                        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                            *o = (v - mean) * inv * w + b;
                        }
                    }
                })
            });
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = std::mem::take(&mut *self.stats.lock().unwrap_or_else(|e| e.into_inner()));
        let (dx, dw, db) = with_slices(&[x, w, grad], self.name(), |s| {
            let (x, w, grad) = (s[0], s[1], s[2]);
            let width = w.len();
            if stats.len() * width != x.len() {
                candle_core::bail!("{}: backward pass without its forward pass", self.name());
            }
            let mut dx = vec![0f32; x.len()];
            // With n = (x − mean)·r and g = dy·w: dw = Σ dy·n, db = Σ dy, and
            // dx = r·(g − mean(g) − n·mean(g·n)).
            let partials = dx
                .par_chunks_mut(width * ROWS_PER_TASK)
                .zip(x.par_chunks(width * ROWS_PER_TASK))
                .zip(grad.par_chunks(width * ROWS_PER_TASK))
                .zip(stats.par_chunks(ROWS_PER_TASK))
                .map(|(((dx, x), dy), stats)| {
                    vectorized!({
                        let mut dw = vec![0f32; width];
                        let mut db = vec![0f32; width];
                        for (((dx, x), dy), &(mean, inv)) in dx
                            .chunks_mut(width)
                            .zip(x.chunks(width))
                            .zip(dy.chunks(width))
                            .zip(stats)
                        {
                            let mut g_sum = 0f32;
                            let mut gn_sum = 0f32;
                            for ((((&x, &dy), &w), dw), db) in x
                                .iter()
                                .zip(dy)
                                .zip(w)
                                .zip(dw.iter_mut())
                                .zip(db.iter_mut())
                            {
                                let n = (x - mean) * inv;
                                *dw += dy * n;
                                *db += dy;
                                g_sum += dy * w;
                                gn_sum += dy * w * n;
                            }
                            let (g_mean, gn_mean) = (g_sum / width as f32, gn_sum / width as f32);
                            for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                                let n = (x - mean) * inv;
                                *dx = inv * (dy * w - g_mean - n * gn_mean);
                            }
                        }
                        (dw, db)
                    })
                })
                .collect::<Vec<_>>();
            // Summed in a fixed order, so that the result does not depend on scheduling.
            let mut dw = vec![0f32; width];
            let mut db = vec![0f32; width];
            for (pw, pb) in &partials {
                for (a, b) in dw.iter_mut().zip(pw) {
                    *a += b;
                }
                for (a, b) in db.iter_mut().zip(pb) {
                    *a += b;
                }
            }
            Ok((dx, dw, db))
        })?;
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(dw, w.dims())?),
            Some(tensor(db, b.dims())?),
        ))
    }
}
