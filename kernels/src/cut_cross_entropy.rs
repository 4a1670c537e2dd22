//! Cut cross-entropy (Wijmans et al., 2024): the loss of the language-model head without its
//! logits. The forward pass computes tiles of `hidden · weightᵀ` (a block of rows × a block
//! of the vocabulary) one after the other and folds each into the rows' running
//! log-sum-exp, keeping only the correct-token logit; nothing vocabulary-sized outlives a
//! tile. The backward pass recomputes each tile, turns it into the gradient of the logits,
//! and carries it to `∂hidden` (and `∂weight` when the weight trains) — skipping the columns
//! of a tile whose every gradient is below the precision of the products ("gradient
//! filtering": `finfo(dtype).eps / 32` of the products' type, as the reference
//! implementation's `filter_eps="auto"`, compared, as there, with each row's gradient before
//! the incoming gradient and token scaling scale it). Rows whose target is ignored are
//! dropped first.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{par_matmul_in, tensor, with_slices, Mat};
use crate::token_loss::{CountedRows, HeadInputs, LossOptions, RowStats};
use crate::{vectorized, Precision};

/// Columns of a tile that the gradient filter keeps or skips together.
const FILTER_COLUMNS: usize = 256;

/// How the op runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Precision of the products.
    pub precision: Precision,
    /// Rows per tile.
    pub token_block: usize,
    /// Vocabulary ids per tile.
    pub vocab_block: usize,
    /// Gradients below this are skipped by the backward pass, a block of columns at a time;
    /// `None` for `finfo(dtype).eps / 32` of the products' type, `Some(0.0)` to keep all.
    pub filter_eps: Option<f32>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            token_block: 512,
            vocab_block: 2048,
            filter_eps: None,
        }
    }
}

impl Settings {
    /// The gradient filter's threshold.
    pub fn filter_threshold(&self) -> f32 {
        self.filter_eps.unwrap_or(match self.precision {
            Precision::F32 => f32::EPSILON / 32.0,
            // bf16 keeps 8 significant bits: its epsilon is 2⁻⁷.
            Precision::Bf16 => 2f32.powi(-7) / 32.0,
        })
    }
}

/// The summed loss (a scalar) of the logits `hidden · weightᵀ` (`hidden` `[..., features]`,
/// `weight` `[vocab, features]`) against `targets` (one per row, [`IGNORE_INDEX`] for rows
/// not counted), formed as `options` say, with gradients for the inputs the graph tracks.
///
/// [`IGNORE_INDEX`]: crate::token_loss::IGNORE_INDEX
pub fn cut_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[i64],
    options: &LossOptions,
    settings: Settings,
) -> Result<Tensor> {
    options.validate()?;
    crate::linear::check(hidden, weight)?;
    if settings.token_block == 0 || settings.vocab_block == 0 {
        candle_core::bail!("cut cross-entropy: blocks must hold at least one row and id");
    }
    if !crate::fused_applies(&[hidden, weight]) {
        return crate::token_loss::reference(hidden, weight, targets, options);
    }
    let op = CutCrossEntropy {
        targets: targets.to_vec(),
        options: *options,
        settings,
        hidden_gradient: hidden.track_op(),
        weight_gradient: weight.track_op(),
        saved: Mutex::new(None),
    };
    hidden
        .contiguous()?
        .apply_op2_arc(&weight.contiguous()?, Arc::new(Box::new(op)))
}

struct CutCrossEntropy {
    targets: Vec<i64>,
    options: LossOptions,
    settings: Settings,
    hidden_gradient: bool,
    weight_gradient: bool,
    /// Per counted row, from the forward pass: the log-sum-exp and the gradient factor.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// The operands of one pass over the tiles: the counted rows packed together, the weight,
/// and the sizes.
struct Operands<'a> {
    x: &'a [f32],
    weight: &'a [f32],
    targets: &'a [usize],
    features: usize,
    vocab: usize,
}

impl CutCrossEntropy {
    /// Calls `f(first_row, rows, first_id, ids, tile)` for every tile of the logits, in
    /// order, `tile` holding the (capped) logits row-major.
    fn for_each_tile(
        &self,
        ops: &Operands<'_>,
        mut f: impl FnMut(usize, usize, usize, usize, &mut [f32]),
    ) {
        let (tb, vb) = (self.settings.token_block, self.settings.vocab_block);
        let n = ops.targets.len();
        let mut tile = vec![0f32; tb.min(n.max(1)) * vb.min(ops.vocab)];
        for t0 in (0..n).step_by(tb) {
            let m = tb.min(n - t0);
            for v0 in (0..ops.vocab).step_by(vb) {
                let w = vb.min(ops.vocab - v0);
                let tile = &mut tile[..m * w];
                // SAFETY: row-major operands and destination of the sizes given.
                unsafe {
                    par_matmul_in(
                        self.settings.precision,
                        m,
                        w,
                        ops.features,
                        tile.as_mut_ptr(),
                        w,
                        false,
                        Mat::rows(ops.x[t0 * ops.features..].as_ptr(), ops.features),
                        Mat::rows(ops.weight[v0 * ops.features..].as_ptr(), ops.features).t(),
                        1.0,
                    )
                };
                let options = &self.options;
                tile.par_chunks_mut(w)
                    .for_each(|row| vectorized!({ options.cap_in_place(row) }));
                f(t0, m, v0, w, tile);
            }
        }
    }
}

impl CustomOp2 for CutCrossEntropy {
    fn name(&self) -> &'static str {
        "cut-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let HeadInputs {
            features,
            vocab,
            counted,
            x,
            weight,
            ..
        } = HeadInputs::of(
            (hidden, hidden_layout),
            (weight, weight_layout),
            &self.targets,
            self.name(),
        )?;
        let ops = Operands {
            x: &x,
            weight,
            targets: &counted.targets,
            features,
            vocab,
        };
        let mut stats = vec![RowStats::default(); counted.rows.len()];
        let smoothing = self.options.label_smoothing > 0.0;
        self.for_each_tile(&ops, |t0, m, v0, w, tile| {
            tile.par_chunks(w)
                .zip(stats[t0..t0 + m].par_iter_mut())
                .zip(counted.targets[t0..t0 + m].par_iter())
                .for_each(|((row, stats), &target)| {
                    vectorized!({ stats.add_block(row, v0, target, smoothing) })
                });
        });
        let (losses, factors): (Vec<f32>, Vec<f32>) = stats
            .iter()
            .map(|s| self.options.row_loss(s, vocab))
            .unzip();
        let lse = stats.iter().map(RowStats::lse).collect();
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((lse, factors));
        // Summed in row order in f64, so that the result does not depend on scheduling.
        let loss: f64 = losses.iter().map(|&l| l as f64).sum();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let Some((lse, factors)) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            candle_core::bail!("{}: backward pass without a forward pass", self.name());
        };
        if !self.hidden_gradient && !self.weight_gradient {
            return Ok((None, None));
        }
        let (rows, features) = crate::linear::rows_and_features(hidden.shape())?;
        let (vocab, _) = weight.dims2()?;
        let counted = CountedRows::new(&self.targets, rows, vocab)?;
        let threshold = self.settings.filter_threshold();
        let precision = self.settings.precision;
        let (grad_x, grad_w) = with_slices(&[hidden, weight], self.name(), |s| {
            let packed = counted.packed(s[0], features);
            let x: &[f32] = &packed;
            let ops = Operands {
                x,
                weight: s[1],
                targets: &counted.targets,
                features,
                vocab,
            };
            let n = counted.rows.len();
            let mut grad_x = self.hidden_gradient.then(|| vec![0f32; n * features]);
            let mut grad_w = self.weight_gradient.then(|| vec![0f32; vocab * features]);
            let options = &self.options;
            self.for_each_tile(&ops, |t0, m, v0, w, tile| {
                tile.par_chunks_mut(w)
                    .zip(counted.targets[t0..t0 + m].par_iter())
                    .zip(lse[t0..t0 + m].par_iter().zip(&factors[t0..t0 + m]))
                    .for_each(|((row, &target), (&lse, &factor))| {
                        vectorized!({
                            options.gradient_in_place(row, v0, vocab, target, lse, factor, scale)
                        })
                    });
                let tile: &[f32] = tile;
                let row_thresholds: Vec<f32> = factors[t0..t0 + m]
                    .iter()
                    .map(|&factor| threshold * (factor * scale).abs())
                    .collect();
                for (c0, c1) in kept_column_runs(tile, w, threshold, &row_thresholds) {
                    let columns = Mat {
                        ptr: tile[c0..].as_ptr(),
                        rs: w as isize,
                        cs: 1,
                    };
                    if let Some(grad_x) = &mut grad_x {
                        // SAFETY: the operands lie inside their buffers; the destination rows
                        // are this tile's.
                        unsafe {
                            par_matmul_in(
                                precision,
                                m,
                                features,
                                c1 - c0,
                                grad_x[t0 * features..].as_mut_ptr(),
                                features,
                                true,
                                columns,
                                Mat::rows(ops.weight[(v0 + c0) * features..].as_ptr(), features),
                                1.0,
                            )
                        };
                    }
                    if let Some(grad_w) = &mut grad_w {
                        // SAFETY: as above; the destination rows are this tile's ids.
                        unsafe {
                            par_matmul_in(
                                precision,
                                c1 - c0,
                                features,
                                m,
                                grad_w[(v0 + c0) * features..].as_mut_ptr(),
                                features,
                                true,
                                columns.t(),
                                Mat::rows(ops.x[t0 * features..].as_ptr(), features),
                                1.0,
                            )
                        };
                    }
                }
            });
            let grad_x = grad_x.map(|g| counted.unpacked(g, rows, features));
            Ok((grad_x, grad_w))
        })?;
        Ok((
            grad_x.map(|g| tensor(g, hidden.dims())).transpose()?,
            grad_w.map(|g| tensor(g, weight.dims())).transpose()?,
        ))
    }
}

/// The runs `[c0, c1)` of columns of a gradient tile (`width` wide) in which some row `r`
/// holds a value of at least `row_thresholds[r]` in size, in blocks of [`FILTER_COLUMNS`]; runs
/// of kept blocks are merged. Each row's threshold is the filter's `threshold` times the factor
/// the row's gradient was scaled by (the incoming gradient, and the target's probability under
/// token scaling), so that, as in the reference implementation, what is compared is the
/// unscaled `softmax − onehot`. A `threshold` of 0 keeps everything.
fn kept_column_runs(
    tile: &[f32],
    width: usize,
    threshold: f32,
    row_thresholds: &[f32],
) -> Vec<(usize, usize)> {
    let blocks = width.div_ceil(FILTER_COLUMNS);
    let kept: Vec<bool> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            if threshold <= 0.0 {
                return true;
            }
            let (c0, c1) = (b * FILTER_COLUMNS, ((b + 1) * FILTER_COLUMNS).min(width));
            row_thresholds.iter().enumerate().any(|(r, &limit)| {
                tile[r * width + c0..r * width + c1]
                    .iter()
                    .any(|g| g.abs() >= limit)
            })
        })
        .collect();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (b, keep) in kept.into_iter().enumerate() {
        if !keep {
            continue;
        }
        let (c0, c1) = (b * FILTER_COLUMNS, ((b + 1) * FILTER_COLUMNS).min(width));
        match runs.last_mut() {
            Some(last) if last.1 == c0 => last.1 = c1,
            _ => runs.push((c0, c1)),
        }
    }
    runs
}
