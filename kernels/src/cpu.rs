//! What the CPU kernels share: borrowing tensors as f32 slices, a strided matrix product, and
//! a pointer that parallel tasks may write disjoint parts through.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

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
        gemm::Parallelism::None,
    );
}

/// A CPU tensor of `shape` holding `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}
