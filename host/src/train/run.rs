//! The training loop: steps over the planned micro-batches with the schedule's learning rate,
//! logging to the terminal and to `metrics.jsonl`, evaluating, and saving checkpoints and the
//! final model; a run resumed from a checkpoint continues exactly where it stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{json, Value};

use crate::data::example::Tokenized;
use crate::fsio;
use crate::model::{CausalLm, ModelError};

use axl_plugin_api::payload::{Event, ScheduleContext, TrainState};
use axl_plugin_api::{Gradient, Hook, TensorViewMut};

use super::checkpoint::{self, Progress};
use super::hooks::{loss_through_hooks, LoopHooks};
use super::optimizer::Optimizer;
use super::plan::{self, TrainSettings};
use super::schedule::{warmup_steps, Schedule};
use super::step;

/// The metrics file in `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a run needs besides the model.
pub struct RunInputs<'a> {
    /// Training examples.
    pub train: &'a [Tokenized],
    /// Evaluation examples (may be empty).
    pub eval: &'a [Tokenized],
    /// The settings.
    pub settings: &'a TrainSettings,
    /// Where checkpoints, metrics and the final model go.
    pub output_dir: &'a Path,
    /// The id padding uses.
    pub pad_id: u32,
    /// A checkpoint whose weights the model already holds, to continue from.
    pub resume_from: Option<&'a Path>,
    /// Writes the model's trained weights into a directory (`final` is false for checkpoints,
    /// which always keep full f32 precision).
    pub save_weights: &'a dyn Fn(&CausalLm, &Path, bool) -> Result<(), ModelError>,
    /// Receives every log line.
    pub log: &'a mut dyn FnMut(&str),
    /// Receives a one-line progress bar after every step (on a terminal; `None` otherwise).
    pub progress_bar: Option<&'a mut dyn FnMut(&str)>,
    /// Set (by Ctrl-C) to stop: the run saves a checkpoint after the current step and returns.
    pub stop: Option<&'a AtomicBool>,
    /// `dynamic_checkpoint`: a trigger file, looked for every so many steps; when found it is
    /// deleted and a checkpoint saved.
    pub trigger: Option<(PathBuf, usize)>,
    /// The plugins' hook points in the loop (`&mut ()` for none).
    pub hooks: &'a mut dyn LoopHooks,
}

fn event(hook: Hook, progress: &Progress, total_steps: usize, metrics: &[(&str, f64)]) -> Event {
    Event {
        hook,
        state: TrainState {
            global_step: progress.global_step as u64,
            max_steps: total_steps as u64,
            epoch: progress.epoch,
        },
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        dir: None,
        message: None,
    }
}

/// Lets the plugins edit the step's gradients, as flat vectors written back afterwards.
fn edit_gradients(
    model: &CausalLm,
    params: &[(String, candle_core::Var)],
    grads: &mut step::Gradients,
    hooks: &mut dyn LoopHooks,
) -> Result<(), ModelError> {
    let mut values = grads.to_vecs(params)?;
    let shapes: Vec<Vec<usize>> = params
        .iter()
        .map(|(_, v)| v.as_tensor().dims().to_vec())
        .collect();
    let mut views: Vec<Gradient<'_>> = params
        .iter()
        .zip(&shapes)
        .zip(values.iter_mut())
        .map(|(((name, _), shape), data)| Gradient {
            name,
            grad: TensorViewMut { shape, data },
        })
        .collect();
    hooks.gradients(model, &mut views)?;
    drop(views);
    for ((value, shape), slot) in values.into_iter().zip(&shapes).zip(&mut grads.values) {
        *slot = Some(candle_core::Tensor::from_vec(
            value,
            shape.as_slice(),
            model.device(),
        )?);
    }
    Ok(())
}

/// One logged training step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// The step (1-based, as transformers counts).
    pub step: usize,
    /// Mean loss per trained token.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub learning_rate: f64,
    /// Epochs done after the step.
    pub epoch: f64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    /// Every step taken by this process, in order.
    pub steps: Vec<StepRecord>,
    /// The last evaluation loss.
    pub eval_loss: Option<f64>,
    /// The optimizer steps of the whole run.
    pub total_steps: usize,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    /// The checkpoint saved when the run was stopped before its end.
    pub interrupted: Option<PathBuf>,
}

/// Appends one JSON object per line to `metrics.jsonl`.
struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// Opens the file, keeping only the lines of steps up to `keep_through` (a resumed run
    /// replaces what the interrupted run logged after its checkpoint).
    fn open(output_dir: &Path, keep_through: usize) -> Result<Self, ModelError> {
        let path = output_dir.join(METRICS_FILE);
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                keep_through > 0
                    && serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s as usize <= keep_through)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        fsio::write_atomic(&path, kept.as_bytes()).map_err(|e| ModelError::file(&path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| ModelError::file(&path, e))?;
        Ok(Self { path, file })
    }

    fn write(&mut self, value: &Value) -> Result<(), ModelError> {
        writeln!(self.file, "{value}").map_err(|e| ModelError::file(&self.path, e))
    }
}

fn seconds_text(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `[#####-----] step/total | details`.
fn bar_line(step: usize, total: usize, details: &str) -> String {
    const WIDTH: usize = 24;
    let filled = (step * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    format!(
        "[{}{}] {step}/{total} | {details}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled)
    )
}

/// Runs (or continues) training. The model's trainable parameters are what is trained.
pub fn run(model: &mut CausalLm, inputs: RunInputs<'_>) -> Result<RunReport, ModelError> {
    let settings = inputs.settings;
    let log = inputs.log;
    let hooks = inputs.hooks;
    let mut progress_bar = inputs.progress_bar;
    let mut tokens_this_run = 0usize;
    std::fs::create_dir_all(inputs.output_dir)
        .map_err(|e| ModelError::file(inputs.output_dir, e))?;
    if inputs.train.is_empty() {
        return Err(ModelError::Invalid(
            "no training examples: every example went to evaluation (val_set_size)".into(),
        ));
    }
    let mut first_epoch = Some(plan::epoch_batches(
        inputs.train,
        settings,
        0,
        inputs.pad_id,
    ));
    let per_epoch = plan::steps_per_epoch(
        first_epoch.as_ref().map_or(0, Vec::len),
        settings.gradient_accumulation_steps,
    );
    let total_steps = settings
        .max_steps
        .unwrap_or_else(|| ((settings.num_epochs * per_epoch as f64).ceil() as usize).max(1));
    let schedule = Schedule {
        kind: settings.schedule,
        base_lr: settings.learning_rate,
        warmup_steps: warmup_steps(settings.warmup_steps, settings.warmup_ratio, total_steps),
        total_steps,
        min_lr_ratio: settings.min_lr_ratio,
    };
    let logging_steps = settings
        .logging_steps
        .unwrap_or_else(|| ((total_steps as f64 * 0.005) as usize).clamp(1, 10));
    let evaluating = !inputs.eval.is_empty() && !settings.eval_off;
    let eval_every = plan::interval(
        settings.eval_steps,
        settings.evals_per_epoch,
        total_steps,
        per_epoch,
    )
    .filter(|_| evaluating);
    let eval_each_epoch = evaluating && (settings.eval_each_epoch || eval_every.is_none());
    let save_every = plan::interval(
        settings.save_steps,
        settings.saves_per_epoch,
        total_steps,
        per_epoch,
    )
    .filter(|_| !settings.save_off);
    let save_each_epoch = !settings.save_off && save_every.is_none();

    let mut optimizer = Optimizer::new(settings.optimizer.clone());
    let mut progress = Progress {
        global_step: 0,
        epoch: 0.0,
        seed: settings.seed,
        log_history: Vec::new(),
    };
    if let Some(dir) = inputs.resume_from {
        progress = checkpoint::restore(dir, &mut optimizer)?;
        if progress.seed != settings.seed {
            return Err(ModelError::Invalid(format!(
                "{}: the checkpoint was trained with seed {}, the configuration says {}; resuming needs the same seed",
                dir.display(),
                progress.seed,
                settings.seed
            )));
        }
        progress.log_history.retain(|e| {
            e.get("step").and_then(Value::as_u64).unwrap_or(0) as usize <= progress.global_step
        });
        log(&format!(
            "resuming from {} at step {}",
            dir.display(),
            progress.global_step
        ));
    }
    let mut metrics = Metrics::open(inputs.output_dir, progress.global_step)?;
    model.set_embedding_noise(settings.embedding_noise_alpha);
    model.set_precision(settings.precision);
    let params = model.trainable_params();
    let trainable: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    log(&format!(
        "training {} examples ({} for evaluation): {total_steps} steps, {per_epoch} per epoch, {trainable} trainable parameters",
        inputs.train.len(),
        inputs.eval.len()
    ));
    let eval_batches = plan::micro_batches(
        &inputs.eval.iter().collect::<Vec<_>>(),
        settings,
        settings.eval_sample_packing,
        inputs.pad_id,
    );
    let mut report = RunReport {
        total_steps,
        ..Default::default()
    };
    let trainer_state = |progress: &Progress| {
        json!({
            "best_metric": null,
            "best_model_checkpoint": null,
            "epoch": progress.epoch,
            "eval_steps": eval_every,
            "global_step": progress.global_step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": progress.log_history,
            "logging_steps": logging_steps,
            "max_steps": total_steps,
            "num_input_tokens_seen": 0,
            "num_train_epochs": settings.num_epochs.ceil() as u64,
            "save_steps": save_every,
            "stateful_callbacks": {},
            "total_flos": 0,
            "train_batch_size": settings.micro_batch_size,
            "trial_name": null,
            "trial_params": null,
        })
    };
    let started = Instant::now();
    let steps_at_start = progress.global_step;
    let (mut window_loss, mut window_norm, mut window_steps, mut window_tokens) = (0.0, 0.0, 0, 0);
    let mut window_start = Instant::now();
    let mut epoch = progress.global_step / per_epoch;
    let mut hook_failure = None;
    let mut stop_requested = tell(
        hooks,
        model,
        &event(Hook::OnTrainBegin, &progress, total_steps, &[]),
        &mut hook_failure,
    );
    'epochs: while progress.global_step < total_steps && !stop_requested {
        let batches = match first_epoch.take().filter(|_| epoch == 0) {
            Some(batches) => batches,
            None => plan::epoch_batches(inputs.train, settings, epoch, inputs.pad_id),
        };
        let groups: Vec<&[crate::data::packing::Batch]> = batches
            .chunks(settings.gradient_accumulation_steps)
            .collect();
        let skip = progress.global_step - epoch * per_epoch;
        for (index, group) in groups.iter().enumerate().skip(skip) {
            if progress.global_step >= total_steps {
                break;
            }
            let step_number = progress.global_step;
            model.set_dropout(Some(
                settings
                    .seed
                    .wrapping_mul(0x9E37_79B9)
                    .wrapping_add(step_number as u64),
            ));
            let scheduled = schedule.lr(step_number);
            let lr = if hooks.wants(Hook::LrSchedule) {
                let context = ScheduleContext {
                    step: step_number as u64,
                    total_steps: total_steps as u64,
                    learning_rate: settings.learning_rate,
                    scheduled,
                };
                hooks.learning_rate(model, &context)?.unwrap_or(scheduled)
            } else {
                scheduled
            };
            let wants_loss = hooks.wants(Hook::ComputeLoss);
            let mut loss_hook = |logits: &candle_core::Tensor,
                                 batch: &crate::data::packing::Batch,
                                 trained_tokens: usize| {
                loss_through_hooks(hooks, model, logits, batch, trained_tokens)
            };
            let (mut grads, mut outcome) = step::accumulate(
                model,
                &params,
                group,
                settings.gradient_checkpointing,
                if wants_loss {
                    Some(&mut loss_hook)
                } else {
                    None
                },
            )?;
            if hooks.wants(Hook::OnGradients) {
                edit_gradients(model, &params, &mut grads, hooks)?;
                outcome.grad_norm = grads.norm()?;
            }
            grads.clip(outcome.grad_norm, settings.max_grad_norm)?;
            step::apply(&mut optimizer, &params, &grads, lr)?;
            progress.global_step += 1;
            progress.epoch = epoch as f64 + (index + 1) as f64 / per_epoch as f64;
            let record = StepRecord {
                step: progress.global_step,
                loss: outcome.loss,
                grad_norm: outcome.grad_norm,
                learning_rate: lr,
                epoch: progress.epoch,
            };
            report.steps.push(record.clone());
            window_loss += outcome.loss;
            window_norm += outcome.grad_norm;
            window_steps += 1;
            window_tokens += outcome.tokens;
            let last = progress.global_step == total_steps;
            let end_of_epoch = index + 1 == groups.len();
            tokens_this_run += outcome.tokens;
            if let Some(bar) = progress_bar.as_mut() {
                let seconds = started.elapsed().as_secs_f64().max(1e-9);
                let done = progress.global_step - steps_at_start;
                let eta = seconds / done as f64 * (total_steps - progress.global_step) as f64;
                bar(&bar_line(
                    progress.global_step,
                    total_steps,
                    &format!(
                        "loss {:.4} | lr {lr:.2e} | {:.0} tokens/s | eta {}",
                        outcome.loss,
                        tokens_this_run as f64 / seconds,
                        seconds_text(eta)
                    ),
                ));
            }
            if progress.global_step.is_multiple_of(logging_steps) || last {
                let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
                let tokens_per_second = window_tokens as f64 / elapsed;
                let done = progress.global_step - steps_at_start;
                let eta = started.elapsed().as_secs_f64() / done as f64
                    * (total_steps - progress.global_step) as f64;
                let mut entry = json!({
                    "step": progress.global_step,
                    "loss": window_loss / window_steps as f64,
                    "grad_norm": window_norm / window_steps as f64,
                    "learning_rate": lr,
                    "epoch": progress.epoch,
                    "tokens_per_second": tokens_per_second,
                });
                let logged = [
                    ("loss", window_loss / window_steps as f64),
                    ("grad_norm", window_norm / window_steps as f64),
                    ("learning_rate", lr),
                ];
                stop_requested |= tell(
                    hooks,
                    model,
                    &event(Hook::OnLog, &progress, total_steps, &logged),
                    &mut hook_failure,
                );
                for (name, value) in hooks.take_metrics() {
                    if entry.get(&name).is_some() {
                        log(&format!(
                            "a plugin reported the metric `{name}`, which axl logs itself; it is not recorded"
                        ));
                    } else {
                        entry[name] = json!(value);
                    }
                }
                log(&format!(
                    "step {}/{total_steps} | loss {:.4} | grad_norm {:.3} | lr {lr:.3e} | {tokens_per_second:.0} tokens/s | eta {}",
                    progress.global_step,
                    window_loss / window_steps as f64,
                    window_norm / window_steps as f64,
                    seconds_text(eta)
                ));
                metrics.write(&entry)?;
                progress.log_history.push(entry);
                (window_loss, window_norm, window_steps, window_tokens) = (0.0, 0.0, 0, 0);
                window_start = Instant::now();
            }
            let eval_now = eval_every.is_some_and(|n| progress.global_step.is_multiple_of(n))
                || (eval_each_epoch && (end_of_epoch || last));
            if eval_now {
                model.set_dropout(None);
                let (eval_loss, eval_tokens) = super::hooks::evaluate(hooks, model, &eval_batches)?;
                let entry = json!({
                    "step": progress.global_step,
                    "epoch": progress.epoch,
                    "eval_loss": eval_loss,
                    "eval_perplexity": eval_loss.exp(),
                    "eval_tokens": eval_tokens,
                });
                log(&format!(
                    "eval at step {} | eval_loss {eval_loss:.4} | perplexity {:.3}",
                    progress.global_step,
                    eval_loss.exp()
                ));
                metrics.write(&entry)?;
                progress.log_history.push(entry);
                report.eval_loss = Some(eval_loss);
                let measured = [
                    ("eval_loss", eval_loss),
                    ("eval_perplexity", eval_loss.exp()),
                ];
                stop_requested |= tell(
                    hooks,
                    model,
                    &event(Hook::OnEvaluate, &progress, total_steps, &measured),
                    &mut hook_failure,
                );
            }
            let triggered = inputs.trigger.as_ref().is_some_and(|(file, every)| {
                progress.global_step.is_multiple_of(*every) && file.is_file()
            });
            if triggered {
                if let Some((file, _)) = &inputs.trigger {
                    let _ = std::fs::remove_file(file);
                    log(&format!("{} found: saving a checkpoint", file.display()));
                }
            }
            let stopping = inputs.stop.is_some_and(|s| s.load(Ordering::SeqCst));
            let save_now = save_every.is_some_and(|n| progress.global_step.is_multiple_of(n))
                || (save_each_epoch && end_of_epoch && !last)
                || triggered
                || (stopping && !last);
            if save_now {
                let dir = checkpoint::save(
                    inputs.output_dir,
                    &progress,
                    &optimizer,
                    &trainer_state(&progress),
                    settings.save_total_limit,
                    &|dir| (inputs.save_weights)(model, dir, false),
                )?;
                log(&format!("saved {}", dir.display()));
                report.checkpoints.push(dir.clone());
                let mut saved = event(Hook::OnSave, &progress, total_steps, &[]);
                saved.dir = Some(dir.display().to_string());
                stop_requested |= tell(hooks, model, &saved, &mut hook_failure);
                if stopping {
                    report.interrupted = Some(dir);
                    return Ok(report);
                }
            }
            stop_requested |= tell(
                hooks,
                model,
                &event(Hook::OnStepEnd, &progress, total_steps, &[]),
                &mut hook_failure,
            );
            if stop_requested {
                log(&format!(
                    "{}: ending at step {}",
                    if hook_failure.is_some() {
                        "a plugin failed (on_error: abort); saving before stopping"
                    } else {
                        "a plugin asked to stop training"
                    },
                    progress.global_step
                ));
                break 'epochs;
            }
        }
        epoch += 1;
    }
    model.set_dropout(None);
    tell(
        hooks,
        model,
        &event(Hook::OnTrainEnd, &progress, total_steps, &[]),
        &mut hook_failure,
    );
    (inputs.save_weights)(model, inputs.output_dir, true)?;
    let state_path = inputs.output_dir.join(checkpoint::TRAINER_STATE_FILE);
    fsio::write_json_atomic(&state_path, &trainer_state(&progress))
        .map_err(|e| ModelError::file(&state_path, e))?;
    match hook_failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Tells the plugins of a loop event; whether training should stop. A plugin's failure does
/// not end the run on the spot: it stops training, the model is saved as at a normal end, and
/// the failure is returned afterwards, so that nothing trained is lost.
fn tell(
    hooks: &mut dyn LoopHooks,
    model: &CausalLm,
    event: &Event,
    failure: &mut Option<ModelError>,
) -> bool {
    match hooks.event(model, event) {
        Ok(control) => control.stop_training,
        Err(e) => {
            failure.get_or_insert(e);
            true
        }
    }
}
