//! Helpers shared by the tests: fixture paths and tensor comparisons.

use std::path::PathBuf;

use axl::model::safetensors_io::{self, TensorSet};
use candle_core::{DType, Device, Tensor};

/// The directory of a committed model fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// The reference tensors transformers computed for a fixture.
pub fn reference(name: &str) -> TensorSet {
    safetensors_io::load_file(
        &fixture(name).join("reference.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("reference fixture loads")
}

/// A tensor of a set, which must be present.
pub fn get(set: &TensorSet, name: &str) -> Tensor {
    set.get(name)
        .unwrap_or_else(|| panic!("{name} not in {}", set.source.display()))
        .clone()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// Largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max|a − b| / max|b|`: the error of `a` relative to the scale of the reference `b`.
pub fn relative_error(a: &Tensor, reference: &Tensor) -> f32 {
    let scale = max_abs(reference).max(1e-12);
    max_abs_diff(a, reference) / scale
}

/// Runs `axl <command> <config> <args>`, which must succeed, and returns its output.
pub fn axl(command: &str, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .arg(command)
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "axl {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
