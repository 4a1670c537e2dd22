//! Matrix products with bf16 inputs and f32 accumulation on CPUs with AVX-512 BF16: what the
//! linear layers compute with under [`Precision::Bf16`](crate::Precision::Bf16). The operands
//! are rounded to bf16 (to nearest even, by `vcvtne2ps2bf16`) while they are packed, and
//! `vdpbf16ps` sums every product of a pair of elements in f32, so only the inputs lose
//! precision, as under `torch.autocast(bfloat16)` on a CPU.
//!
//! Layout: for each block of k, `A` is packed in panels of [`MR`] rows and `B` in panels of
//! [`NR`] columns, both with k interleaved in pairs (the unit `vdpbf16ps` multiplies and adds).
//! The micro-kernel keeps an `MR × NR` tile of the result in 16 registers while it walks the
//! block, then adds it to `dst`. Tiles of [`MC`] rows × [`NC`] columns are rayon's tasks; within
//! one, a `B` panel (`KC/2 × NR` pairs, 20 KiB) stays in L1 while the `A` panels pass by.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::cpu::{Mat, SharedMut};

/// Rows of `A` per micro-kernel tile.
const MR: usize = 8;
/// Columns of `B` per micro-kernel tile: two registers of 16 f32 lanes.
const NR: usize = 32;
/// The largest block of k; k is split into equal even blocks no deeper than this.
const KC: usize = 320;
/// Rows per parallel task.
const MC: usize = 64;
/// Columns per parallel task.
const NC: usize = 256;

/// Whether this CPU can run the bf16 product.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// Lanes `0..n` of 16.
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Packs `lines × depth` elements of a matrix, addressed as `src[line·ls + k·ks]`, into panels
/// of `width` lines: `out[(panel·pairs + k/2)·width + line % width]` is the pair
/// `(k, k+1)` of the line as two bf16 in one `u32`. Missing lines and an odd last k are zero.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `ls` or `ks` must be 1; `src` must address every
/// element named, and `out` must hold `lines.div_ceil(width) · depth.div_ceil(2) · width` pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack(
    src: *const f32,
    ls: isize,
    ks: isize,
    lines: usize,
    depth: usize,
    width: usize,
    out: &mut [u32],
) {
    let pairs = depth.div_ceil(2);
    let panels = lines.div_ceil(width);
    if ls == 1 {
        // Adjacent lines: convert 16 lines of k and of k+1 at once, then interleave them.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for panel in 0..panels {
            let panel_lines = width.min(lines - panel * width);
            for pair in 0..pairs {
                let k = 2 * pair;
                let at = out.as_mut_ptr().add((panel * pairs + pair) * width);
                for c in (0..width).step_by(16) {
                    let present = first_lanes(panel_lines.saturating_sub(c));
                    let first = src.offset(k as isize * ks + (panel * width + c) as isize);
                    let even = _mm512_maskz_loadu_ps(present, first);
                    let odd = if k + 1 < depth {
                        _mm512_maskz_loadu_ps(present, first.offset(ks))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
                    let pairs16 = _mm512_permutexvar_epi16(interleave, halves);
                    _mm512_mask_storeu_epi32(
                        at.add(c) as *mut i32,
                        first_lanes(width - c),
                        pairs16,
                    );
                }
            }
        }
    } else {
        debug_assert_eq!(ks, 1, "operands are row-major or transposed");
        // Each line's k values adjacent: 16 lines × 16 pairs at a time, converted, then
        // transposed in registers so that each pair's lines are stored together.
        let group = width.min(16);
        for panel in 0..panels {
            let panel_lines = width.min(lines - panel * width);
            let panel_out = out.as_mut_ptr().add(panel * pairs * width);
            for g in (0..width).step_by(group) {
                let present = panel_lines.saturating_sub(g).min(group);
                for k in (0..depth).step_by(32) {
                    let left = depth - k;
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (l, row) in rows.iter_mut().enumerate().take(present) {
                        let start = src.offset((panel * width + g + l) as isize * ls + k as isize);
                        let low = _mm512_maskz_loadu_ps(first_lanes(left), start);
                        let high = _mm512_maskz_loadu_ps(
                            first_lanes(left.saturating_sub(16)),
                            start.add(16),
                        );
                        *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                            high, low,
                        ));
                    }
                    let first_pair = k / 2;
                    let columns = transpose(rows);
                    for (i, column) in columns.iter().enumerate().take(pairs - first_pair) {
                        let at = panel_out.add((first_pair + i) * width + g);
                        _mm512_mask_storeu_epi32(at as *mut i32, first_lanes(group), *column);
                    }
                }
            }
        }
    }
}

/// The transpose of a 16 × 16 matrix of 32-bit elements, one row per register.
#[target_feature(enable = "avx512f")]
fn transpose(rows: [__m512i; 16]) -> [__m512i; 16] {
    // Pairs of rows interleaved by element, then by pairs of elements: afterwards register
    // 4q + j holds, in each 128-bit lane L, element 4L + j of rows 4q..4q+4.
    let mut by_two = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        by_two[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        by_two[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    let mut by_four = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let (low, high) = (by_two[4 * q], by_two[4 * q + 1]);
        let (low2, high2) = (by_two[4 * q + 2], by_two[4 * q + 3]);
        by_four[4 * q] = _mm512_unpacklo_epi64(low, low2);
        by_four[4 * q + 1] = _mm512_unpackhi_epi64(low, low2);
        by_four[4 * q + 2] = _mm512_unpacklo_epi64(high, high2);
        by_four[4 * q + 3] = _mm512_unpackhi_epi64(high, high2);
    }
    // Then whole 128-bit lanes: lanes 0 and 2, or 1 and 3, of two registers.
    let mut columns = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let even_lanes_top = _mm512_shuffle_i32x4::<0x88>(by_four[j], by_four[4 + j]);
        let odd_lanes_top = _mm512_shuffle_i32x4::<0xdd>(by_four[j], by_four[4 + j]);
        let even_lanes_bottom = _mm512_shuffle_i32x4::<0x88>(by_four[8 + j], by_four[12 + j]);
        let odd_lanes_bottom = _mm512_shuffle_i32x4::<0xdd>(by_four[8 + j], by_four[12 + j]);
        columns[j] = _mm512_shuffle_i32x4::<0x88>(even_lanes_top, even_lanes_bottom);
        columns[j + 8] = _mm512_shuffle_i32x4::<0xdd>(even_lanes_top, even_lanes_bottom);
        columns[j + 4] = _mm512_shuffle_i32x4::<0x88>(odd_lanes_top, odd_lanes_bottom);
        columns[j + 12] = _mm512_shuffle_i32x4::<0xdd>(odd_lanes_top, odd_lanes_bottom);
    }
    columns
}

/// [`pack`] of the lines of `src` (line stride `rs`, k stride `cs`), four panels per task.
///
/// # Safety
/// As for [`pack`].
unsafe fn pack_in_parallel(src: Mat, lines: usize, depth: usize, width: usize, out: &mut [u32]) {
    let panel_len = depth.div_ceil(2) * width;
    out.par_chunks_mut(4 * panel_len)
        .enumerate()
        .for_each(|(task, out)| {
            let (src, first) = (src, task * 4 * width);
            let start = src.ptr.offset(first as isize * src.rs);
            let lines = (4 * width).min(lines - first);
            pack(start, src.rs, src.cs, lines, depth, width, out);
        });
}

/// `dst[rows × cols] (+)= scale · a_panel · b_panel` over `pairs` pairs of k: the product is
/// added to `dst` with `add`, stored otherwise.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; the panels must hold `pairs` pairs; `dst` must
/// address `rows ≤ MR` rows of `cols ≤ NR` elements, `dst_rs` apart.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel(
    a_panel: *const u32,
    b_panel: *const u32,
    pairs: usize,
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for pair in 0..pairs {
        let b = b_panel.add(pair * NR) as *const __m512i;
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(1)));
        let a = a_panel.add(pair * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let a_pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], a_pair, b0);
            row[1] = _mm512_dpbf16_ps(row[1], a_pair, b1);
        }
    }
    let scale = _mm512_set1_ps(scale);
    let lanes = [first_lanes(cols), first_lanes(cols.saturating_sub(16))];
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (half, (&sum, &lanes)) in row.iter().zip(&lanes).enumerate() {
            let at = dst.add(r * dst_rs + 16 * half);
            let value = if add {
                _mm512_fmadd_ps(sum, scale, _mm512_maskz_loadu_ps(lanes, at))
            } else {
                _mm512_mul_ps(sum, scale)
            };
            _mm512_mask_storeu_ps(at, lanes, value);
        }
    }
}

/// `dst[m×n] (+)= scale · a[m×k] · b[k×n]` with bf16 inputs and f32 accumulation, on rayon's
/// threads. `dst` is row-major with rows `dst_rs` apart; with `accumulate` the product is
/// added to it.
///
/// # Safety
/// [`available`] must be true; `m`, `n` and `k` must not be 0; `dst`, `a` and `b` must address
/// valid memory for the sizes and strides given, and `dst` must not overlap `a` or `b` nor be used by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
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
    debug_assert!(m > 0 && n > 0 && k > 0, "empty products are the caller's");
    let dst = SharedMut(dst);
    let depth_blocks = k.div_ceil(KC);
    let kc = k.div_ceil(depth_blocks).next_multiple_of(2);
    let (a_panels, b_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (row_tasks, col_tasks) = (m.div_ceil(MC), n.div_ceil(NC));
    let mut packed_a = vec![0u32; a_panels * kc / 2 * MR];
    let mut packed_b = vec![0u32; b_panels * kc / 2 * NR];
    for k0 in (0..k).step_by(kc) {
        let depth = kc.min(k - k0);
        let pairs = depth.div_ceil(2);
        let (a_len, b_len) = (pairs * MR, pairs * NR);
        // A's rows and B's columns are the lines the panels are made of.
        let a_lines = Mat {
            ptr: a.ptr.offset(k0 as isize * a.cs),
            ..a
        };
        let b_lines = Mat {
            ptr: b.ptr.offset(k0 as isize * b.rs),
            ..b
        }
        .t();
        rayon::join(
            || pack_in_parallel(a_lines, m, depth, MR, &mut packed_a[..a_panels * a_len]),
            || pack_in_parallel(b_lines, n, depth, NR, &mut packed_b[..b_panels * b_len]),
        );
        let (packed_a, packed_b) = (&packed_a, &packed_b);
        let add = accumulate || k0 > 0;
        (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
            // Consecutive tasks share their columns, so their B panels are still in cache.
            let (row_task, col_task) = (task % row_tasks, task / row_tasks);
            let a_range = row_task * MC / MR..((row_task + 1) * MC / MR).min(a_panels);
            let b_range = col_task * NC / NR..((col_task + 1) * NC / NR).min(b_panels);
            for pj in b_range {
                let b_panel = packed_b.as_ptr().add(pj * b_len);
                let cols = NR.min(n - pj * NR);
                for pi in a_range.clone() {
                    micro_kernel(
                        packed_a.as_ptr().add(pi * a_len),
                        b_panel,
                        pairs,
                        dst.at(pi * MR * dst_rs + pj * NR),
                        dst_rs,
                        MR.min(m - pi * MR),
                        cols,
                        scale,
                        add,
                    );
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dst (+)= 0.5 · a·b` in bf16 against the same in f64, for every layout of the operands.
    #[test]
    fn bf16_products_match_f64_to_bf16_precision() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (7, 33, 5),
            (65, 70, 300),
            (130, 17, 513),
            (9, 300, 700),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0)
                .collect();
            for (a_transposed, b_transposed, accumulate) in [
                (false, false, true),
                (false, true, false),
                (true, false, true),
                (true, true, false),
            ] {
                let a = if a_transposed {
                    Mat::rows(a.as_ptr(), m).t()
                } else {
                    Mat::rows(a.as_ptr(), k)
                };
                let b = if b_transposed {
                    Mat::rows(b.as_ptr(), k).t()
                } else {
                    Mat::rows(b.as_ptr(), n)
                };
                let mut dst = vec![1f32; m * n];
                // SAFETY: the operands address m×k and k×n elements; dst is m×n.
                unsafe { matmul(m, n, k, dst.as_mut_ptr(), n, accumulate, a, b, 0.5) };
                // SAFETY: as above.
                let at = |x: Mat, i: usize, j: usize| unsafe {
                    *x.ptr.offset(i as isize * x.rs + j as isize * x.cs) as f64
                };
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|p| at(a, i, p) * at(b, p, j));
                        let exact: f64 = terms.clone().sum();
                        let magnitude: f64 = terms.map(f64::abs).sum();
                        let expected = if accumulate { 1.0 } else { 0.0 } + 0.5 * exact;
                        let got = dst[i * n + j] as f64;
                        assert!(
                            (got - expected).abs() <= 0.5 * magnitude * 2f64.powi(-7) + 1e-5,
                            "{m}x{n}x{k} (transposed {a_transposed}, {b_transposed}) at \
                             ({i},{j}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}
