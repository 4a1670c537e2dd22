//! `x·Wᵀ` for a trained weight, as one op whose backward pass writes `∂W` straight in `W`'s
//! own `[out, in]` layout. Composed as `x.matmul(W.t())`, candle computes `∂(Wᵀ)` and then
//! transposes it into a strided tensor that must be copied before it can be used.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{contiguous_f32, par_matmul, tensor, with_slices, Mat};

/// `x·Wᵀ` for `x` `[rows, in]` and `weight` `[out, in]`.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, inp) = x.dims2()?;
    let (_, w_in) = weight.dims2()?;
    if w_in != inp {
        candle_core::bail!("linear: input has {inp} features, weight expects {w_in}");
    }
    if !crate::fused_applies(&[x, weight]) {
        return reference(x, weight);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, FusedLinear)
}

/// The same product composed of differentiable candle primitives.
pub fn reference(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.matmul(&weight.t()?)
}

struct FusedLinear;

impl CustomOp2 for FusedLinear {
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
        let (rows, inp) = x_layout.shape().dims2()?;
        let (out, _) = w_layout.shape().dims2()?;
        let mut y = vec![0f32; rows * out];
        // SAFETY: contiguous row-major operands of the sizes given; y is fresh.
        unsafe {
            par_matmul(
                rows,
                out,
                inp,
                y.as_mut_ptr(),
                out,
                false,
                Mat::rows(x.as_ptr(), inp),
                Mat::rows(w.as_ptr(), inp).t(),
                1.0,
            );
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (out, _) = w.dims2()?;
        let (dx, dw) = with_slices(&[x, w, grad], self.name(), |s| {
            let (x, w, dy) = (s[0], s[1], s[2]);
            let mut dx = vec![0f32; rows * inp];
            let mut dw = vec![0f32; out * inp];
            // SAFETY: contiguous row-major operands of the sizes given; dx and dw are fresh.
            unsafe {
                par_matmul(
                    rows,
                    inp,
                    out,
                    dx.as_mut_ptr(),
                    inp,
                    false,
                    Mat::rows(dy.as_ptr(), out),
                    Mat::rows(w.as_ptr(), inp),
                    1.0,
                );
                par_matmul(
                    out,
                    inp,
                    rows,
                    dw.as_mut_ptr(),
                    inp,
                    false,
                    Mat::rows(dy.as_ptr(), out).t(),
                    Mat::rows(x.as_ptr(), inp),
                    1.0,
                );
            }
            Ok((dx, dw))
        })?;
        Ok((
            Some(tensor(dx, &[rows, inp])?),
            Some(tensor(dw, &[out, inp])?),
        ))
    }
}
