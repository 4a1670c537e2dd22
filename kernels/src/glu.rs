//! The gated activation of a decoder MLP, `act(gate) · up`: SwiGLU (`act` = SiLU) and GEGLU
//! with the tanh approximation of GELU, in one pass forward and one backward, without the
//! activated gate as a separate tensor.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, exp, tensor, with_slices};
use crate::vectorized;

/// Elements per parallel task.
const CHUNK: usize = 4096;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// The activation applied to the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// `x · sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`; GEGLU).
    GeluTanh,
}

/// `act(gate) · up`, elementwise; `gate` and `up` have the same shape.
pub fn gated(gate: &Tensor, up: &Tensor, activation: GateActivation) -> Result<Tensor> {
    if !crate::fused_applies(&[gate, up]) {
        return reference(gate, up, activation);
    }
    if gate.dims() != up.dims() {
        candle_core::bail!("glu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, FusedGlu { activation })
}

/// GELU with the tanh approximation, composed of differentiable candle primitives.
pub fn gelu_tanh_reference(x: &Tensor) -> Result<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * GELU_CUBIC as f64)?)? * SQRT_2_OVER_PI as f64)?;
    ((inner.tanh()? + 1.0)? * x)? * 0.5
}

/// The same product composed of differentiable candle primitives.
pub fn reference(gate: &Tensor, up: &Tensor, activation: GateActivation) -> Result<Tensor> {
    let activated = match activation {
        GateActivation::Silu => gate.silu()?,
        GateActivation::GeluTanh => gelu_tanh_reference(gate)?,
    };
    activated * up
}

struct FusedGlu {
    activation: GateActivation,
}

/// SiLU and its derivative at `g`.
#[inline(always)]
fn silu(g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-g));
    (g * s, s * (1.0 + g * (1.0 - s)))
}

impl FusedGlu {
    /// The activation and its derivative at `g`.
    #[inline(always)]
    fn act(&self, g: f32) -> (f32, f32) {
        match self.activation {
            GateActivation::Silu => silu(g),
            GateActivation::GeluTanh => {
                let t = (SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g)).tanh();
                let value = 0.5 * g * (1.0 + t);
                let slope = 0.5 * (1.0 + t)
                    + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g);
                (value, slope)
            }
        }
    }
}

impl CustomOp2 for FusedGlu {
    fn name(&self) -> &'static str {
        "fused-glu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = contiguous_f32(gate, gate_layout, self.name())?;
        let up = contiguous_f32(up, up_layout, self.name())?;
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(out, (gate, up))| {
                vectorized!({
                    match self.activation {
                        // One loop per activation, so that each vectorizes.
                        GateActivation::Silu => {
                            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                                *o = silu(g).0 * u;
                            }
                        }
                        GateActivation::GeluTanh => {
                            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                                *o = self.act(g).0 * u;
                            }
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = with_slices(&[gate, up, grad], self.name(), |s| {
            let (gate, up, grad) = (s[0], s[1], s[2]);
            let mut d_gate = vec![0f32; gate.len()];
            let mut d_up = vec![0f32; gate.len()];
            d_gate
                .par_chunks_mut(CHUNK)
                .zip(d_up.par_chunks_mut(CHUNK))
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(((d_gate, d_up), (gate, up)), grad)| {
                    vectorized!({
                        let n = gate.len();
                        let (d_gate, d_up, up, grad) =
                            (&mut d_gate[..n], &mut d_up[..n], &up[..n], &grad[..n]);
                        match self.activation {
                            GateActivation::Silu => {
                                for i in 0..n {
                                    let (value, slope) = silu(gate[i]);
                                    d_gate[i] = grad[i] * up[i] * slope;
                                    d_up[i] = grad[i] * value;
                                }
                            }
                            GateActivation::GeluTanh => {
                                for i in 0..n {
                                    let (value, slope) = self.act(gate[i]);
                                    d_gate[i] = grad[i] * up[i] * slope;
                                    d_up[i] = grad[i] * value;
                                }
                            }
                        }
                    })
                });
            Ok((d_gate, d_up))
        })?;
        Ok((
            Some(tensor(d_gate, gate.dims())?),
            Some(tensor(d_up, up.dims())?),
        ))
    }
}
