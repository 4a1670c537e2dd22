//! `x·Wᵀ`, the product of a linear layer, in two forms:
//! - for a trained weight, one op whose backward pass writes `∂W` straight in `W`'s own
//!   `[out, in]` layout (composed as `x.matmul(W.t())`, candle computes `∂(Wᵀ)` and transposes
//!   it into a strided tensor that must be copied before it can be used);
//! - for a frozen weight, one op that holds the weight outside the graph and whose backward
//!   computes only `∂x` (candle's matmul would also compute the weight's gradient: a wasted
//!   GEMM and a weight-sized buffer per layer and step).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{contiguous_f32, new_product, tensor, with_slices, Mat};
use crate::Precision;

pub(crate) fn check(x: &Tensor, weight: &Tensor) -> Result<()> {
    let (_, inp) = rows_and_features(x.shape())?;
    let (_, w_in) = weight.dims2()?;
    if w_in != inp {
        candle_core::bail!("linear: input has {inp} features, weight expects {w_in}");
    }
    Ok(())
}

/// The rows and features of an input `[..., features]`: the leading dimensions flattened.
pub(crate) fn rows_and_features(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims().split_last() {
        Some((&features, leading)) if !leading.is_empty() => {
            Ok((leading.iter().product(), features))
        }
        _ => candle_core::bail!("input {shape:?} needs at least two dimensions: rows and features"),
    }
}

/// `shape` with its last dimension replaced by `features`.
pub(crate) fn with_features(shape: &Shape, features: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = features;
    }
    Shape::from(dims)
}

/// `x·Wᵀ` for `x` `[..., in]` and a trained `weight` `[out, in]` (giving `[..., out]`), its
/// products (forward and backward) in `precision`.
pub fn linear(x: &Tensor, weight: &Tensor, precision: Precision) -> Result<Tensor> {
    check(x, weight)?;
    if !crate::fused_applies(&[x, weight]) {
        return reference(x, weight);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, TrainedLinear { precision })
}

/// `x·Wᵀ` for `x` `[..., in]` and a frozen `weight` `[out, in]`, its products in `precision`:
/// the backward pass yields only `∂x`.
pub fn frozen(x: &Tensor, weight: &Tensor, precision: Precision) -> Result<Tensor> {
    check(x, weight)?;
    if !crate::fused_applies(&[x, weight]) {
        return reference(x, &weight.detach());
    }
    x.contiguous()?.apply_op1(FrozenLinear {
        weight: weight.contiguous()?.detach(),
        precision,
    })
}

/// The same product composed of differentiable candle primitives.
pub fn reference(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&weight.t()?)
}

/// `x[rows, in] · Wᵀ`.
pub(crate) fn product(
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    precision: Precision,
) -> Vec<f32> {
    // SAFETY: contiguous row-major operands of the sizes given.
    unsafe {
        new_product(
            precision,
            rows,
            out,
            inp,
            Mat::rows(x.as_ptr(), inp),
            Mat::rows(w.as_ptr(), inp).t(),
        )
    }
}

/// `dy[rows, out] · W`, the gradient of the input.
pub(crate) fn input_gradient(
    dy: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    precision: Precision,
) -> Vec<f32> {
    // SAFETY: contiguous row-major operands of the sizes given.
    unsafe {
        new_product(
            precision,
            rows,
            inp,
            out,
            Mat::rows(dy.as_ptr(), out),
            Mat::rows(w.as_ptr(), inp),
        )
    }
}

/// `dyᵀ · x`, the gradient of the weight, `[out, in]`.
fn weight_gradient(
    dy: &[f32],
    x: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    precision: Precision,
) -> Vec<f32> {
    // SAFETY: contiguous row-major operands of the sizes given.
    unsafe {
        new_product(
            precision,
            out,
            inp,
            rows,
            Mat::rows(dy.as_ptr(), out).t(),
            Mat::rows(x.as_ptr(), inp),
        )
    }
}

struct TrainedLinear {
    precision: Precision,
}

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, inp) = rows_and_features(x_layout.shape())?;
        let (out, _) = w_layout.shape().dims2()?;
        let y = product(x, w, rows, inp, out, self.precision);
        Ok((CpuStorage::F32(y), with_features(x_layout.shape(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = rows_and_features(x.shape())?;
        let (out, _) = w.dims2()?;
        let (dx, dw) = with_slices(&[x, w, grad], self.name(), |s| {
            let (x, w, dy) = (s[0], s[1], s[2]);
            Ok((
                input_gradient(dy, w, rows, inp, out, self.precision),
                weight_gradient(dy, x, rows, inp, out, self.precision),
            ))
        })?;
        Ok((Some(tensor(dx, x.dims())?), Some(tensor(dw, &[out, inp])?)))
    }
}

struct FrozenLinear {
    weight: Tensor,
    precision: Precision,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let (rows, inp) = rows_and_features(x_layout.shape())?;
        let (out, _) = self.weight.dims2()?;
        let y = with_slices(&[&self.weight], self.name(), |s| {
            Ok(product(x, s[0], rows, inp, out, self.precision))
        })?;
        Ok((CpuStorage::F32(y), with_features(x_layout.shape(), out)))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, inp) = rows_and_features(x.shape())?;
        let (out, _) = self.weight.dims2()?;
        let dx = with_slices(&[grad, &self.weight], self.name(), |s| {
            Ok(input_gradient(s[0], s[1], rows, inp, out, self.precision))
        })?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}
