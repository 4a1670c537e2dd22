//! axl's own blocked matrix product for x86-64 CPUs with AVX-512, and its bf16 kernel
//! ([`bf16`]: bf16 inputs, f32 sums), chosen at run time by the CPU's features. f32 products
//! stay with the `gemm` crate, whose run-time-selected kernels reach about 85 % of this class
//! of CPU's f32 peak (an AVX-512 f32 kernel on this driver measured the same, not faster).
//!
//! The product is cut into chunks of at most [`CHUNK`] rows × [`CHUNK`] columns, and k into
//! equal blocks no deeper than the kernel's `KC`. For each block, `A`'s rows are packed into
//! panels of `MR` rows and `B`'s columns into panels of `NR` columns, k-major, so that the
//! micro-kernel reads both as consecutive vectors whatever the operands' layout (row-major or
//! transposed: the backward pass has both). Tasks of `MC` rows × `NC` columns run on rayon's
//! threads; within one, each `A` panel stays in L1 while the task's `B` panels pass by from L2,
//! and the micro-kernel keeps an `MR × NR` tile of the result in registers while it walks the
//! block.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::cpu::{Mat, SharedMut};

pub(crate) mod bf16;

/// The largest number of rows or columns packed at once: packed operands stay a few MiB even
/// for the language-model head's 49152 rows or columns.
const CHUNK: usize = 2048;

/// A micro-kernel and the layout of the panels it reads.
pub(crate) trait Kernel {
    /// A packed element: one f32, or a pair of bf16 in a `u32`.
    type Unit: Copy + Send + Sync;
    /// k values per packed unit.
    const K_PER_UNIT: usize;
    /// Rows of `A` per panel and per tile.
    const MR: usize;
    /// Columns of `B` per panel and per tile.
    const NR: usize;
    /// The deepest block of k.
    const KC: usize;
    /// Rows per parallel task, a multiple of `MR`.
    const MC: usize;
    /// Columns per parallel task, a multiple of `NR`.
    const NC: usize;

    /// Packs `lines × depth` elements of a matrix, addressed as `src[line·ls + k·ks]`, into
    /// panels of `width` lines, k-major: unit `u` of line `l` goes to
    /// `out[(l / width · units + u) · width + l % width]`, where `units` is `depth` in units.
    /// Missing lines and k values are zero.
    ///
    /// # Safety
    /// The CPU must have the kernel's features; `ls` or `ks` must be 1; `src` must address
    /// every element named, and `out` must hold `lines.div_ceil(width) · units · width` units.
    unsafe fn pack(
        src: *const f32,
        ls: isize,
        ks: isize,
        lines: usize,
        depth: usize,
        width: usize,
        out: *mut Self::Unit,
    );

    /// `dst[rows × cols] (+)= scale · a_panel · b_panel` over `units` units of k: added to
    /// `dst` with `add`, stored otherwise.
    ///
    /// # Safety
    /// The CPU must have the kernel's features; the panels must hold `units` units; `dst` must
    /// address `rows ≤ MR` rows of `cols ≤ NR` elements, `dst_rs` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a_panel: *const Self::Unit,
        b_panel: *const Self::Unit,
        units: usize,
        dst: *mut f32,
        dst_rs: usize,
        rows: usize,
        cols: usize,
        scale: f32,
        add: bool,
    );
}

/// A buffer of `len` units on a 64-byte boundary (a cache line; `B`'s panel rows are whole
/// vectors), left uninitialized: packing writes every unit that is read.
struct Packed<U> {
    lines: Vec<std::mem::MaybeUninit<CacheLine>>,
    _unit: std::marker::PhantomData<U>,
}

/// 64 bytes on a 64-byte boundary.
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

impl<U> Packed<U> {
    fn new(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<U>();
        let mut lines = Vec::with_capacity(bytes.div_ceil(64));
        // SAFETY: the elements are `MaybeUninit`; every unit read was written by `pack` first.
        unsafe { lines.set_len(bytes.div_ceil(64)) };
        Self {
            lines,
            _unit: std::marker::PhantomData,
        }
    }

    fn ptr(&mut self) -> *mut U {
        self.lines.as_mut_ptr().cast()
    }
}

/// `dst[m×n] (+)= scale · a[m×k] · b[k×n]` through kernel `K` on rayon's threads. `dst` is
/// row-major with rows `dst_rs` apart; with `accumulate` the product is added to it.
///
/// # Safety
/// The CPU must have `K`'s features; `m`, `n` and `k` must not be 0; `dst`, `a` and `b` must
/// address valid memory for the sizes and strides given, and `dst` must not overlap `a` or `b`
/// nor be used by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<K: Kernel>(
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
    let depth_blocks = k.div_ceil(K::KC);
    let kc = k.div_ceil(depth_blocks).next_multiple_of(K::K_PER_UNIT);
    let max_units = kc / K::K_PER_UNIT;
    let (rows_max, cols_max) = (m.min(CHUNK), n.min(CHUNK));
    let mut packed_a = Packed::<K::Unit>::new(rows_max.div_ceil(K::MR) * max_units * K::MR);
    let mut packed_b = Packed::<K::Unit>::new(cols_max.div_ceil(K::NR) * max_units * K::NR);
    let (packed_a, packed_b) = (SharedUnits(packed_a.ptr()), SharedUnits(packed_b.ptr()));
    let dst = SharedMut(dst);
    // A's packed rows serve every chunk of columns of their block of k; only B's are packed
    // again for each chunk of rows.
    for i0 in (0..m).step_by(CHUNK) {
        let rows = CHUNK.min(m - i0);
        for k0 in (0..k).step_by(kc) {
            let depth = kc.min(k - k0);
            let units = depth.div_ceil(K::K_PER_UNIT);
            let add = accumulate || k0 > 0;
            // A's rows and B's columns are the lines the panels are made of.
            let a_lines = Mat {
                ptr: a.ptr.offset(i0 as isize * a.rs + k0 as isize * a.cs),
                ..a
            };
            for j0 in (0..n).step_by(CHUNK) {
                let cols = CHUNK.min(n - j0);
                let b_lines = Mat {
                    ptr: b.ptr.offset(k0 as isize * b.rs + j0 as isize * b.cs),
                    ..b
                }
                .t();
                let pack_b = || pack_in_parallel::<K>(b_lines, cols, depth, K::NR, packed_b);
                if j0 == 0 {
                    // Both operands at once: small panels keep both threads busy together.
                    rayon::join(
                        || pack_in_parallel::<K>(a_lines, rows, depth, K::MR, packed_a),
                        pack_b,
                    );
                } else {
                    pack_b();
                }
                let dst = SharedMut(dst.at(i0 * dst_rs + j0));
                multiply_block::<K>(
                    rows, cols, units, packed_a, packed_b, dst, dst_rs, scale, add,
                );
            }
        }
    }
}

/// A packed buffer that parallel tasks fill or read in disjoint or read-only parts.
struct SharedUnits<U>(*mut U);

impl<U> SharedUnits<U> {
    /// The address `offset` units in.
    ///
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut U {
        self.0.add(offset)
    }
}

impl<U> Clone for SharedUnits<U> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<U> Copy for SharedUnits<U> {}
// SAFETY: tasks write disjoint panels while packing, and only read afterwards.
unsafe impl<U> Send for SharedUnits<U> {}
// SAFETY: as above.
unsafe impl<U> Sync for SharedUnits<U> {}

/// [`Kernel::pack`] of the lines of `src` (line stride `rs`, k stride `cs`), four panels per
/// task.
///
/// # Safety
/// As for [`Kernel::pack`], with `out` holding every panel.
unsafe fn pack_in_parallel<K: Kernel>(
    src: Mat,
    lines: usize,
    depth: usize,
    width: usize,
    out: SharedUnits<K::Unit>,
) {
    let panel_len = depth.div_ceil(K::K_PER_UNIT) * width;
    let group = 4 * width;
    (0..lines.div_ceil(group)).into_par_iter().for_each(|task| {
        let (src, first) = (src, task * group);
        let start = src.ptr.offset(first as isize * src.rs);
        let group_lines = group.min(lines - first);
        let out = out.at(task * 4 * panel_len);
        K::pack(start, src.rs, src.cs, group_lines, depth, width, out);
    });
}

/// The tiles of one packed block, as parallel tasks of `K::MC × K::NC`.
///
/// # Safety
/// The packed buffers must hold `rows` and `cols` lines of `units` units; `dst` must address a
/// `rows × cols` block with rows `dst_rs` apart that nobody else uses meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_block<K: Kernel>(
    rows: usize,
    cols: usize,
    units: usize,
    packed_a: SharedUnits<K::Unit>,
    packed_b: SharedUnits<K::Unit>,
    dst: SharedMut,
    dst_rs: usize,
    scale: f32,
    add: bool,
) {
    let (a_panels, b_panels) = (rows.div_ceil(K::MR), cols.div_ceil(K::NR));
    let (row_tasks, col_tasks) = (rows.div_ceil(K::MC), cols.div_ceil(K::NC));
    let (a_len, b_len) = (units * K::MR, units * K::NR);
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        // Consecutive tasks share their columns, so their B panels are still in L2.
        let (row_task, col_task) = (task % row_tasks, task / row_tasks);
        let a_range = row_task * K::MC / K::MR..((row_task + 1) * K::MC / K::MR).min(a_panels);
        let b_range = col_task * K::NC / K::NR..((col_task + 1) * K::NC / K::NR).min(b_panels);
        for pi in a_range {
            let a_panel = packed_a.at(pi * a_len);
            let tile_rows = K::MR.min(rows - pi * K::MR);
            for pj in b_range.clone() {
                K::tile(
                    a_panel,
                    packed_b.at(pj * b_len),
                    units,
                    dst.at(pi * K::MR * dst_rs + pj * K::NR),
                    dst_rs,
                    tile_rows,
                    K::NR.min(cols - pj * K::NR),
                    scale,
                    add,
                );
            }
        }
    });
}

/// Lanes `0..n` of 16.
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Writes an `rows × cols` tile of sums, two vectors of 16 lanes per row, to `dst`:
/// `dst = scale · sum`, or `dst += scale · sum` with `add`.
///
/// # Safety
/// The CPU must have AVX-512 F; `dst` must address `rows` rows of `cols ≤ 32` elements,
/// `dst_rs` apart.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile(
    sums: &[[__m512; 2]],
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    add: bool,
) {
    let scale = _mm512_set1_ps(scale);
    let lanes = [first_lanes(cols), first_lanes(cols.saturating_sub(16))];
    for (r, row) in sums.iter().enumerate().take(rows) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `dst (+)= 0.5 · a·b` through kernel `K` against the same in f64, for every layout of
    /// the operands and sizes around the tile, task and chunk sizes; each element within
    /// `tolerance` of the sum of its terms' magnitudes.
    fn products_match_f64<K: Kernel>(tolerance: f64) {
        for (m, n, k) in [
            (1, 1, 1),
            (7, 33, 5),
            (65, 70, 300),
            (130, 17, 513),
            (9, 300, 700),
            (2100, 40, 20),
            (25, 2049, 33),
            (3, 2050, 1100),
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
                unsafe { matmul::<K>(m, n, k, dst.as_mut_ptr(), n, accumulate, a, b, 0.5) };
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
                            (got - expected).abs() <= 0.5 * magnitude * tolerance + 1e-5,
                            "{m}x{n}x{k} (transposed {a_transposed}, {b_transposed}) at \
                             ({i},{j}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_products_match_f64_to_bf16_precision() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        products_match_f64::<bf16::Bf16>(2f64.powi(-7));
    }
}
