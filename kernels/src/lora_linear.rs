//! A LoRA-adapted linear layer with a frozen base weight, `x·Wᵀ + s · (x⊙m)·Aᵀ·Bᵀ`, as one
//! op: the low-rank update is added into the base product's output, so neither the update
//! `[rows, out]` nor its scaled copy exists as a tensor, and the backward pass computes the
//! gradients of `x`, `A` and `B` only (never of `W`). `m` is LoRA's dropout mask, when training
//! with dropout.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu::{contiguous_f32, par_matmul, tensor, with_slices, Mat};
use crate::linear::{input_gradient, product, rows_and_features, with_features};
use crate::Precision;

/// `x·Wᵀ + scale · (x⊙mask)·Aᵀ·Bᵀ` for `x` `[..., in]`, a frozen `weight` `[out, in]`,
/// `a` `[r, in]` and `b` `[out, r]`; `mask` (shaped as `x`, LoRA dropout) applies to the
/// adapter's input only. The base products run in `precision`; the adapter's, whose inner
/// dimension is the rank, in f32.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    precision: Precision,
) -> Result<Tensor> {
    let (_, inp) = rows_and_features(x.shape())?;
    let (out, w_in) = weight.dims2()?;
    let (rank, a_in) = a.dims2()?;
    if w_in != inp || a_in != inp || b.dims() != [out, rank] {
        candle_core::bail!(
            "lora_linear: x {:?}, weight {:?}, A {:?} and B {:?} do not fit together",
            x.dims(),
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    if mask.is_some_and(|m| m.dims() != x.dims()) {
        candle_core::bail!("lora_linear: the dropout mask must be {:?}, as x", x.dims());
    }
    let mut all = vec![x, weight, a, b];
    all.extend(mask);
    if !crate::fused_applies(&all) {
        return reference(x, weight, a, b, scale, mask);
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        FusedLora {
            weight: weight.contiguous()?.detach(),
            mask: mask.map(|m| m.contiguous()).transpose()?,
            scale: scale as f32,
            precision,
            low: Mutex::new(Vec::new()),
        },
    )
}

/// The same layer composed of differentiable candle primitives.
pub fn reference(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let base = x.broadcast_matmul(&weight.detach().t()?)?;
    let input = match mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    base + (input.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale)?
}

struct FusedLora {
    weight: Tensor,
    mask: Option<Tensor>,
    scale: f32,
    precision: Precision,
    /// `(x⊙m)·Aᵀ`, kept by the forward pass for the gradient of `B`.
    low: Mutex<Vec<f32>>,
}

impl FusedLora {
    /// Calls `f` with the weight and the mask as f32 slices.
    fn with_held<R>(&self, f: impl FnOnce(&[f32], Option<&[f32]>) -> Result<R>) -> Result<R> {
        let mut held = vec![&self.weight];
        held.extend(&self.mask);
        with_slices(&held, "lora_linear", |s| f(s[0], s.get(1).copied()))
    }
}

/// `x ⊙ mask`, or `x` itself without a mask.
fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>, buffer: &'a mut Vec<f32>) -> &'a [f32] {
    match mask {
        None => x,
        Some(m) => {
            buffer.clear();
            buffer.extend(x.iter().zip(m).map(|(x, m)| x * m));
            buffer
        }
    }
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let x = contiguous_f32(x, x_layout, name)?;
        let a = contiguous_f32(a, a_layout, name)?;
        let b = contiguous_f32(b, b_layout, name)?;
        let (rows, inp) = rows_and_features(x_layout.shape())?;
        let (out, rank) = b_layout.shape().dims2()?;
        let y = self.with_held(|w, mask| {
            let mut y = product(x, w, rows, inp, out, self.precision);
            let mut low = vec![0f32; rows * rank];
            let mut buffer = Vec::new();
            let input = masked(x, mask, &mut buffer);
            // SAFETY: every operand is a contiguous row-major buffer of the sizes given.
            unsafe {
                par_matmul(
                    rows,
                    rank,
                    inp,
                    low.as_mut_ptr(),
                    rank,
                    false,
                    Mat::rows(input.as_ptr(), inp),
                    Mat::rows(a.as_ptr(), inp).t(),
                    1.0,
                );
                par_matmul(
                    rows,
                    out,
                    rank,
                    y.as_mut_ptr(),
                    out,
                    true,
                    Mat::rows(low.as_ptr(), rank),
                    Mat::rows(b.as_ptr(), rank).t(),
                    self.scale,
                );
            }
            *self.low.lock().unwrap_or_else(|e| e.into_inner()) = low;
            Ok(y)
        })?;
        Ok((CpuStorage::F32(y), with_features(x_layout.shape(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = rows_and_features(x.shape())?;
        let (out, rank) = b.dims2()?;
        let low = self.low.lock().unwrap_or_else(|e| e.into_inner());
        let (dx, da, db) = with_slices(&[x, a, b, grad], self.name(), |s| {
            let (x, a, b, dy) = (s[0], s[1], s[2], s[3]);
            self.with_held(|w, mask| {
                // dx = dy·W (+ the adapter's part below).
                let mut dx = input_gradient(dy, w, rows, inp, out, self.precision);
                let mut d_low = vec![0f32; rows * rank];
                let mut da = vec![0f32; rank * inp];
                let mut db = vec![0f32; out * rank];
                let mut d_input = vec![0f32; if mask.is_some() { rows * inp } else { 0 }];
                let mut buffer = Vec::new();
                let input = masked(x, mask, &mut buffer);
                // SAFETY: every operand is a contiguous row-major buffer of the sizes given,
                // and no destination overlaps an operand.
                unsafe {
                    // d_low = s · dy·B.
                    par_matmul(
                        rows,
                        rank,
                        out,
                        d_low.as_mut_ptr(),
                        rank,
                        false,
                        Mat::rows(dy.as_ptr(), out),
                        Mat::rows(b.as_ptr(), rank),
                        self.scale,
                    );
                    // dA = d_lowᵀ·(x⊙m); dB = s · dyᵀ·low.
                    par_matmul(
                        rank,
                        inp,
                        rows,
                        da.as_mut_ptr(),
                        inp,
                        false,
                        Mat::rows(d_low.as_ptr(), rank).t(),
                        Mat::rows(input.as_ptr(), inp),
                        1.0,
                    );
                    par_matmul(
                        out,
                        rank,
                        rows,
                        db.as_mut_ptr(),
                        rank,
                        false,
                        Mat::rows(dy.as_ptr(), out).t(),
                        Mat::rows(low.as_ptr(), rank),
                        self.scale,
                    );
                    // The adapter's input gradient d_low·A, through the mask.
                    match mask {
                        None => par_matmul(
                            rows,
                            inp,
                            rank,
                            dx.as_mut_ptr(),
                            inp,
                            true,
                            Mat::rows(d_low.as_ptr(), rank),
                            Mat::rows(a.as_ptr(), inp),
                            1.0,
                        ),
                        Some(_) => par_matmul(
                            rows,
                            inp,
                            rank,
                            d_input.as_mut_ptr(),
                            inp,
                            false,
                            Mat::rows(d_low.as_ptr(), rank),
                            Mat::rows(a.as_ptr(), inp),
                            1.0,
                        ),
                    }
                }
                if let Some(m) = mask {
                    for ((dx, d), m) in dx.iter_mut().zip(&d_input).zip(m) {
                        *dx += d * m;
                    }
                }
                Ok((dx, da, db))
            })
        })?;
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(da, &[rank, inp])?),
            Some(tensor(db, &[out, rank])?),
        ))
    }
}
