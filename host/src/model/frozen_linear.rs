//! `x·Wᵀ` for a frozen weight `W`, as an autograd op whose backward computes only the
//! gradient of `x`.
//!
//! candle's matmul backward computes the gradients of both operands; for a frozen weight that
//! is a wasted GEMM and a weight-sized buffer per layer and step (a third of a LoRA step's
//! GEMMs, and for a tied LM head a `[vocab, hidden]` buffer). Here the weight lives inside the
//! op, outside the graph.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("frozen-linear: expected an f32 input");
        };
        let (rows, inp) = layout.shape().dims2()?;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-linear: input must be contiguous".into())
        })?;
        let x = &x[start..end];
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(w)) = &*w_storage else {
            candle_core::bail!("frozen-linear: weight must be an f32 CPU tensor");
        };
        let (out, w_in) = w_layout.shape().dims2()?;
        if w_in != inp {
            candle_core::bail!("frozen-linear: input has {inp} features, weight expects {w_in}");
        }
        let (w_start, w_end) = w_layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-linear: weight must be contiguous".into())
        })?;
        let w = &w[w_start..w_end];
        let mut dst = vec![0f32; rows * out];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // dst[rows, out] = x[rows, inp] · Wᵀ, with Wᵀ read through strides (element (k, j) of
        // Wᵀ is W[j, k]).
        // SAFETY: the pointers cover rows·out, rows·inp and out·inp elements, matching m, n, k
        // and the strides given; dst does not alias the inputs.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inp,
                dst.as_mut_ptr(),
                1,
                out as isize,
                false,
                x.as_ptr(),
                1,
                inp as isize,
                w.as_ptr(),
                inp as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok((CpuStorage::F32(dst), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x·Wᵀ` for `x` of shape `[rows, in]` and a frozen `W` of shape `[out, in]`; the backward
/// pass yields only `∂/∂x`. Falls back to a plain matmul where the op does not apply.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let applicable = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && weight.is_contiguous();
    if !applicable || !x.track_op() {
        return x.matmul(&weight.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}
