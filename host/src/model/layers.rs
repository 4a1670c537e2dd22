//! The parameterized layers of a decoder — linear (with an optional LoRA adapter), embedding,
//! RMS norm — and the [`Param`] that says whether a weight is trained.

use std::sync::Mutex;

use axl_kernels::Precision;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A weight: frozen (a plain tensor, outside the autograd graph) or trainable (a variable
/// whose gradient `backward` computes).
#[derive(Clone, Debug)]
pub enum Param {
    /// Not trained.
    Frozen(Tensor),
    /// Trained.
    Trainable(Var),
}

impl Param {
    /// The value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Self::Frozen(t) => t,
            Self::Trainable(v) => v.as_tensor(),
        }
    }

    /// The variable, if trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Self::Frozen(_) => None,
            Self::Trainable(v) => Some(v),
        }
    }

    /// A trainable copy of this weight (the same variable if already trainable).
    pub fn to_trainable(&self) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Frozen(t) => Self::Trainable(Var::from_tensor(&t.copy()?)?),
            Self::Trainable(v) => Self::Trainable(v.clone()),
        })
    }

    /// A frozen view of this weight's current value.
    pub fn to_frozen(&self) -> Self {
        match self {
            Self::Frozen(t) => Self::Frozen(t.clone()),
            Self::Trainable(v) => Self::Frozen(v.as_tensor().detach()),
        }
    }
}

/// Visits parameters by their Hugging Face name.
pub type ParamVisitor<'a> = dyn FnMut(&str, &Param) + 'a;

/// The random stream of dropout masks, seeded so that runs are reproducible.
#[derive(Debug)]
pub struct DropoutRng(Mutex<ChaCha8Rng>);

impl DropoutRng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Self {
        Self(Mutex::new(ChaCha8Rng::seed_from_u64(seed)))
    }

    /// The stream's current state.
    pub fn state(&self) -> ChaCha8Rng {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rewinds (or advances) the stream to a saved state.
    pub fn set_state(&self, state: ChaCha8Rng) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Noise uniform in `[-bound, bound)`.
    pub fn uniform(
        &self,
        shape: &[usize],
        bound: f64,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let bound = bound as f32;
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
            .collect();
        Tensor::from_vec(values, shape, device)
    }

    fn mask(
        &self,
        shape: &[usize],
        p: f32,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let keep = 1.0 / (1.0 - p);
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let values: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

/// A low-rank adapter `scale · B·A` beside a frozen linear layer (PEFT's LoRA).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `lora_A.weight`, shape `[r, in]`.
    pub a: Param,
    /// `lora_B.weight`, shape `[out, r]`.
    pub b: Param,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f32,
}

/// A linear layer `y = x·Wᵀ + b`, optionally with a LoRA adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `[out, in]`.
    pub weight: Param,
    /// `[out]`.
    pub bias: Option<Param>,
    /// The adapter, if this module is adapted.
    pub lora: Option<LoraAdapter>,
    /// Whether this module is a full trainable copy saved with the adapter (`modules_to_save`).
    pub saved_with_adapter: bool,
}

impl Linear {
    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.tensor().dims()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.tensor().dims()[0]
    }

    /// Applies the layer to `x` of shape `[..., in]`, its products in `precision`. Dropout is
    /// drawn from `dropout` when given (training); without it the adapter runs
    /// deterministically.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout: Option<&DropoutRng>,
        precision: Precision,
    ) -> candle_core::Result<Tensor> {
        if let (Param::Frozen(w), Some(lora)) = (&self.weight, &self.lora) {
            // A frozen base with an adapter: one fused op, no weight gradient.
            let mask = match dropout {
                Some(rng) if lora.dropout > 0.0 => {
                    Some(rng.mask(x.dims(), lora.dropout, x.device())?)
                }
                _ => None,
            };
            let y = axl_kernels::lora_linear::lora_linear(
                x,
                w,
                lora.a.tensor(),
                lora.b.tensor(),
                lora.scale,
                mask.as_ref(),
                precision,
            )?;
            return match &self.bias {
                Some(bias) => y.broadcast_add(bias.tensor()),
                None => Ok(y),
            };
        }
        let mut y = match &self.weight {
            Param::Frozen(w) => axl_kernels::linear::frozen(x, w, precision)?,
            Param::Trainable(w) => axl_kernels::linear::linear(x, w.as_tensor(), precision)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias.tensor())?;
        }
        if let Some(lora) = &self.lora {
            let input = match dropout {
                Some(rng) if lora.dropout > 0.0 => {
                    (x * rng.mask(x.dims(), lora.dropout, x.device())?)?
                }
                _ => x.clone(),
            };
            let low = input.broadcast_matmul(&lora.a.tensor().t()?)?;
            let delta = (low.broadcast_matmul(&lora.b.tensor().t()?)? * lora.scale)?;
            y = (y + delta)?;
        }
        Ok(y)
    }

    /// The weight with the adapter folded in: `W + scale · B·A`.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let w = self.weight.tensor().detach();
        match &self.lora {
            None => Ok(w),
            Some(l) => w + (l.b.tensor().detach().matmul(&l.a.tensor().detach())? * l.scale)?,
        }
    }

    /// Visits this layer's parameters with their Hugging Face / PEFT names.
    pub fn visit(&self, f: &mut ParamVisitor) {
        f(&format!("{}.weight", self.path), &self.weight);
        if let Some(b) = &self.bias {
            f(&format!("{}.bias", self.path), b);
        }
        if let Some(l) = &self.lora {
            f(&format!("{}.lora_A.weight", self.path), &l.a);
            f(&format!("{}.lora_B.weight", self.path), &l.b);
        }
    }
}

/// A token embedding table.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The module path, e.g. `model.embed_tokens`.
    pub path: String,
    /// `[vocab, hidden]`.
    pub weight: Param,
    /// Whether this module is a full trainable copy saved with the adapter (`modules_to_save`).
    pub saved_with_adapter: bool,
}

impl Embedding {
    /// Looks up `ids` of shape `[batch, len]`, giving `[batch, len, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let hidden = self.weight.tensor().dim(1)?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        self.weight
            .tensor()
            .index_select(&flat, 0)?
            .reshape((batch, len, hidden))
    }

    /// Visits the weight.
    pub fn visit(&self, f: &mut ParamVisitor) {
        f(&format!("{}.weight", self.path), &self.weight);
    }
}

/// RMS normalization with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// The module path, e.g. `model.norm`.
    pub path: String,
    /// `[dim]`.
    pub weight: Param,
    /// Added to the mean square.
    pub eps: f64,
    /// Gemma's `(1 + w)` scaling.
    pub one_plus_weight: bool,
}

impl RmsNorm {
    /// Normalizes over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        axl_kernels::rms_norm::rms_norm(x, self.weight.tensor(), self.eps, self.one_plus_weight)
    }

    /// Visits the weight.
    pub fn visit(&self, f: &mut ParamVisitor) {
        f(&format!("{}.weight", self.path), &self.weight);
    }
}
