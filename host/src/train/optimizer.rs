//! The optimizers of `optimizer:`: AdamW (every AdamW name), SGD, Lion and Adafactor, with
//! the update rules of torch, bitsandbytes and transformers, applied in one pass over each
//! parameter's values, gradient and state.
//!
//! Weight decay skips biases and normalization weights, as transformers' Trainer does.

use std::collections::BTreeMap;

use axl_kernels::vectorized;
use axl_plugin_api::payload::{OptimizerSpec, ParameterGroup};
use rayon::prelude::*;

/// Elements per parallel task of an update.
const CHUNK: usize = 1 << 16;

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// Decoupled weight decay Adam (Loshchilov and Hutter), as `torch.optim.AdamW`.
    AdamW,
    /// Plain stochastic gradient descent with coupled weight decay, as `torch.optim.SGD`.
    Sgd,
    /// Lion (Chen et al. 2023), as bitsandbytes' 32-bit Lion.
    Lion,
    /// Adafactor with a fixed learning rate, as transformers' `Adafactor(scale_parameter=False,
    /// relative_step=False)`.
    Adafactor,
}

/// `optimizer:` names axl accepts, and the update rule each means.
pub const OPTIMIZER_NAMES: &[(&str, OptimizerKind)] = &[
    ("adamw_torch", OptimizerKind::AdamW),
    ("adamw_torch_fused", OptimizerKind::AdamW),
    ("adamw_hf", OptimizerKind::AdamW),
    ("adamw", OptimizerKind::AdamW),
    ("adamw_apex_fused", OptimizerKind::AdamW),
    ("adamw_torch_xla", OptimizerKind::AdamW),
    ("adamw_torch_npu_fused", OptimizerKind::AdamW),
    ("sgd", OptimizerKind::Sgd),
    ("lion", OptimizerKind::Lion),
    ("lion_32bit", OptimizerKind::Lion),
    ("adafactor", OptimizerKind::Adafactor),
];

/// The hyperparameters of the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerSettings {
    /// The rule.
    pub kind: OptimizerKind,
    /// `adam_beta1` (0.9).
    pub beta1: f64,
    /// `adam_beta2` (0.999).
    pub beta2: f64,
    /// `adam_epsilon` (1e-8).
    pub epsilon: f64,
    /// `weight_decay` (0).
    pub weight_decay: f64,
    /// Parameter groups with their own learning-rate scale and weight decay (from a
    /// `create_optimizer` plugin); a parameter takes the first group that names it.
    pub groups: Vec<ParameterGroup>,
}

impl OptimizerSettings {
    /// The settings a `create_optimizer` plugin asks for, over the configured ones.
    pub fn with_spec(&self, spec: &OptimizerSpec) -> Result<Self, String> {
        let kind = OPTIMIZER_NAMES
            .iter()
            .find(|(name, _)| *name == spec.optimizer)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| {
                let names: Vec<&str> = OPTIMIZER_NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "asks for the optimizer `{}`; axl has {}",
                    spec.optimizer,
                    names.join(", ")
                )
            })?;
        Ok(Self {
            kind,
            beta1: spec.beta1.unwrap_or(self.beta1),
            beta2: spec.beta2.unwrap_or(self.beta2),
            epsilon: spec.epsilon.unwrap_or(self.epsilon),
            weight_decay: spec.weight_decay.unwrap_or(self.weight_decay),
            groups: spec.groups.clone(),
        })
    }
}

impl Default for OptimizerSettings {
    /// AdamW with Axolotl's defaults: betas 0.9 and 0.999, epsilon 1e-8, no weight decay.
    fn default() -> Self {
        Self {
            kind: OptimizerKind::AdamW,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
            groups: Vec::new(),
        }
    }
}

/// Whether weight decay applies to a parameter: not to biases or normalization weights.
pub fn decays(name: &str) -> bool {
    !name.split('.').any(|part| {
        part == "bias" || part == "norm" || part.ends_with("_norm") || part.ends_with("layernorm")
    })
}

/// Per-parameter state.
#[derive(Clone, Debug, Default, PartialEq)]
struct State {
    first: Vec<f32>,
    second: Vec<f32>,
    row: Vec<f32>,
    col: Vec<f32>,
}

/// An optimizer and its state, keyed by parameter name.
#[derive(Clone, Debug)]
pub struct Optimizer {
    settings: OptimizerSettings,
    step: u64,
    state: BTreeMap<String, State>,
}

impl Optimizer {
    /// A fresh optimizer.
    pub fn new(settings: OptimizerSettings) -> Self {
        Self {
            settings,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Starts an optimizer step: call once, then [`Self::update`] for every parameter.
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Updates one parameter in place. `shape` is its tensor shape (Adafactor factors the
    /// second moment of matrices over their last two dimensions).
    pub fn update(
        &mut self,
        name: &str,
        shape: &[usize],
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
    ) {
        let s = &self.settings;
        let group = s.groups.iter().find(|g| g.contains(name));
        let lr = lr * group.map_or(1.0, |g| g.lr_scale);
        let wd = match group.and_then(|g| g.weight_decay) {
            Some(wd) => wd,
            None if decays(name) => s.weight_decay,
            None => 0.0,
        };
        let state = self.state.entry(name.to_string()).or_default();
        let step = self.step.max(1);
        match s.kind {
            OptimizerKind::AdamW => {
                if state.first.is_empty() {
                    state.first = vec![0.0; param.len()];
                    state.second = vec![0.0; param.len()];
                }
                axl_kernels::adamw::update(
                    &axl_kernels::adamw::AdamWStep {
                        beta1: s.beta1,
                        beta2: s.beta2,
                        epsilon: s.epsilon,
                        lr,
                        weight_decay: wd,
                        step,
                    },
                    param,
                    grad,
                    &mut state.first,
                    &mut state.second,
                );
            }
            OptimizerKind::Sgd => {
                let (lr, wd) = (lr as f32, wd as f32);
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .for_each(|(param, grad)| {
                        vectorized!({
                            for (p, g) in param.iter_mut().zip(grad) {
                                *p -= lr * (g + wd * *p);
                            }
                        })
                    });
            }
            OptimizerKind::Lion => {
                if state.first.is_empty() {
                    state.first = vec![0.0; param.len()];
                }
                let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
                let decay = (1.0 - lr * wd) as f32;
                let lr = lr as f32;
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(state.first.par_chunks_mut(CHUNK))
                    .for_each(|((param, grad), first)| {
                        vectorized!({
                            for ((p, g), m) in param.iter_mut().zip(grad).zip(first) {
                                *p *= decay;
                                let c = b1 * *m + (1.0 - b1) * g;
                                if c != 0.0 {
                                    *p -= lr * c.signum();
                                }
                                *m = b2 * *m + (1.0 - b2) * g;
                            }
                        })
                    });
            }
            OptimizerKind::Adafactor => adafactor(state, shape, param, grad, lr, wd, step),
        }
    }

    /// The state as named tensors (`<parameter>.<moment>`) plus the step count, for a
    /// checkpoint.
    pub fn state_tensors(&self) -> (u64, Vec<(String, Vec<f32>)>) {
        let mut out = Vec::new();
        for (name, s) in &self.state {
            for (suffix, values) in [
                ("exp_avg", &s.first),
                ("exp_avg_sq", &s.second),
                ("exp_avg_sq_row", &s.row),
                ("exp_avg_sq_col", &s.col),
            ] {
                if !values.is_empty() {
                    out.push((format!("{name}.{suffix}"), values.clone()));
                }
            }
        }
        (self.step, out)
    }

    /// Restores what [`Self::state_tensors`] gave.
    pub fn restore(&mut self, step: u64, tensors: Vec<(String, Vec<f32>)>) -> Result<(), String> {
        self.step = step;
        self.state.clear();
        for (key, values) in tensors {
            let (name, suffix) = key
                .rsplit_once('.')
                .ok_or_else(|| format!("unexpected optimizer state tensor `{key}`"))?;
            let state = self.state.entry(name.to_string()).or_default();
            let slot = match suffix {
                "exp_avg" => &mut state.first,
                "exp_avg_sq" => &mut state.second,
                "exp_avg_sq_row" => &mut state.row,
                "exp_avg_sq_col" => &mut state.col,
                _ => return Err(format!("unexpected optimizer state tensor `{key}`")),
            };
            *slot = values;
        }
        Ok(())
    }
}

/// transformers' Adafactor step with `scale_parameter=False, relative_step=False,
/// warmup_init=False, beta1=None`, `eps=(1e-30, 1e-3)`, `clip_threshold=1.0`,
/// `decay_rate=-0.8`.
fn adafactor(
    state: &mut State,
    shape: &[usize],
    param: &mut [f32],
    grad: &[f32],
    lr: f64,
    wd: f64,
    step: u64,
) {
    const EPS1: f32 = 1e-30;
    let beta2t = (1.0 - (step as f64).powf(-0.8)) as f32;
    let factored = shape.len() >= 2;
    let mut update = vec![0f32; grad.len()];
    if factored {
        let cols = shape[shape.len() - 1];
        let rows_per = shape[shape.len() - 2];
        let matrices = grad.len() / (cols * rows_per);
        if state.row.is_empty() {
            state.row = vec![0.0; matrices * rows_per];
            state.col = vec![0.0; matrices * cols];
        }
        for m in 0..matrices {
            let g = &grad[m * rows_per * cols..(m + 1) * rows_per * cols];
            let row = &mut state.row[m * rows_per..(m + 1) * rows_per];
            let col = &mut state.col[m * cols..(m + 1) * cols];
            let mut col_mean = vec![0f32; cols];
            for r in 0..rows_per {
                let line = &g[r * cols..(r + 1) * cols];
                let mut sum = 0f32;
                for (c, x) in line.iter().enumerate() {
                    let u = x * x + EPS1;
                    sum += u;
                    col_mean[c] += u;
                }
                row[r] = beta2t * row[r] + (1.0 - beta2t) * (sum / cols as f32);
            }
            for (c, mean) in col_mean.iter().enumerate() {
                col[c] = beta2t * col[c] + (1.0 - beta2t) * (mean / rows_per as f32);
            }
            let row_mean = row.iter().sum::<f32>() / rows_per as f32;
            let out = &mut update[m * rows_per * cols..(m + 1) * rows_per * cols];
            for r in 0..rows_per {
                let r_factor = (row[r] / row_mean).sqrt().recip();
                for c in 0..cols {
                    out[r * cols + c] = r_factor * col[c].sqrt().recip() * g[r * cols + c];
                }
            }
        }
    } else {
        if state.second.is_empty() {
            state.second = vec![0.0; grad.len()];
        }
        for ((u, g), v) in update.iter_mut().zip(grad).zip(&mut state.second) {
            *v = beta2t * *v + (1.0 - beta2t) * (g * g + EPS1);
            *u = v.sqrt().recip() * g;
        }
    }
    let rms = (update.iter().map(|u| u * u).sum::<f32>() / update.len().max(1) as f32).sqrt();
    let scale = lr as f32 / rms.max(1.0);
    let decay = (wd * lr) as f32;
    for (p, u) in param.iter_mut().zip(&update) {
        *p -= decay * *p;
        *p -= scale * u;
    }
}
