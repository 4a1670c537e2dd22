//! The matrix product every op of this crate uses, for callers that hold plain slices:
//! row-major or transposed operands, f32 or bf16 ([`Precision`]), on rayon's threads.

use crate::cpu::{par_matmul_in, Mat};
use crate::Precision;

/// How an operand's elements lie in its slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major: element `(i, j)` of an `r × c` operand at `i·c + j`.
    Rows,
    /// The transpose of a row-major matrix: element `(i, j)` at `j·r + i`.
    Transposed,
}

/// `dst[m×n] = a[m×k] · b[k×n]` in `precision`, `dst` row-major.
///
/// # Panics
/// When a slice's length is not its operand's size.
#[allow(clippy::too_many_arguments)]
pub fn product(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    dst: &mut [f32],
) {
    assert_eq!(a.len(), m * k, "a is {m}×{k}");
    assert_eq!(b.len(), k * n, "b is {k}×{n}");
    assert_eq!(dst.len(), m * n, "dst is {m}×{n}");
    let operand = |data: &[f32], rows: usize, cols: usize, layout: Layout| match layout {
        Layout::Rows => Mat::rows(data.as_ptr(), cols),
        Layout::Transposed => Mat::rows(data.as_ptr(), rows).t(),
    };
    let (a, b) = (operand(a, m, k, a_layout), operand(b, k, n, b_layout));
    // SAFETY: the lengths were checked against the sizes, and `dst` is borrowed mutably while
    // `a` and `b` are borrowed shared, so it overlaps neither.
    unsafe { par_matmul_in(precision, m, n, k, dst.as_mut_ptr(), n, false, a, b, 1.0) }
}
