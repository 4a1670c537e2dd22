//! Fused training ops for axl's decoder on CPU, each with its own backward pass: causal
//! attention that never stores the `[len, len]` probabilities, RMSNorm, the gated MLP
//! activations (SwiGLU, GEGLU), rotary embeddings and the cross-entropy of a language-model
//! head.
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

pub mod attention;
pub mod cross_entropy;
pub mod glu;
pub mod inplace;
pub mod linear;
pub mod lora_linear;
pub mod rms_norm;
pub mod rope;

mod cpu;

/// Whether the fused CPU implementation applies to these tensors: all f32 on the CPU.
fn fused_applies(tensors: &[&candle_core::Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}
