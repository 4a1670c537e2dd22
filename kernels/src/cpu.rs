//! What the CPU kernels share: borrowing tensors as f32 slices, a strided matrix product, and
//! a pointer that parallel tasks may write disjoint parts through.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use crate::Precision;

/// The f32 elements of a contiguous CPU operand.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 input");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&data[start..end])
}

/// Calls `f` with the f32 elements of each tensor, in order (each made contiguous first).
pub(crate) fn with_slices<R>(
    tensors: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let contiguous: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{op}: expected CPU tensors");
        };
        slices.push(contiguous_f32(cpu, layout, op)?);
    }
    f(&slices)
}

/// A pointer through which parallel tasks write disjoint regions of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);

// SAFETY: every user writes only a region no other task reads or writes at the same time.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The address `offset` elements in.
    ///
    /// # Safety
    /// `offset` must lie inside the buffer.
    pub unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// A matrix operand: the address of element (0, 0) and the strides, in elements, between
/// consecutive rows and consecutive columns.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a `Mat` is only ever read through, and every function taking one requires its
// memory to stay valid and unchanged for the call, so tasks on other threads may read it too.
unsafe impl Send for Mat {}
// SAFETY: as above.
unsafe impl Sync for Mat {}

impl Mat {
    /// A row-major matrix whose rows are `rs` elements apart.
    pub fn rows(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// The transpose, read through swapped strides.
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m×n] (+)= scale · a[m×k] · b[k×n]`, single-threaded (callers parallelize over tasks).
/// `dst` is row-major with rows `dst_rs` apart; with `accumulate` the product is added to it.
///
/// # Safety
/// `dst`, `a` and `b` must address valid memory for the given sizes and strides, and `dst`
/// must not overlap `a` or `b` nor be written by anyone else during the call.
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
    matmul_with(
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        a,
        b,
        scale,
        gemm::Parallelism::None,
    )
}

/// [`matmul`] on all of rayon's threads, for products large enough to split.
///
/// # Safety
/// As for [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn par_matmul(
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
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    matmul_with(m, n, k, dst, dst_rs, accumulate, a, b, scale, parallelism)
}

/// [`par_matmul`] in `precision`: bf16 where it applies (see [`Precision::Bf16`]).
///
/// # Safety
/// As for [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn par_matmul_in(
    precision: Precision,
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
    #[cfg(target_arch = "x86_64")]
    if precision == Precision::Bf16
        && m.min(n).min(k) >= 32
        && crate::packed_gemm::bf16::available()
    {
        use crate::packed_gemm::{bf16::Bf16, matmul};
        return matmul::<Bf16>(m, n, k, dst, dst_rs, accumulate, a, b, scale);
    }
    let _ = precision;
    par_matmul(m, n, k, dst, dst_rs, accumulate, a, b, scale)
}

#[allow(clippy::too_many_arguments)]
unsafe fn matmul_with(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// A new row-major `m×n` buffer holding `a[m×k] · b[k×n]` in `precision` ([`par_matmul_in`]),
/// written by the product without being zeroed first.
///
/// # Safety
/// `a` and `b` must address valid memory for the sizes and strides given.
pub(crate) unsafe fn new_product(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
) -> Vec<f32> {
    // A product that does not accumulate writes every element.
    written(m * n, |dst| {
        par_matmul_in(precision, m, n, k, dst, n, false, a, b, 1.0)
    })
}

/// A new row-major `m×n` buffer holding `scale · a[m×k] · b[k×n]`, computed on this thread
/// ([`matmul`]) and written without being zeroed first.
///
/// # Safety
/// `a` and `b` must address valid memory for the sizes and strides given.
pub(crate) unsafe fn new_block_product(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    scale: f32,
) -> Vec<f32> {
    // A product that does not accumulate writes every element.
    written(m * n, |dst| matmul(m, n, k, dst, n, false, a, b, scale))
}

/// A new buffer of `len` elements, filled by `write` through a pointer to its start.
///
/// # Safety
/// `write` must write every one of the `len` elements.
unsafe fn written(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    write(buffer.as_mut_ptr());
    buffer.set_len(len);
    buffer
}

/// A CPU tensor of `shape` holding `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// `e^x` for f32, within 2 ulp of the correctly rounded value for `x` in [-87, 88] and 0 below;
/// written without branches or calls so that loops over slices vectorize (libm's `expf` is
/// a call per element). Range reduction `x = n·ln2 + r` with `|r| ≤ ln2/2`, then a degree-6
/// polynomial for `e^r` (Cephes' coefficients) scaled by `2^n` through the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // max/min rather than clamp: clamp's NaN handling keeps the loop from vectorizing.
    #[allow(clippy::manual_clamp)]
    let clamped = x.max(-87.0).min(88.0);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    // Below −87 (and for −∞) the result is 0: the mask clears every bit.
    let keep = ((x >= -87.0) as u32).wrapping_neg();
    f32::from_bits((e_r * scale).to_bits() & keep)
}

/// Lanes of the partial sums and maxima below: one AVX-512 vector of f32.
const LANES: usize = 16;

/// Replaces every `v` of `values` by `e^(v − shift)` and returns their sum. Inlined, so that
/// inside a [`vectorized!`](crate::vectorized) block it gets that block's vectors.
#[inline(always)]
pub(crate) fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    for v in values.iter_mut() {
        *v = exp(*v - shift);
    }
    lane_sum(values)
}

/// `Σ e^(v − shift)` over `values`, inlined like [`exp_shifted_sum`].
#[inline(always)]
pub(crate) fn sum_exp_shifted(values: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += exp(v - shift);
        }
    }
    lanes.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| exp(v - shift))
            .sum::<f32>()
}

/// The sum of `values`, accumulated in [`LANES`] interleaved partial sums so that it
/// vectorizes.
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `Σ a·b` over paired elements, accumulated like [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_sum_of_products(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    for (a, b) in (&mut a_chunks).zip(b.chunks_exact(LANES)) {
        for ((lane, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x * y;
        }
    }
    let tail = n - a_chunks.remainder().len();
    lanes.iter().sum::<f32>()
        + a[tail..]
            .iter()
            .zip(&b[tail..])
            .map(|(x, y)| x * y)
            .sum::<f32>()
}

/// The largest of `values` (−∞ for none), over [`LANES`] interleaved maxima so that it
/// vectorizes.
#[inline(always)]
pub(crate) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp_and_zero_far_below() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max((got - exact).abs() / exact);
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(super::exp(-90.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        let mut values = vec![0.5f32, -1.0, 2.0];
        let sum = super::exp_shifted_sum(&mut values, 1.0);
        let expected: f32 = [-0.5f32, -2.0, 1.0].iter().map(|v| v.exp()).sum();
        assert!((sum - expected).abs() < 1e-6);
    }
}
