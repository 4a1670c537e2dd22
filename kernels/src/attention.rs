//! Causal self-attention, `softmax(scale · q·kᵀ + mask) · v`, computed a block of queries at
//! a time so that the `[len, len]` scores and probabilities never exist whole: the forward
//! pass keeps nothing but its output, and the backward pass recomputes each block's
//! probabilities (the approach of FlashAttention, arXiv 2205.14135, on the CPU).
//!
//! Tensors are in the layout the projections produce, `[batch, len, heads, head_dim]`, so no
//! transposes are needed around the op. Query heads share key/value heads in groups
//! (grouped-query attention). The mask is causal, optionally limited to a sliding window, and
//! for packed rows limited to each query's own sequence; Gemma 2's soft-capping of the scores
//! is supported.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{
    contiguous_f32, exp_shifted_sum, lane_max, matmul, new_block_product, tensor, with_slices, Mat,
    SharedMut,
};
use crate::rope::{self, Tables};
use crate::vectorized;

/// Queries per block: the scores of one block are `BLOCK × keys` floats.
const BLOCK: usize = 64;

/// Which keys each query may attend to: the keys at or before its own position, within its
/// own sequence, and (with a window) within the last `window` positions.
#[derive(Clone, Debug)]
pub struct CausalMask {
    /// Per batch row, the position where the sequence of each query starts; empty when each
    /// row is one sequence.
    sequence_starts: Vec<Vec<u32>>,
    past: usize,
    window: Option<usize>,
}

impl CausalMask {
    /// Plain causal attention for queries at positions `past..`, over keys from position 0 (a
    /// key/value cache holds the first `past`).
    pub fn causal(past: usize, window: Option<usize>) -> Self {
        Self {
            sequence_starts: Vec::new(),
            past,
            window,
        }
    }

    /// Causal attention within each of the sequences packed into the rows: `sequence_ids[b][i]`
    /// names the sequence of position `i` of row `b`; a sequence occupies consecutive
    /// positions.
    pub fn packed(sequence_ids: &[Vec<usize>], window: Option<usize>) -> Self {
        let sequence_starts = sequence_ids
            .iter()
            .map(|row| {
                let mut start = 0u32;
                row.iter()
                    .enumerate()
                    .map(|(i, id)| {
                        if i > 0 && row[i - 1] != *id {
                            start = i as u32;
                        }
                        start
                    })
                    .collect()
            })
            .collect();
        Self {
            sequence_starts,
            past: 0,
            window,
        }
    }

    /// The first and last key (inclusive) that query `i` of batch row `b` sees.
    fn key_range(&self, b: usize, i: usize) -> (usize, usize) {
        let last = self.past + i;
        let mut first = self
            .sequence_starts
            .get(b)
            .map_or(0, |starts| starts[i] as usize);
        if let Some(w) = self.window {
            first = first.max((last + 1).saturating_sub(w));
        }
        (first, last)
    }

    /// The additive mask `[batch, 1, queries, keys]` (0 where visible, −∞ elsewhere) of the
    /// reference composition.
    fn additive(&self, batch: usize, queries: usize, keys: usize) -> Result<Tensor> {
        let mut values = Vec::with_capacity(batch * queries * keys);
        for b in 0..batch {
            for i in 0..queries {
                let (first, last) = self.key_range(b, i);
                values.extend((0..keys).map(|j| {
                    if (first..=last).contains(&j) {
                        0.0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        tensor(values, &[batch, 1, queries, keys])
    }
}

/// How scores are formed: `softcap · tanh(scale · q·k / softcap)` with a soft cap, else
/// `scale · q·k`.
#[derive(Clone, Copy, Debug)]
pub struct Scores {
    /// The factor of `q·k` (usually `1/sqrt(head_dim)`).
    pub scale: f64,
    /// Gemma 2's `attn_logit_softcapping`.
    pub softcap: Option<f64>,
}

/// Causal attention of `q` `[batch, queries, heads, head_dim]` over `k` and `v`
/// `[batch, keys, kv_heads, head_dim]`; returns `[batch, queries, heads, head_dim]`. Query
/// head `h` uses key/value head `h / (heads / kv_heads)`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<CausalMask>,
    scores: Scores,
) -> Result<Tensor> {
    let dims = Dims::of(q, k, v)?;
    if !crate::fused_applies(&[q, k, v]) {
        return reference(q, k, v, mask, scores);
    }
    fused(q, k, v, mask, scores, dims, None)
}

/// [`causal_attention`] of `q` and `k` rotated by [`rope`](crate::rope::rope) with the tables
/// `cos` and `sin`: the op rotates both itself, and recomputes the rotation in the backward
/// pass instead of keeping rotated copies of q and k (a quarter of a layer's activations in
/// the attention block) until then. Queries and keys must be at the same positions (no cache).
pub fn causal_attention_with_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Arc<CausalMask>,
    scores: Scores,
) -> Result<Tensor> {
    let dims = Dims::of(q, k, v)?;
    let rotary = Tables::of(q, cos, sin)?;
    // The same tables must fit k: same rows and positions, any number of heads.
    Tables::of(k, cos, sin)?;
    if !crate::fused_applies(&[q, k, v, cos, sin]) {
        let (q, k) = (rope::reference(q, cos, sin)?, rope::reference(k, cos, sin)?);
        return reference(&q, &k, v, mask, scores);
    }
    fused(q, k, v, mask, scores, dims, Some(rotary))
}

/// The fused op on `q`, `k` and `v`, rotating q and k first by `rotary` if given.
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<CausalMask>,
    scores: Scores,
    dims: Dims,
    rotary: Option<Tables>,
) -> Result<Tensor> {
    let op = FusedAttention {
        mask: mask.clone(),
        scale: scores.scale as f32,
        softcap: scores.softcap.map(|c| c as f32),
        dims,
        rotary,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention composed of differentiable candle primitives.
pub fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CausalMask,
    scores: Scores,
) -> Result<Tensor> {
    let Dims {
        batch,
        queries,
        keys,
        heads,
        kv_heads,
        head_dim,
    } = Dims::of(q, k, v)?;
    let groups = heads / kv_heads;
    let q = q.transpose(1, 2)?.contiguous()?;
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(1, 2)?.contiguous()?;
        t.unsqueeze(2)?
            .expand((batch, kv_heads, groups, keys, head_dim))?
            .reshape((batch, heads, keys, head_dim))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut s = (q.matmul(&k.t()?)? * scores.scale)?;
    if let Some(cap) = scores.softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    let s = s.broadcast_add(&mask.additive(batch, queries, keys)?.to_dtype(s.dtype())?)?;
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (batch, queries, heads, head_dim) = q.dims4()?;
        let (kb, keys, kv_heads, kd) = k.dims4()?;
        if kb != batch || kd != head_dim || v.dims() != k.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!(
                "attention: {heads} query heads cannot share {kv_heads} key/value heads"
            );
        }
        Ok(Self {
            batch,
            queries,
            keys,
            heads,
            kv_heads,
            head_dim,
        })
    }

    fn q_offset(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.queries + i) * self.heads + h) * self.head_dim
    }

    fn kv_offset(&self, b: usize, j: usize, h: usize) -> usize {
        ((b * self.keys + j) * self.kv_heads + h) * self.head_dim
    }

    /// One task per (batch row, query head, block of queries).
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let blocks = self.queries.div_ceil(BLOCK);
        let mut tasks = Vec::with_capacity(self.batch * self.heads * blocks);
        // Later blocks see more keys; starting them first balances the threads.
        for block in (0..blocks).rev() {
            for b in 0..self.batch {
                for h in 0..self.heads {
                    tasks.push((b, h, block));
                }
            }
        }
        tasks
    }
}

struct FusedAttention {
    mask: Arc<CausalMask>,
    scale: f32,
    softcap: Option<f32>,
    dims: Dims,
    /// The rotation the op applies to q and k first, if any.
    rotary: Option<Tables>,
}

/// The probabilities of one block of queries over the keys `first..first + width`.
struct BlockProbs {
    first: usize,
    width: usize,
    rows: usize,
    /// `rows × width`, zero outside each query's visible keys.
    probs: Vec<f32>,
    /// `tanh` of the capped scores (for the backward pass), when soft-capping.
    tanh: Vec<f32>,
}

impl FusedAttention {
    fn key_span(&self, b: usize, i0: usize, i1: usize) -> (usize, usize) {
        let mut first = usize::MAX;
        let mut last = 0;
        for i in i0..i1 {
            let (f, l) = self.mask.key_range(b, i);
            first = first.min(f);
            last = last.max(l);
        }
        let last = last.min(self.dims.keys - 1);
        (first.min(last), last)
    }

    /// Scores, mask and softmax of queries `i0..i1` of head `h` in row `b`.
    fn block_probs(
        &self,
        q: &[f32],
        k: &[f32],
        b: usize,
        h: usize,
        i0: usize,
        i1: usize,
    ) -> BlockProbs {
        let d = &self.dims;
        let kv_head = h / (d.heads / d.kv_heads);
        let rows = i1 - i0;
        let (first, last) = self.key_span(b, i0, i1);
        let width = last + 1 - first;
        // SAFETY: the query rows i0..i1 of head h and the key rows first..=last of kv_head lie
        // inside q and k (strides heads·head_dim and kv_heads·head_dim).
        let mut probs = unsafe {
            new_block_product(
                rows,
                width,
                d.head_dim,
                Mat::rows(q.as_ptr().add(d.q_offset(b, i0, h)), d.heads * d.head_dim),
                Mat::rows(
                    k.as_ptr().add(d.kv_offset(b, first, kv_head)),
                    d.kv_heads * d.head_dim,
                )
                .t(),
                self.scale,
            )
        };
        let mut tanh = Vec::new();
        if let Some(cap) = self.softcap {
            tanh.reserve(probs.len());
            for s in probs.iter_mut() {
                let t = (*s / cap).tanh();
                tanh.push(t);
                *s = cap * t;
            }
        }
        vectorized!({
            for (r, row) in probs.chunks_mut(width).enumerate() {
                let (lo, hi) = self.mask.key_range(b, i0 + r);
                let (lo, hi) = (lo - first, hi.min(last) - first);
                let visible = &mut row[lo..=hi];
                let max = lane_max(visible);
                let inv = 1.0 / exp_shifted_sum(visible, max);
                for s in visible.iter_mut() {
                    *s *= inv;
                }
                row[..lo].fill(0.0);
                row[hi + 1..].fill(0.0);
            }
        });
        BlockProbs {
            first,
            width,
            rows,
            probs,
            tanh,
        }
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let d = self.dims;
        let mut out = vec![0f32; d.batch * d.queries * d.heads * d.head_dim];
        let out_ptr = SharedMut(out.as_mut_ptr());
        d.tasks().into_par_iter().for_each(|(b, h, block)| {
            let i0 = block * BLOCK;
            let i1 = (i0 + BLOCK).min(d.queries);
            let p = self.block_probs(q, k, b, h, i0, i1);
            let kv_head = h / (d.heads / d.kv_heads);
            // SAFETY: this task alone writes the output rows i0..i1 of head h in row b; the
            // value rows first..first+width of kv_head lie inside v.
            unsafe {
                matmul(
                    p.rows,
                    d.head_dim,
                    p.width,
                    out_ptr.at(d.q_offset(b, i0, h)),
                    d.heads * d.head_dim,
                    false,
                    Mat::rows(p.probs.as_ptr(), p.width),
                    Mat::rows(
                        v.as_ptr().add(d.kv_offset(b, p.first, kv_head)),
                        d.kv_heads * d.head_dim,
                    ),
                    1.0,
                );
            }
        });
        out
    }

    /// Gradients of q, k and v given the output `o` and its gradient `dout`.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let hd = d.head_dim;
        let mut dq = vec![0f32; q.len()];
        let dq_ptr = SharedMut(dq.as_mut_ptr());
        // Key and value gradients of each (row, kv head), `keys × head_dim`, summed over the
        // query heads and blocks that read them.
        let mut kv_grads: Vec<(Vec<f32>, Vec<f32>)> = (0..d.batch * d.kv_heads)
            .map(|_| (vec![0f32; d.keys * hd], vec![0f32; d.keys * hd]))
            .collect();
        // Each task returns its share of the key and value gradients; they are summed below in
        // task order, so that the result does not depend on scheduling.
        let partials: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = d
            .tasks()
            .into_par_iter()
            .map(|(b, h, block)| {
                let i0 = block * BLOCK;
                let i1 = (i0 + BLOCK).min(d.queries);
                let kv_head = h / (d.heads / d.kv_heads);
                let BlockProbs {
                    first,
                    width,
                    rows,
                    probs,
                    tanh,
                } = self.block_probs(q, k, b, h, i0, i1);
                let q_rows = d.heads * hd;
                let kv_rows = d.kv_heads * hd;
                let q_blk = Mat::rows(q[d.q_offset(b, i0, h)..].as_ptr(), q_rows);
                let do_blk = Mat::rows(dout[d.q_offset(b, i0, h)..].as_ptr(), q_rows);
                let k_span = Mat::rows(k[d.kv_offset(b, first, kv_head)..].as_ptr(), kv_rows);
                let v_span = Mat::rows(v[d.kv_offset(b, first, kv_head)..].as_ptr(), kv_rows);
                // dP = dO · Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O)), through the soft cap.
                // SAFETY: all operands lie inside their buffers (see block_probs).
                let mut grad =
                    unsafe { new_block_product(rows, width, hd, do_blk, v_span.t(), 1.0) };
                vectorized!({
                    for r in 0..rows {
                        let at = d.q_offset(b, i0 + r, h);
                        let dot: f32 = dout[at..at + hd]
                            .iter()
                            .zip(&o[at..at + hd])
                            .map(|(a, b)| a * b)
                            .sum();
                        let row = r * width..(r + 1) * width;
                        for (g, p) in grad[row.clone()].iter_mut().zip(&probs[row.clone()]) {
                            *g = p * (*g - dot);
                        }
                        if !tanh.is_empty() {
                            for (g, t) in grad[row.clone()].iter_mut().zip(&tanh[row]) {
                                *g *= 1.0 - t * t;
                            }
                        }
                    }
                });
                let grad_m = Mat::rows(grad.as_ptr(), width);
                // SAFETY: this task alone writes the dq rows i0..i1 of head h; the operands lie
                // inside their buffers.
                let (dk, dv) = unsafe {
                    matmul(
                        rows,
                        hd,
                        width,
                        dq_ptr.at(d.q_offset(b, i0, h)),
                        q_rows,
                        false,
                        grad_m,
                        k_span,
                        self.scale,
                    );
                    (
                        new_block_product(width, hd, rows, grad_m.t(), q_blk, self.scale),
                        new_block_product(
                            width,
                            hd,
                            rows,
                            Mat::rows(probs.as_ptr(), width).t(),
                            do_blk,
                            1.0,
                        ),
                    )
                };
                (b * d.kv_heads + kv_head, first, dk, dv)
            })
            .collect();
        for (index, first, dk, dv) in partials {
            let acc = &mut kv_grads[index];
            let span = first * hd..first * hd + dk.len();
            for (a, g) in acc.0[span.clone()].iter_mut().zip(&dk) {
                *a += g;
            }
            for (a, g) in acc.1[span].iter_mut().zip(&dv) {
                *a += g;
            }
        }
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        for (index, grads) in kv_grads.into_iter().enumerate() {
            let (b, kv_head) = (index / d.kv_heads, index % d.kv_heads);
            let (gk, gv) = grads;
            for j in 0..d.keys {
                let at = d.kv_offset(b, j, kv_head);
                dk[at..at + hd].copy_from_slice(&gk[j * hd..(j + 1) * hd]);
                dv[at..at + hd].copy_from_slice(&gv[j * hd..(j + 1) * hd]);
            }
        }
        (dq, dk, dv)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (q, k) = (
            contiguous_f32(q, q_layout, name)?,
            contiguous_f32(k, k_layout, name)?,
        );
        let v = contiguous_f32(v, v_layout, name)?;
        let out = match &self.rotary {
            Some(tables) => self.forward(
                &tables.rotate(q, q_layout.shape(), false)?,
                &tables.rotate(k, k_layout.shape(), false)?,
                v,
            ),
            None => self.forward(q, k, v),
        };
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = with_slices(&[q, k, v, out, grad], self.name(), |s| {
            let Some(tables) = &self.rotary else {
                return Ok(self.backward(s[0], s[1], s[2], s[3], s[4]));
            };
            let q_rotated = tables.rotate(s[0], q.shape(), false)?;
            let k_rotated = tables.rotate(s[1], k.shape(), false)?;
            let (dq, dk, dv) = self.backward(&q_rotated, &k_rotated, s[2], s[3], s[4]);
            Ok((
                tables.rotate(&dq, q.shape(), true)?,
                tables.rotate(&dk, k.shape(), true)?,
                dv,
            ))
        })?;
        Ok((
            Some(tensor(dq, q.dims())?),
            Some(tensor(dk, k.dims())?),
            Some(tensor(dv, v.dims())?),
        ))
    }
}
