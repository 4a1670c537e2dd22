//! Matrix products with bf16 inputs and f32 accumulation, on CPUs with AVX-512 BF16
//! (`vdpbf16ps`): the operands are rounded to bf16 while they are packed, and every product
//! of a pair of elements is summed in f32. This is what `bf16: true` computes GEMMs with.
//!
//! Layout: `A` is packed in panels of [`MR`] rows and `B` in panels of [`NR`] columns, both
//! with the k dimension interleaved in pairs (the unit `vdpbf16ps` multiplies and adds). The
//! micro-kernel keeps an `MR × NR` tile of `dst` in registers while it walks a block of k.
//!
//! Not yet used by an op: it reaches about the speed of the f32 AVX-512 GEMM (about 210
//! GFLOP/s at 512×576×1536 on 2 cores). The micro-kernel's loop is 16 `vdpbf16ps` on
//! registers with no spills, and packing `B` in parallel changed nothing, so the limit is
//! elsewhere (this CPU's `vdpbf16ps` throughput, or the order in which panels are walked).

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::cpu::{Mat, SharedMut};

/// Rows of `A` per micro-kernel tile.
const MR: usize = 8;
/// Columns of `B` per micro-kernel tile: two registers of 16 f32 lanes.
const NR: usize = 32;
/// Depth of one block of k (an even number).
const KC: usize = 256;
/// Rows of `A` per parallel task.
const MC: usize = 64;

/// Whether this CPU can run the bf16 product.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// Rounds an f32 to bf16 (round to nearest even), as the bits of the bf16.
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Packs rows `i0..i0+rows` and depths `k0..k0+depth` of `a` into `MR`-row panels: for each
/// panel, for each pair of k, `MR` pairs `(a[i][k], a[i][k+1])`. Missing rows and an odd last
/// k are zero.
///
/// # Safety
/// `a` must address the given rows and depths.
unsafe fn pack_a(a: Mat, i0: usize, rows: usize, k0: usize, depth: usize, out: &mut Vec<u16>) {
    let pairs = depth.div_ceil(2);
    let panels = rows.div_ceil(MR);
    out.clear();
    out.resize(panels * pairs * MR * 2, 0);
    for p in 0..panels {
        for pair in 0..pairs {
            for r in 0..MR {
                let i = p * MR + r;
                if i >= rows {
                    continue;
                }
                let at = ((p * pairs + pair) * MR + r) * 2;
                for h in 0..2 {
                    let k = pair * 2 + h;
                    if k < depth {
                        let v = *a
                            .ptr
                            .offset((i0 + i) as isize * a.rs + (k0 + k) as isize * a.cs);
                        out[at + h] = to_bf16(v);
                    }
                }
            }
        }
    }
}

/// Packs depths `k0..k0+depth` and columns `j0..j0+cols` of `b` into `NR`-column panels: for
/// each panel, for each pair of k, `NR` pairs `(b[k][j], b[k+1][j])`. Panels are packed in
/// parallel.
///
/// # Safety
/// `b` must address the given depths and columns.
unsafe fn pack_b(b: Mat, k0: usize, depth: usize, j0: usize, cols: usize, out: &mut Vec<u16>) {
    struct Source(Mat);
    // SAFETY: the source is only read.
    unsafe impl Sync for Source {}
    let source = Source(b);
    let pairs = depth.div_ceil(2);
    let panels = cols.div_ceil(NR);
    out.clear();
    out.resize(panels * pairs * NR * 2, 0);
    let source = &source;
    out.par_chunks_mut(pairs * NR * 2)
        .enumerate()
        .for_each(|(p, panel)| {
            let b = source.0;
            for pair in 0..pairs {
                for h in 0..2 {
                    let k = pair * 2 + h;
                    if k >= depth {
                        continue;
                    }
                    let row = b.ptr.offset((k0 + k) as isize * b.rs);
                    for c in 0..NR.min(cols - p * NR) {
                        let v = *row.offset((j0 + p * NR + c) as isize * b.cs);
                        panel[(pair * NR + c) * 2 + h] = to_bf16(v);
                    }
                }
            }
        });
}

/// `tile[MR × NR] = Σ over pairs of a_panel · b_panel` in f32.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16; the panels must hold `pairs` pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_kernel(a_panel: &[u16], b_panel: &[u16], pairs: usize, tile: &mut [f32; MR * NR]) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for pair in 0..pairs {
        let b = b_panel.as_ptr().add(pair * NR * 2);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(32) as *const __m512i));
        let a = a_panel.as_ptr().add(pair * MR * 2) as *const i32;
        for (r, row) in acc.iter_mut().enumerate() {
            let a_pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r)));
            row[0] = _mm512_dpbf16_ps(row[0], a_pair, b0);
            row[1] = _mm512_dpbf16_ps(row[1], a_pair, b1);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), row[0]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), row[1]);
    }
}

/// `dst[m×n] (+)= scale · a[m×k] · b[k×n]` with bf16 inputs and f32 accumulation, on rayon's
/// threads. `dst` is row-major with rows `dst_rs` apart.
///
/// # Safety
/// [`available`] must be true; `dst`, `a` and `b` must address valid memory for the sizes and
/// strides given, and `dst` must not overlap `a` or `b` nor be used by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_bf16(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) {
    struct Operands(Mat, Mat);
    // SAFETY: the operands are only read.
    unsafe impl Sync for Operands {}
    let operands = Operands(a, b);
    let dst = SharedMut(dst);
    if !accumulate {
        for i in 0..m {
            std::slice::from_raw_parts_mut(dst.at(i * dst_rs), n).fill(0.0);
        }
    }
    let mut packed_b = Vec::new();
    for k0 in (0..k).step_by(KC) {
        let depth = KC.min(k - k0);
        let pairs = depth.div_ceil(2);
        pack_b(operands.1, k0, depth, 0, n, &mut packed_b);
        let packed_b = &packed_b;
        let operands = &operands;
        (0..m.div_ceil(MC)).into_par_iter().for_each(|block| {
            let i0 = block * MC;
            let rows = MC.min(m - i0);
            let mut packed_a = Vec::new();
            pack_a(operands.0, i0, rows, k0, depth, &mut packed_a);
            let mut tile = [0f32; MR * NR];
            for (pi, a_panel) in packed_a.chunks(pairs * MR * 2).enumerate() {
                for (pj, b_panel) in packed_b.chunks(pairs * NR * 2).enumerate() {
                    micro_kernel(a_panel, b_panel, pairs, &mut tile);
                    for r in 0..MR.min(rows - pi * MR) {
                        let i = i0 + pi * MR + r;
                        let cols = NR.min(n - pj * NR);
                        let out =
                            std::slice::from_raw_parts_mut(dst.at(i * dst_rs + pj * NR), cols);
                        for (o, t) in out.iter_mut().zip(&tile[r * NR..r * NR + cols]) {
                            *o += scale * t;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_products_match_f32_to_bf16_precision() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80, "ties round to even");
        for (m, n, k) in [(1, 1, 1), (7, 33, 5), (65, 70, 300), (130, 17, 513)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0)
                .collect();
            let mut dst = vec![1f32; m * n];
            // SAFETY: the buffers have the sizes given.
            unsafe {
                matmul_bf16(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    n,
                    true,
                    Mat::rows(a.as_ptr(), k),
                    Mat::rows(b.as_ptr(), n),
                    0.5,
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                        .sum();
                    let magnitude: f64 = (0..k)
                        .map(|p| (a[i * k + p] as f64 * b[p * n + j] as f64).abs())
                        .sum();
                    let expected = 1.0 + 0.5 * exact;
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - expected).abs() <= 0.5 * magnitude * 1e-2 + 1e-5,
                        "{m}x{n}x{k} at ({i},{j}): {got} vs {expected}"
                    );
                }
            }
        }
    }
}
