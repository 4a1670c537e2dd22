//! The plugin hook points inside the training loop, as the loop sees them: a trait the
//! plugin host implements, so that the loop knows nothing of how plugins are reached.

use axl_plugin_api::payload::{Control, Event, LossBatch, ScheduleContext};
use axl_plugin_api::{Gradient, Hook, TensorView};

use candle_core::{DType, Tensor};

use crate::data::packing::Batch;
use crate::model::{CausalLm, ModelError};

/// What plugins may do inside the loop. Every method has a default that does nothing, and
/// `()` implements none.
pub trait LoopHooks {
    /// Whether some plugin implements `hook` (the loop skips preparing a call otherwise).
    fn wants(&self, hook: Hook) -> bool {
        let _ = hook;
        false
    }

    /// A loop event; the answer may ask to stop training.
    fn event(&mut self, model: &CausalLm, event: &Event) -> Result<Control, ModelError> {
        let _ = (model, event);
        Ok(Control::default())
    }

    /// The step's learning rate instead of the scheduled one.
    fn learning_rate(
        &mut self,
        model: &CausalLm,
        context: &ScheduleContext,
    ) -> Result<Option<f64>, ModelError> {
        let _ = (model, context);
        Ok(None)
    }

    /// A micro-batch's loss from its logits, the gradient written into `grad`.
    fn loss(
        &mut self,
        model: &CausalLm,
        logits: TensorView<'_>,
        grad: &mut [f32],
        batch: &LossBatch,
    ) -> Result<Option<f64>, ModelError> {
        let _ = (model, logits, grad, batch);
        Ok(None)
    }

    /// Edits the step's gradients in place.
    fn gradients(
        &mut self,
        model: &CausalLm,
        gradients: &mut [Gradient<'_>],
    ) -> Result<(), ModelError> {
        let _ = (model, gradients);
        Ok(())
    }

    /// Metrics plugins reported since the last call.
    fn take_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

impl LoopHooks for () {}

/// The loss batch a `compute_loss` plugin receives for `batch`.
fn loss_batch(batch: &Batch, trained_tokens: usize) -> LossBatch {
    LossBatch {
        input_ids: batch.input_ids.concat(),
        labels: batch.labels.concat(),
        rows: batch.input_ids.len(),
        len: batch.input_ids.first().map_or(0, Vec::len),
        normalizer: trained_tokens as f64,
        examples: batch
            .examples
            .iter()
            .map(|e| axl_plugin_api::payload::ExampleSpan {
                row: e.row,
                start: e.start,
                len: e.len,
                fields: e.fields.as_deref().cloned().unwrap_or_default(),
            })
            .collect(),
    }
}

/// A micro-batch's loss from the `compute_loss` hook: the logits handed over as a view, the
/// plugin's gradient returned as a tensor of the logits' shape and dtype (see
/// [`crate::train::step::LossHook`]).
pub fn loss_through_hooks(
    hooks: &mut dyn LoopHooks,
    model: &CausalLm,
    logits: &Tensor,
    batch: &Batch,
    trained_tokens: usize,
) -> Result<Option<(f64, Tensor)>, ModelError> {
    let shape = logits.dims().to_vec();
    let values = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut grad = vec![0f32; values.len()];
    let view = TensorView {
        shape: &shape,
        data: &values,
    };
    let Some(loss) = hooks.loss(model, view, &mut grad, &loss_batch(batch, trained_tokens))? else {
        return Ok(None);
    };
    let grad =
        Tensor::from_vec(grad, shape.as_slice(), model.device())?.to_dtype(logits.dtype())?;
    Ok(Some((loss, grad)))
}

/// Evaluation loss over `batches` (see [`crate::train::step::evaluate`]), through a
/// `compute_loss` plugin when one is loaded.
pub fn evaluate(
    hooks: &mut dyn LoopHooks,
    model: &CausalLm,
    batches: &[Batch],
) -> Result<(f64, usize), ModelError> {
    if !hooks.wants(Hook::ComputeLoss) {
        return super::step::evaluate(model, batches, None);
    }
    let mut loss_hook = |logits: &Tensor, batch: &Batch, trained_tokens: usize| {
        loss_through_hooks(hooks, model, logits, batch, trained_tokens)
    };
    super::step::evaluate(model, batches, Some(&mut loss_hook))
}
