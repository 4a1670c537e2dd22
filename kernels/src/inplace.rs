//! Direct access to the elements of f32 CPU tensors: in-place updates (a parameter stepped by
//! its optimizer, a gradient summed or scaled) and reads, without copying the tensor out and
//! back in.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};

/// Calls `f` with the f32 elements of `dst` (to modify) and of `src`. Both must be contiguous
/// f32 CPU tensors with the same number of elements and distinct storage.
pub fn update_with(dst: &Tensor, src: &Tensor, f: impl FnMut(&mut [f32], &[f32])) -> Result<()> {
    if dst.elem_count() != src.elem_count() {
        candle_core::bail!("in-place update: {:?} from {:?}", dst.dims(), src.dims());
    }
    dst.inplace_op2(
        src,
        &WithSource {
            f: std::cell::RefCell::new(f),
        },
    )
}

/// Calls `f` with the f32 elements of `t` (made contiguous first), to read.
pub fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    crate::cpu::with_slices(&[t], "read", |s| Ok(f(s[0])))
}

/// Calls `f` with the f32 elements of `dst` (a contiguous f32 CPU tensor) to modify.
pub fn update(dst: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    dst.inplace_op1(&Alone {
        f: std::cell::RefCell::new(f),
    })
}

fn elements<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected an f32 tensor");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: tensor must be contiguous")))?;
    Ok(&mut data[start..end])
}

struct WithSource<F> {
    f: std::cell::RefCell<F>,
}

impl<F: FnMut(&mut [f32], &[f32])> InplaceOp2 for WithSource<F> {
    fn name(&self) -> &'static str {
        "in-place-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> Result<()> {
        let dst = elements(dst, dst_layout, self.name())?;
        let src = crate::cpu::contiguous_f32(src, src_layout, self.name())?;
        (self.f.borrow_mut())(dst, src);
        Ok(())
    }
}

struct Alone<F> {
    f: std::cell::RefCell<F>,
}

impl<F: FnMut(&mut [f32])> InplaceOp1 for Alone<F> {
    fn name(&self) -> &'static str {
        "in-place-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        (self.f.borrow_mut())(elements(storage, layout, self.name())?);
        Ok(())
    }
}
