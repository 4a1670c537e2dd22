//! The training keys of a configuration: the loop, the optimizer, the schedule, evaluation
//! and checkpoints, with Axolotl's names and defaults.

use serde::Deserialize;

/// A number that YAML may also give as a string (`learning_rate: "2e-4"` is common, and
/// YAML 1.1 reads `2e-4` without a dot as a string).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Number {
    /// A YAML number.
    Number(f64),
    /// A string holding one.
    Text(String),
}

impl Number {
    /// The value, if the string form parses.
    pub fn value(&self) -> Option<f64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(t) => t.trim().parse().ok(),
        }
    }
}

/// A boolean that may also be `auto`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BoolOrAuto {
    /// `true` / `false`.
    Bool(bool),
    /// `auto` (any other string is rejected in validation).
    Text(String),
}

/// `dynamic_checkpoint`: save a checkpoint when a trigger file appears in `output_dir`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicCheckpoint {
    /// Turns the trigger on.
    pub enabled: bool,
    /// Steps between looks for the file.
    pub check_interval: usize,
    /// The trigger file's name (in `output_dir`).
    pub trigger_file_path: Option<String>,
}

impl Default for DynamicCheckpoint {
    fn default() -> Self {
        Self {
            enabled: false,
            check_interval: 10,
            trigger_file_path: None,
        }
    }
}

/// The trigger file's name when `trigger_file_path` is not set.
pub const DEFAULT_TRIGGER_FILE: &str = "axolotl_checkpoint.save";

/// The training keys.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainingConfig {
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the training data.
    pub num_epochs: f64,
    /// Peak learning rate (required to train).
    pub learning_rate: Option<Number>,
    /// The optimizer's name.
    pub optimizer: String,
    /// Adam's and Lion's first beta.
    pub adam_beta1: Option<f64>,
    /// Adam's and Lion's second beta.
    pub adam_beta2: Option<f64>,
    /// Adam's epsilon.
    pub adam_epsilon: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: Option<f64>,
    /// Gradient clipping norm (1.0, as transformers' default).
    pub max_grad_norm: Option<f64>,
    /// The learning-rate schedule.
    pub lr_scheduler: String,
    /// Floor of the cosine schedule, as a fraction of the peak.
    pub cosine_min_lr_ratio: Option<f64>,
    /// Warmup steps.
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the run.
    pub warmup_ratio: Option<f64>,
    /// Log every this many steps.
    pub logging_steps: Option<usize>,
    /// Held-out share (below 1) or count of the training data for evaluation.
    pub val_set_size: f64,
    /// Evaluate every this many steps (or this fraction of the run).
    pub eval_steps: Option<f64>,
    /// Evaluations per epoch.
    pub evals_per_epoch: Option<usize>,
    /// `no`, `steps` or `epoch`.
    pub eval_strategy: Option<String>,
    /// Save a checkpoint every this many steps (or this fraction of the run).
    pub save_steps: Option<f64>,
    /// Checkpoints per epoch.
    pub saves_per_epoch: Option<usize>,
    /// `no`, `steps` or `epoch`.
    pub save_strategy: Option<String>,
    /// Checkpoints kept (the oldest are deleted).
    pub save_total_limit: Option<usize>,
    /// A checkpoint directory to resume from.
    pub resume_from_checkpoint: Option<String>,
    /// Resume from the newest checkpoint in `output_dir`.
    pub auto_resume_from_checkpoints: Option<bool>,
    /// bf16 compute (`auto` means what the hardware does best; on CPU, f32).
    pub bf16: Option<BoolOrAuto>,
    /// fp16 compute.
    pub fp16: Option<bool>,
    /// TF32 matmuls (a CUDA setting).
    pub tf32: Option<BoolOrAuto>,
    /// Checkpoints on demand.
    pub dynamic_checkpoint: Option<DynamicCheckpoint>,
    /// Recompute each decoder layer's activations in the backward pass (`true`; the
    /// `offload` variants are not implemented).
    pub gradient_checkpointing: Option<BoolOrAuto>,
    /// NEFTune noise on the embeddings (Axolotl's name).
    pub noisy_embedding_alpha: Option<f64>,
    /// NEFTune noise on the embeddings (transformers' name).
    pub neftune_noise_alpha: Option<f64>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            gradient_accumulation_steps: 1,
            num_epochs: 1.0,
            learning_rate: None,
            optimizer: "adamw_torch_fused".into(),
            adam_beta1: None,
            adam_beta2: None,
            adam_epsilon: None,
            weight_decay: None,
            max_grad_norm: None,
            lr_scheduler: "cosine".into(),
            cosine_min_lr_ratio: None,
            warmup_steps: None,
            warmup_ratio: None,
            logging_steps: None,
            val_set_size: 0.0,
            eval_steps: None,
            evals_per_epoch: None,
            eval_strategy: None,
            save_steps: None,
            saves_per_epoch: None,
            save_strategy: None,
            save_total_limit: None,
            resume_from_checkpoint: None,
            auto_resume_from_checkpoints: None,
            bf16: None,
            fp16: None,
            tf32: None,
            dynamic_checkpoint: None,
            gradient_checkpointing: None,
            noisy_embedding_alpha: None,
            neftune_noise_alpha: None,
        }
    }
}

/// The keys [`TrainingConfig`] reads.
pub const TRAINING_KEYS: &[&str] = &[
    "gradient_accumulation_steps",
    "num_epochs",
    "learning_rate",
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler",
    "cosine_min_lr_ratio",
    "warmup_steps",
    "warmup_ratio",
    "logging_steps",
    "val_set_size",
    "eval_steps",
    "evals_per_epoch",
    "eval_strategy",
    "save_steps",
    "saves_per_epoch",
    "save_strategy",
    "save_total_limit",
    "resume_from_checkpoint",
    "auto_resume_from_checkpoints",
    "bf16",
    "fp16",
    "tf32",
    "dynamic_checkpoint",
    "gradient_checkpointing",
    "noisy_embedding_alpha",
    "neftune_noise_alpha",
];

/// Problems with the training keys, as `(key, message)`.
pub fn validate(t: &TrainingConfig) -> Vec<(&'static str, String)> {
    use crate::train::optimizer::OPTIMIZER_NAMES;
    use crate::train::schedule::ScheduleKind;
    let mut problems = Vec::new();
    if t.gradient_accumulation_steps == 0 {
        problems.push(("gradient_accumulation_steps", "must be at least 1".into()));
    }
    if t.num_epochs.is_nan() || t.num_epochs <= 0.0 {
        problems.push((
            "num_epochs",
            format!("{} is not a positive number", t.num_epochs),
        ));
    }
    if let Some(lr) = &t.learning_rate {
        match lr.value() {
            Some(v) if v >= 0.0 && v.is_finite() => {}
            _ => problems.push((
                "learning_rate",
                format!("{lr:?} is not a non-negative number"),
            )),
        }
    }
    if !OPTIMIZER_NAMES.iter().any(|(n, _)| *n == t.optimizer) {
        let known: Vec<&str> = OPTIMIZER_NAMES.iter().map(|(n, _)| *n).collect();
        problems.push((
            "optimizer",
            format!(
                "`{}` is not implemented; axl has {}",
                t.optimizer,
                known.join(", ")
            ),
        ));
    }
    if ScheduleKind::parse(&t.lr_scheduler).is_none() {
        problems.push((
            "lr_scheduler",
            format!(
                "`{}` is not implemented; axl has {}",
                t.lr_scheduler,
                ScheduleKind::NAMES.join(", ")
            ),
        ));
    }
    for (key, value) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
        if value.is_some_and(|b| !(0.0..1.0).contains(&b)) {
            problems.push((
                key,
                format!("{} is not in [0, 1)", value.unwrap_or_default()),
            ));
        }
    }
    if t.cosine_min_lr_ratio
        .is_some_and(|r| !(0.0..=1.0).contains(&r))
    {
        problems.push(("cosine_min_lr_ratio", "must be between 0 and 1".into()));
    }
    if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
        problems.push((
            "warmup_ratio",
            "set warmup_steps or warmup_ratio, not both".into(),
        ));
    }
    if t.warmup_ratio.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
        problems.push(("warmup_ratio", "must be between 0 and 1".into()));
    }
    if t.val_set_size < 0.0 || (t.val_set_size >= 1.0 && t.val_set_size.fract() != 0.0) {
        problems.push((
            "val_set_size",
            "a fraction below 1 or a whole number of examples".into(),
        ));
    }
    if t.eval_steps.is_some() && t.evals_per_epoch.is_some() {
        problems.push((
            "evals_per_epoch",
            "set eval_steps or evals_per_epoch, not both".into(),
        ));
    }
    if t.save_steps.is_some() && t.saves_per_epoch.is_some() {
        problems.push((
            "saves_per_epoch",
            "set save_steps or saves_per_epoch, not both".into(),
        ));
    }
    for (key, value) in [("eval_steps", t.eval_steps), ("save_steps", t.save_steps)] {
        if value.is_some_and(|v| v.is_nan() || v <= 0.0 || (v >= 1.0 && v.fract() != 0.0)) {
            problems.push((
                key,
                "a whole number of steps, or a fraction of the run below 1".into(),
            ));
        }
    }
    for (key, value) in [
        ("eval_strategy", &t.eval_strategy),
        ("save_strategy", &t.save_strategy),
    ] {
        if let Some(v) = value {
            if !["no", "steps", "epoch"].contains(&v.as_str()) {
                problems.push((key, format!("`{v}` is not one of no, steps, epoch")));
            }
        }
    }
    for (key, value) in [("bf16", &t.bf16), ("tf32", &t.tf32)] {
        if let Some(BoolOrAuto::Text(s)) = value {
            if s != "auto" {
                problems.push((key, format!("`{s}` is not true, false or auto")));
            }
        }
    }
    if t.fp16 == Some(true) && t.bf16 == Some(BoolOrAuto::Bool(true)) {
        problems.push(("fp16", "fp16 and bf16 cannot both be true".into()));
    }
    if let Some(BoolOrAuto::Text(mode)) = &t.gradient_checkpointing {
        problems.push((
            "gradient_checkpointing",
            format!("`{mode}` (activation offloading) is not implemented yet; use true"),
        ));
    }
    if t.noisy_embedding_alpha.is_some() && t.neftune_noise_alpha.is_some() {
        problems.push((
            "neftune_noise_alpha",
            "set noisy_embedding_alpha or neftune_noise_alpha, not both (they are one setting)"
                .into(),
        ));
    }
    for (key, value) in [
        ("noisy_embedding_alpha", t.noisy_embedding_alpha),
        ("neftune_noise_alpha", t.neftune_noise_alpha),
    ] {
        if value.is_some_and(|a| a.is_nan() || a < 0.0) {
            problems.push((key, "must be a non-negative number".into()));
        }
    }
    if let Some(d) = &t.dynamic_checkpoint {
        if d.check_interval == 0 {
            problems.push((
                "dynamic_checkpoint.check_interval",
                "must be at least 1".into(),
            ));
        }
        if d.trigger_file_path
            .as_deref()
            .is_some_and(|f| f.is_empty() || f.contains('/') || f.contains('\\') || f == "..")
        {
            problems.push((
                "dynamic_checkpoint.trigger_file_path",
                "a file name in output_dir, not a path".into(),
            ));
        }
    }
    problems
}
