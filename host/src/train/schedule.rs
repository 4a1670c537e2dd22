//! Learning-rate schedules with the formulas of transformers' and Axolotl's schedulers: the
//! learning rate each optimizer step uses, from the step number alone (so a resumed run
//! continues the same curve).

use std::f64::consts::PI;

/// The schedules of `lr_scheduler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Warmup, then half a cosine down to `cosine_min_lr_ratio` (0 by default).
    Cosine,
    /// Warmup, then a straight line down to 0.
    Linear,
    /// The base learning rate throughout (no warmup).
    Constant,
    /// Warmup, then the base learning rate.
    ConstantWithWarmup,
    /// Warmup, then the reflected exponential decay of REX (arXiv 2107.04197).
    Rex,
}

impl ScheduleKind {
    /// The schedule named `name`, as `lr_scheduler` spells it.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "cosine" => Self::Cosine,
            "linear" => Self::Linear,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "rex" => Self::Rex,
            _ => return None,
        })
    }

    /// The names `lr_scheduler` accepts.
    pub const NAMES: &'static [&'static str] = &[
        "cosine",
        "linear",
        "constant",
        "constant_with_warmup",
        "rex",
    ];
}

/// A learning-rate schedule over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Which curve.
    pub kind: ScheduleKind,
    /// The peak learning rate (`learning_rate`).
    pub base_lr: f64,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Optimizer steps in the run.
    pub total_steps: usize,
    /// `cosine_min_lr_ratio`: the floor of the cosine (and of REX) as a fraction of the peak.
    pub min_lr_ratio: Option<f64>,
}

/// Warmup steps as Axolotl computes them: `warmup_steps`, else `warmup_ratio` of the run
/// (rounded down), else 3 % of the run up to 100; one step of warmup becomes two.
pub fn warmup_steps(steps: Option<usize>, ratio: Option<f64>, total_steps: usize) -> usize {
    let warmup = match (steps, ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => (r * total_steps as f64).floor().max(0.0) as usize,
        (None, None) => ((0.03 * total_steps as f64).floor() as usize).min(100),
    };
    if warmup == 1 {
        2
    } else {
        warmup
    }
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        let warming = |s: usize| s as f64 / w.max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup => {
                if step < w {
                    warming(step)
                } else {
                    1.0
                }
            }
            ScheduleKind::Linear => {
                if step < w {
                    warming(step)
                } else {
                    (t.saturating_sub(step) as f64 / t.saturating_sub(w).max(1) as f64).max(0.0)
                }
            }
            ScheduleKind::Cosine => {
                if step < w {
                    return warming(step);
                }
                let progress = (step - w) as f64 / t.saturating_sub(w).max(1) as f64;
                let scaling = 0.5 * (1.0 + (PI * progress).cos());
                match self.min_lr_ratio {
                    Some(r) => (1.0 - r) * scaling + r,
                    None => scaling.max(0.0),
                }
            }
            ScheduleKind::Rex => {
                // REX counts steps from 1: step k of the run is its step k + 1.
                let s = step + 1;
                if (1..=w).contains(&s) {
                    return s as f64 / w as f64;
                }
                let min = self.min_lr_ratio.unwrap_or(0.0);
                let after = s as i64 - w as i64;
                let remaining = t as i64 - w as i64;
                if after >= remaining || after == -1 || remaining <= 0 {
                    return min;
                }
                let z = (remaining - after.rem_euclid(remaining)) as f64 / remaining as f64;
                min + (1.0 - min) * (z / (0.1 + 0.9 * z))
            }
        }
    }
}
