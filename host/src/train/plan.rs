//! What a run will do, decided before the first step: the training settings read from the
//! configuration, the split into training and evaluation examples, and the order of
//! micro-batches in every epoch (a function of the seed, so a resumed run sees the same data).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use axl_kernels::Precision;

use crate::config::training::{BoolOrAuto, TrainingConfig};
use crate::config::AxlConfig;
use crate::data::example::Tokenized;
use crate::data::packing::{pack_first_fit_decreasing, Batch};
use crate::model::ops::IGNORE_INDEX;

use super::optimizer::{OptimizerSettings, OPTIMIZER_NAMES};
use super::schedule::ScheduleKind;

/// The seed when `seed` is not set (transformers' default).
pub const DEFAULT_SEED: u64 = 42;

/// Training settings, with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    /// Examples (or packed bins) per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the data.
    pub num_epochs: f64,
    /// A fixed number of optimizer steps instead.
    pub max_steps: Option<usize>,
    /// Tokens per sequence.
    pub sequence_len: usize,
    /// Pack training examples.
    pub sample_packing: bool,
    /// Pack evaluation examples.
    pub eval_sample_packing: bool,
    /// Pad every batch to `sequence_len`.
    pub pad_to_sequence_len: bool,
    /// Seed of data order, adapter initialization and dropout.
    pub seed: u64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// The optimizer.
    pub optimizer: OptimizerSettings,
    /// The schedule.
    pub schedule: ScheduleKind,
    /// `warmup_steps`.
    pub warmup_steps: Option<usize>,
    /// `warmup_ratio`.
    pub warmup_ratio: Option<f64>,
    /// `cosine_min_lr_ratio`.
    pub min_lr_ratio: Option<f64>,
    /// Gradient clipping norm (0 turns clipping off).
    pub max_grad_norm: f64,
    /// `logging_steps`.
    pub logging_steps: Option<usize>,
    /// `val_set_size`.
    pub val_set_size: f64,
    /// `eval_steps`.
    pub eval_steps: Option<f64>,
    /// `evals_per_epoch`.
    pub evals_per_epoch: Option<usize>,
    /// Evaluation turned off (`eval_strategy: no`).
    pub eval_off: bool,
    /// Evaluate at the end of every epoch (`eval_strategy: epoch`).
    pub eval_each_epoch: bool,
    /// `save_steps`.
    pub save_steps: Option<f64>,
    /// `saves_per_epoch`.
    pub saves_per_epoch: Option<usize>,
    /// Checkpoints turned off (`save_strategy: no`).
    pub save_off: bool,
    /// `save_total_limit`.
    pub save_total_limit: Option<usize>,
    /// The precision of the linear layers' products: bf16 with `bf16: true`.
    pub precision: Precision,
    /// What to tell the user about a requested precision the CPU computes in f32.
    pub precision_note: Option<&'static str>,
    /// NEFTune's alpha.
    pub embedding_noise_alpha: Option<f64>,
    /// Recompute each decoder layer's activations in the backward pass.
    pub gradient_checkpointing: bool,
}

impl TrainSettings {
    /// The settings of a validated configuration (`learning_rate` 0 when unset: evaluation
    /// needs none; `axl train` requires it).
    pub fn from_config(c: &AxlConfig) -> Result<Self, String> {
        let t = &c.training;
        let learning_rate = t
            .learning_rate
            .as_ref()
            .and_then(|lr| lr.value())
            .unwrap_or(0.0);
        let kind = OPTIMIZER_NAMES
            .iter()
            .find(|(n, _)| *n == t.optimizer)
            .map(|(_, k)| *k)
            .ok_or_else(|| format!("optimizer `{}` is not implemented", t.optimizer))?;
        let schedule = ScheduleKind::parse(&t.lr_scheduler)
            .ok_or_else(|| format!("lr_scheduler `{}` is not implemented", t.lr_scheduler))?;
        let defaults = OptimizerSettings::default();
        let (precision, precision_note) = precision(t)?;
        Ok(Self {
            micro_batch_size: c.micro_batch_size,
            gradient_accumulation_steps: t.gradient_accumulation_steps,
            num_epochs: t.num_epochs,
            max_steps: c.max_steps,
            sequence_len: c.sequence_len,
            sample_packing: c.sample_packing,
            eval_sample_packing: c.eval_sample_packing.unwrap_or(c.sample_packing),
            pad_to_sequence_len: c.pad_to_sequence_len.unwrap_or(false),
            seed: c.seed.unwrap_or(DEFAULT_SEED),
            learning_rate,
            optimizer: OptimizerSettings {
                kind,
                beta1: t.adam_beta1.unwrap_or(defaults.beta1),
                beta2: t.adam_beta2.unwrap_or(defaults.beta2),
                epsilon: t.adam_epsilon.unwrap_or(defaults.epsilon),
                weight_decay: t.weight_decay.unwrap_or(defaults.weight_decay),
                groups: Vec::new(),
            },
            schedule,
            warmup_steps: t.warmup_steps,
            warmup_ratio: t.warmup_ratio,
            min_lr_ratio: t.cosine_min_lr_ratio,
            max_grad_norm: t.max_grad_norm.unwrap_or(1.0),
            logging_steps: t.logging_steps,
            val_set_size: t.val_set_size,
            eval_steps: t.eval_steps,
            evals_per_epoch: t.evals_per_epoch,
            eval_off: t.eval_strategy.as_deref() == Some("no"),
            eval_each_epoch: t.eval_strategy.as_deref() == Some("epoch"),
            save_steps: t.save_steps,
            saves_per_epoch: t.saves_per_epoch,
            save_off: t.save_strategy.as_deref() == Some("no"),
            save_total_limit: t.save_total_limit,
            precision,
            precision_note,
            embedding_noise_alpha: t.noisy_embedding_alpha.or(t.neftune_noise_alpha),
            gradient_checkpointing: t.gradient_checkpointing == Some(BoolOrAuto::Bool(true)),
        })
    }
}

/// The products' precision that `bf16` and `fp16` ask for, and a note where the CPU computes
/// in f32 instead. `bf16: true` needs AVX-512 BF16, as Axolotl's needs a bf16-capable GPU.
fn precision(t: &TrainingConfig) -> Result<(Precision, Option<&'static str>), String> {
    if t.bf16 == Some(BoolOrAuto::Bool(true)) {
        if !Precision::bf16_available() {
            return Err(
                "bf16: true needs a CPU with AVX-512 BF16, which this one lacks; \
                        set bf16: false to train in f32"
                    .into(),
            );
        }
        return Ok((Precision::Bf16, None));
    }
    let note = if t.fp16 == Some(true) {
        Some("fp16: true: on CPU axl computes in f32 (bf16: true computes linear layers in bf16)")
    } else if matches!(t.bf16, Some(BoolOrAuto::Text(_))) {
        Some("bf16: auto: on CPU axl computes in f32 (bf16: true computes linear layers in bf16)")
    } else {
        None
    };
    Ok((Precision::F32, note))
}

/// Splits examples into training and evaluation sets: `val_set_size` below 1 is a fraction
/// (rounded up, as `datasets`' `train_test_split` does), otherwise a count; the evaluation
/// examples are drawn with the seed.
pub fn split_validation(
    examples: Vec<Tokenized>,
    val_set_size: f64,
    seed: u64,
) -> (Vec<Tokenized>, Vec<Tokenized>) {
    let n = examples.len();
    let n_eval = if val_set_size <= 0.0 {
        0
    } else if val_set_size < 1.0 {
        (val_set_size * n as f64).ceil() as usize
    } else {
        val_set_size as usize
    }
    .min(n);
    if n_eval == 0 {
        return (examples, Vec::new());
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if is_eval[i] {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    (train, eval)
}

/// The micro-batches of a set of examples, in order: groups of `micro_batch_size` examples,
/// or with packing, bins of `micro_batch_size × sequence_len` tokens filled first-fit
/// decreasing.
pub fn micro_batches(
    examples: &[&Tokenized],
    settings: &TrainSettings,
    packing: bool,
    pad_id: u32,
) -> Vec<Batch> {
    let pad_to = settings
        .pad_to_sequence_len
        .then_some(settings.sequence_len);
    if packing {
        let capacity = settings.micro_batch_size * settings.sequence_len;
        let lengths: Vec<usize> = examples.iter().map(|e| e.len()).collect();
        let pad_to = settings.pad_to_sequence_len.then_some(capacity);
        pack_first_fit_decreasing(&lengths, capacity)
            .into_iter()
            .map(|bin| {
                let members: Vec<&Tokenized> = bin.iter().map(|i| examples[*i]).collect();
                Batch::packed(&members, pad_id, pad_to)
            })
            .collect()
    } else {
        examples
            .chunks(settings.micro_batch_size)
            .map(|chunk| Batch::padded(chunk, pad_id, pad_to))
            .collect()
    }
}

/// The micro-batches of training epoch `epoch`: the examples shuffled with the seed and the
/// epoch, batched, and (packed bins) shuffled again.
pub fn epoch_batches(
    examples: &[Tokenized],
    settings: &TrainSettings,
    epoch: usize,
    pad_id: u32,
) -> Vec<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed.wrapping_add(epoch as u64));
    let mut order: Vec<&Tokenized> = examples.iter().collect();
    order.shuffle(&mut rng);
    let mut batches = micro_batches(&order, settings, settings.sample_packing, pad_id);
    if settings.sample_packing {
        batches.shuffle(&mut rng);
    }
    batches
}

/// Optimizer steps in one epoch of `micro_batches` micro-batches (a last, partial group of
/// micro-batches is a step of its own).
pub fn steps_per_epoch(micro_batches: usize, accumulation: usize) -> usize {
    micro_batches.div_ceil(accumulation).max(1)
}

/// The positions a batch trains on: labels that are not ignored, after the shift by one.
pub fn trained_positions(batch: &Batch) -> usize {
    batch
        .labels
        .iter()
        .map(|row| row.iter().skip(1).filter(|l| **l != IGNORE_INDEX).count())
        .sum()
}

/// A step interval from `*_steps` (whole, or a fraction of the run) or `*_per_epoch`.
pub fn interval(
    steps: Option<f64>,
    per_epoch: Option<usize>,
    total_steps: usize,
    steps_per_epoch: usize,
) -> Option<usize> {
    match (steps, per_epoch) {
        (Some(s), _) if s < 1.0 => Some(((s * total_steps as f64).ceil() as usize).max(1)),
        (Some(s), _) => Some(s as usize),
        (None, Some(n)) if n > 0 => Some((steps_per_epoch / n).max(1)),
        _ => None,
    }
}
