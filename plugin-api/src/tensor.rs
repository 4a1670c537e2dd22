//! Tensors as they cross into plugins: contiguous row-major `f32` views of host memory, valid
//! for the duration of one hook call, and an owned form for transports that must copy.

use serde::{Deserialize, Serialize};

/// A read-only view of a host tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorView<'a> {
    /// The shape; the last dimension is contiguous.
    pub shape: &'a [usize],
    /// The elements, row-major.
    pub data: &'a [f32],
}

/// A writable view of a host tensor.
#[derive(Debug, PartialEq)]
pub struct TensorViewMut<'a> {
    /// The shape; the last dimension is contiguous.
    pub shape: &'a [usize],
    /// The elements, row-major.
    pub data: &'a mut [f32],
}

/// A parameter's gradient, editable in place by `on_gradients`.
#[derive(Debug, PartialEq)]
pub struct Gradient<'a> {
    /// The parameter's name.
    pub name: &'a str,
    /// Its gradient, the parameter's shape.
    pub grad: TensorViewMut<'a>,
}

/// An owned tensor, for copies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<f32>,
}

impl<'a> TensorView<'a> {
    /// A view of `data` with `shape`, if their sizes agree.
    pub fn new(shape: &'a [usize], data: &'a [f32]) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    /// Rows of the last dimension.
    pub fn rows(&self) -> impl Iterator<Item = &'a [f32]> {
        let width = self.shape.last().copied().unwrap_or(1).max(1);
        self.data.chunks(width)
    }

    /// An owned copy.
    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            shape: self.shape.to_vec(),
            data: self.data.to_vec(),
        }
    }
}

impl<'a> TensorViewMut<'a> {
    /// A view of `data` with `shape`, if their sizes agree.
    pub fn new(shape: &'a [usize], data: &'a mut [f32]) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    /// The same memory, read-only.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView {
            shape: self.shape,
            data: self.data,
        }
    }
}

impl Tensor {
    /// A view of the copy.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            shape: &self.shape,
            data: &self.data,
        }
    }
}
