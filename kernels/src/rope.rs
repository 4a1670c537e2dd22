//! Rotary position embeddings in transformers' rotate-half convention,
//! `x · cos + rotate_half(x) · sin`, applied to `[batch, len, heads, head_dim]` in one pass;
//! the backward pass is the inverse rotation. Attention can also apply them to q and k itself
//! ([`crate::attention::causal_attention_with_rope`]), so that the rotated copies are never
//! kept for the backward pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, tensor, with_slices};
use crate::vectorized;

/// Rotates `x` `[batch, len, heads, head_dim]` by the angles whose cosines and sines are
/// `cos` and `sin`: `[len, head_dim]` for every row, or `[batch, len, head_dim]` per row
/// (packed rows, whose positions restart at each sequence).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let tables = Tables::of(x, cos, sin)?;
    if !crate::fused_applies(&[x, cos, sin]) {
        return reference(x, cos, sin);
    }
    x.contiguous()?.apply_op1(FusedRope { tables })
}

/// The same rotation composed of differentiable candle primitives.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.unsqueeze(D::Minus2)?, sin.unsqueeze(D::Minus2)?);
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// The cosine and sine tables of a rotation, checked against the tensors they rotate.
#[derive(Clone)]
pub(crate) struct Tables {
    cos: Tensor,
    sin: Tensor,
    /// Whether the tables have a batch dimension (one table per row).
    per_row: bool,
}

impl Tables {
    /// The tables for `x` `[batch, len, heads, head_dim]`, or an error naming the mismatch.
    pub(crate) fn of(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (batch, len, _, dim) = x.dims4()?;
        let per_row = match cos.dims() {
            [l, d] if (*l, *d) == (len, dim) => false,
            [b, l, d] if (*b, *l, *d) == (batch, len, dim) => true,
            other => candle_core::bail!(
                "rope: tables of shape {other:?} for input of shape {:?}",
                x.dims()
            ),
        };
        if sin.dims() != cos.dims() || dim % 2 != 0 {
            candle_core::bail!(
                "rope: sin {:?} and cos {:?} differ, or odd head_dim {dim}",
                sin.dims(),
                cos.dims()
            );
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            per_row,
        })
    }

    /// `x` `[batch, len, heads, head_dim]` (given by `shape`) rotated, or with `inverse`
    /// rotated back (the transpose of the rotation, which is also its backward pass).
    pub(crate) fn rotate(&self, x: &[f32], shape: &Shape, inverse: bool) -> Result<Vec<f32>> {
        with_slices(&[&self.cos, &self.sin], "rope", |tables| {
            let (batch, len, heads, dim) = shape.dims4()?;
            Ok(self.rotate_with(x, (batch, len, heads, dim), inverse, tables[0], tables[1]))
        })
    }

    fn rotate_with(
        &self,
        x: &[f32],
        (batch, len, heads, dim): (usize, usize, usize, usize),
        inverse: bool,
        cos: &[f32],
        sin: &[f32],
    ) -> Vec<f32> {
        let half = dim / 2;
        let row_len = heads * dim;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(row_len)
            .zip(x.par_chunks(row_len))
            .enumerate()
            .for_each(|(token, (out, x))| {
                vectorized!({
                    let (b, i) = (token / len, token % len);
                    let at = if self.per_row {
                        (b * len + i) * dim
                    } else {
                        i * dim
                    };
                    let (cos, sin) = (&cos[at..at + dim], &sin[at..at + dim]);
                    for (out, x) in out.chunks_mut(dim).zip(x.chunks(dim)) {
                        for c in 0..half {
                            let (x1, x2) = (x[c], x[c + half]);
                            if inverse {
                                // The transpose of y = x·cos + rotate_half(x)·sin.
                                out[c] = x1 * cos[c] + x2 * sin[c + half];
                                out[c + half] = x2 * cos[c + half] - x1 * sin[c];
                            } else {
                                out[c] = x1 * cos[c] - x2 * sin[c];
                                out[c + half] = x2 * cos[c + half] + x1 * sin[c + half];
                            }
                        }
                    }
                })
            });
        debug_assert_eq!(out.len(), batch * len * row_len);
        out
    }
}

struct FusedRope {
    tables: Tables,
}

impl CustomOp1 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, layout, self.name())?;
        let out = self.tables.rotate(x, layout.shape(), false)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_slices(&[grad], self.name(), |s| {
            self.tables.rotate(s[0], x.shape(), true)
        })?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}
