//! Fused training ops for axl's decoder on CPU, each with its own backward pass: causal
//! attention that never stores the `[len, len]` probabilities, RMSNorm, LayerNorm, the gated
//! MLP activations (SwiGLU, GEGLU), rotary embeddings, the cross-entropy of a language-model
//! head over whole logits, fused with the head in chunks (Liger's fused linear
//! cross-entropy) or blockwise without the logits (cut cross-entropy), linear layers (trained,
//! frozen, LoRA-adapted) whose products run in f32 or, on CPUs with AVX-512 BF16, in bf16
//! with f32 sums ([`Precision`]), and the fused AdamW update. With the `cuda` feature, the
//! [`cuda`] module runs the same ops on NVIDIA GPUs (kernels compiled at run time by NVRTC).
//!
//! A chain of candle primitives keeps every intermediate tensor for its backward pass and makes
//! one pass over memory per primitive; each op here makes one or two passes and keeps only its
//! inputs (and its output where the backward needs it). Each op also has a reference
//! composition of differentiable candle primitives (`reference` functions), which is what runs
//! where the fused op does not apply (not f32, not on the CPU) and what the tests compare
//! values and gradients against.
//!
//! candle's own fused `rms_norm`, `softmax_last_dim`, `rope*` and `sdpa` have no backward and
//! silently cut the graph; they are never used.

#![deny(missing_docs)]

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cut_cross_entropy;
pub mod fused_linear_cross_entropy;
pub mod glu;
pub mod inplace;
pub mod layer_norm;
pub mod linear;
pub mod lora_linear;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod simd;
pub mod token_loss;

mod cpu;
#[cfg(target_arch = "x86_64")]
mod packed_gemm;

/// The precision of the linear layers' matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs, f32 sums.
    #[default]
    F32,
    /// Inputs rounded to bf16, every product summed in f32, as `torch.autocast(bfloat16)`
    /// computes linear layers on a CPU; weights, activations and gradients stay f32. Needs
    /// AVX-512 BF16 ([`Precision::bf16_available`]); without it, and for products with a
    /// dimension under 32 (LoRA's rank, where bf16 is no faster), products are f32.
    Bf16,
}

impl Precision {
    /// Whether this CPU computes [`Precision::Bf16`] products in bf16.
    pub fn bf16_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            packed_gemm::bf16::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// Whether the fused CPU implementation applies to these tensors: all f32 on the CPU.
fn fused_applies(tensors: &[&candle_core::Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}
