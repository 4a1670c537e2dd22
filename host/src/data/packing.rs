//! Sample packing and batching: examples are packed first-fit-decreasing into bins of
//! `micro_batch_size × sequence_len` tokens; within a bin, positions restart at every example
//! and no token attends across examples ([`PackedLayout`]), so a packed bin computes exactly
//! what its examples compute alone. Unpacked batches are right-padded.

use candle_core::{Device, Tensor};

use super::example::Tokenized;
use crate::model::ops::IGNORE_INDEX;
use crate::model::PackedLayout;
pub use axl_plugin_api::payload::ExampleSpan;

/// Packs example lengths into bins of `capacity` tokens, first-fit-decreasing. Returns the
/// example indices of each bin. Lengths above the capacity get a bin of their own.
pub fn pack_first_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let n = lengths[i];
        match bins.iter_mut().find(|(used, _)| used + n <= capacity) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => bins.push((n, vec![i])),
        }
    }
    bins.into_iter().map(|(_, members)| members).collect()
}

/// The share of bin capacity filled with tokens.
pub fn packing_efficiency(lengths: &[usize], bins: &[Vec<usize>], capacity: usize) -> f64 {
    let used: usize = bins.iter().flatten().map(|&i| lengths[i]).sum();
    used as f64 / (bins.len().max(1) * capacity) as f64
}

/// Where an example lies in a batch, with the fields a plugin kept with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExamplePlace {
    /// The row.
    pub row: usize,
    /// Its first position in the row.
    pub start: usize,
    /// Its tokens.
    pub len: usize,
    /// The plugin's fields, shared with the example.
    pub fields: Option<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
}

/// Where `example` lies in a batch: `row`, from position `start`.
fn span(example: &Tokenized, row: usize, start: usize) -> ExamplePlace {
    ExamplePlace {
        row,
        start,
        len: example.len(),
        fields: example.fields.clone(),
    }
}

/// A batch ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Token ids per row, all rows of one length.
    pub input_ids: Vec<Vec<u32>>,
    /// Labels per row (−100 on padding).
    pub labels: Vec<Vec<i64>>,
    /// For packed rows: where each sequence lies.
    pub layout: Option<PackedLayout>,
    /// Where each example lies, with the fields a plugin kept with it.
    pub examples: Vec<ExamplePlace>,
}

impl Batch {
    /// Right-pads examples into one batch, to `pad_to` tokens or to the longest example.
    pub fn padded(examples: &[&Tokenized], pad_id: u32, pad_to: Option<usize>) -> Self {
        let width = pad_to
            .unwrap_or(0)
            .max(examples.iter().map(|e| e.len()).max().unwrap_or(0));
        let mut batch = Self {
            input_ids: Vec::new(),
            labels: Vec::new(),
            layout: None,
            examples: Vec::new(),
        };
        for (row, e) in examples.iter().enumerate() {
            batch.examples.push(span(e, row, 0));
            let mut ids = e.input_ids.clone();
            let mut labels = e.labels.clone();
            ids.resize(width, pad_id);
            labels.resize(width, IGNORE_INDEX);
            batch.input_ids.push(ids);
            batch.labels.push(labels);
        }
        batch
    }

    /// One packed row of examples (padded to `pad_to` tokens when given). The first label of
    /// every example after the first is masked: no token is trained to predict the start of
    /// the next, unrelated example, exactly as when each example stands alone.
    pub fn packed(examples: &[&Tokenized], pad_id: u32, pad_to: Option<usize>) -> Self {
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        let mut lengths = Vec::new();
        let mut spans = Vec::new();
        for e in examples {
            let start = labels.len();
            spans.push(span(e, 0, start));
            ids.extend_from_slice(&e.input_ids);
            labels.extend_from_slice(&e.labels);
            if start > 0 && !e.labels.is_empty() {
                labels[start] = IGNORE_INDEX;
            }
            lengths.push(e.len());
        }
        if let Some(width) = pad_to.filter(|w| *w > ids.len()) {
            lengths.push(width - ids.len());
            ids.resize(width, pad_id);
            labels.resize(width, IGNORE_INDEX);
        }
        Self {
            input_ids: vec![ids],
            labels: vec![labels],
            layout: Some(PackedLayout::from_lengths(&[lengths])),
            examples: spans,
        }
    }

    /// `(input_ids, labels)` tensors of shape `[rows, len]`.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let rows = self.input_ids.len();
        let len = self.input_ids.first().map_or(0, Vec::len);
        let ids: Vec<u32> = self.input_ids.concat();
        let labels: Vec<i64> = self.labels.concat();
        Ok((
            Tensor::from_vec(ids, (rows, len), device)?,
            Tensor::from_vec(labels, (rows, len), device)?,
        ))
    }
}
