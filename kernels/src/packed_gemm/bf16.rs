//! Matrix products with bf16 inputs and f32 accumulation on CPUs with AVX-512 BF16: what the
//! linear layers compute with under [`Precision::Bf16`](crate::Precision::Bf16). The operands
//! are rounded to bf16 (to nearest even, by `vcvtne2ps2bf16`) while they are packed, and
//! `vdpbf16ps` sums every product of a pair of elements in f32, so only the inputs lose
//! precision, as under `torch.autocast(bfloat16)` on a CPU.
//!
//! The operands are packed with k interleaved in pairs, the unit `vdpbf16ps` multiplies and
//! adds; the micro-kernel keeps an [`MR`] × [`NR`] tile of the result in 24 registers.

use std::arch::x86_64::*;

use super::{first_lanes, store_tile, transpose, Kernel};

/// Rows of `A` per micro-kernel tile.
const MR: usize = 12;
/// Columns of `B` per micro-kernel tile: two registers of 16 f32 lanes.
const NR: usize = 32;

/// Whether this CPU can run the bf16 product.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// The bf16 kernel of [`super::matmul`].
pub(crate) struct Bf16;

impl Kernel for Bf16 {
    type Unit = u32;
    const K_PER_UNIT: usize = 2;
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 512;
    const MC: usize = 96;
    const NC: usize = 256;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack(
        src: *const f32,
        ls: isize,
        ks: isize,
        lines: usize,
        depth: usize,
        width: usize,
        out: *mut u32,
    ) {
        let pairs = depth.div_ceil(2);
        let panels = lines.div_ceil(width);
        if ls == 1 {
            // Adjacent lines: convert 16 lines of k and of k+1 at once, then interleave them.
            let interleave = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for panel in 0..panels {
                let panel_lines = width.min(lines - panel * width);
                for pair in 0..pairs {
                    let k = 2 * pair;
                    let at = out.add((panel * pairs + pair) * width);
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
                let panel_out = out.add(panel * pairs * width);
                for g in (0..width).step_by(group) {
                    let present = panel_lines.saturating_sub(g).min(group);
                    for k in (0..depth).step_by(32) {
                        let left = depth - k;
                        let mut rows = [_mm512_setzero_si512(); 16];
                        for (l, row) in rows.iter_mut().enumerate().take(present) {
                            let start =
                                src.offset((panel * width + g + l) as isize * ls + k as isize);
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

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a_panel: *const u32,
        b_panel: *const u32,
        units: usize,
        dst: *mut f32,
        dst_rs: usize,
        rows: usize,
        cols: usize,
        scale: f32,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for pair in 0..units {
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
        store_tile(&acc, dst, dst_rs, rows, cols, scale, add);
    }
}
