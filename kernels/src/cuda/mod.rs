//! The training ops on NVIDIA GPUs, behind the `cuda` feature: RMSNorm (both weight forms),
//! LayerNorm, the gated activations, rotary embeddings of q and k in one launch, cross-entropy
//! over logits, fused linear cross-entropy, cut cross-entropy and the AdamW update, each with
//! its backward pass, computing what the CPU kernels compute.
//!
//! Nothing CUDA is needed to build: the driver, NVRTC and cuBLAS are loaded when [`Gpu::open`]
//! runs, and the kernels (`ops.cu`) are compiled then by NVRTC for the device's architecture.
//! Tensors are f32, row-major and contiguous, in [`CudaSlice`]s; targets stay on the host as
//! the CPU ops take them, with [`IGNORE_INDEX`](crate::token_loss::IGNORE_INDEX) for rows not
//! counted. Matrix products go to cuBLAS in f32.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
pub use cudarc::driver::CudaSlice;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::adamw::AdamWStep;
use crate::glu::GateActivation;
use crate::token_loss::{CountedRows, LossOptions};
use crate::{cut_cross_entropy, fused_linear_cross_entropy};

/// The kernels' source.
const SOURCE: &str = include_str!("ops.cu");

/// The kernels `ops.cu` defines.
const KERNELS: [&str; 15] = [
    "rms_norm_forward",
    "rms_norm_backward",
    "column_sums",
    "layer_norm_forward",
    "layer_norm_backward",
    "gated_forward",
    "gated_backward",
    "rope_qk",
    "cross_entropy_rows",
    "row_stats_add",
    "row_losses",
    "tile_gradient",
    "gather_rows",
    "scatter_rows",
    "adamw_update",
];

/// Columns the cut cross-entropy's gradient filter keeps or skips together (as on the CPU).
const FILTER_COLUMNS: usize = 256;

/// Threads per block of the elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// The most blocks an elementwise kernel launches; its threads stride over the rest.
const ELEMENTWISE_BLOCKS: usize = 8192;

/// Why a GPU op could not run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable NVIDIA GPU: no driver, no NVRTC or cuBLAS library, or no device.
    #[error("no CUDA GPU: {0}")]
    Unavailable(String),
    /// The driver refused a call.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    /// cuBLAS refused a product.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// Buffers that do not match the shape given, or a bad option.
    #[error("{0}")]
    Shape(String),
}

/// The result of a GPU op.
pub type Result<T> = std::result::Result<T, GpuError>;

/// A row-major matrix's shape: `rows` rows of `cols` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Rows.
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
}

impl Rows {
    /// The number of values.
    pub fn values(&self) -> usize {
        self.rows * self.cols
    }
}

/// What the RMSNorm forward pass keeps for its backward pass, with its output.
pub struct RmsNormForward {
    /// The normalized rows.
    pub output: CudaSlice<f32>,
    /// `1 / sqrt(mean(x²) + eps)` of each row.
    pub inv_rms: CudaSlice<f32>,
}

/// What the LayerNorm forward pass keeps for its backward pass, with its output.
pub struct LayerNormForward {
    /// The normalized rows.
    pub output: CudaSlice<f32>,
    /// Each row's mean.
    pub mean: CudaSlice<f32>,
    /// Each row's `1 / sqrt(var + eps)`.
    pub rstd: CudaSlice<f32>,
}

/// The gradients of a norm's input and parameters.
pub struct NormGrads {
    /// `∂input`.
    pub input: CudaSlice<f32>,
    /// `∂weight`.
    pub weight: CudaSlice<f32>,
    /// `∂bias` (LayerNorm only).
    pub bias: Option<CudaSlice<f32>>,
}

/// The layout of q `[batch, len, q_heads, head_dim]` and k `[batch, len, k_heads, head_dim]`
/// and of the rotation tables: `[len, head_dim]`, or `[batch, len, head_dim]` with `per_row`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub len: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key heads.
    pub k_heads: usize,
    /// Values per head (even).
    pub head_dim: usize,
    /// Whether the tables hold a row per sequence (packed sequences).
    pub per_row: bool,
}

/// The summed loss of a language-model head and the gradients of its inputs.
pub struct HeadLoss {
    /// The summed loss over the counted rows.
    pub loss: f32,
    /// `∂hidden`, `[rows, features]`.
    pub hidden_grad: CudaSlice<f32>,
    /// `∂weight`, `[vocab, features]`, when asked for.
    pub weight_grad: Option<CudaSlice<f32>>,
}

/// The matrix dimensions of a language-model head: `hidden` `[rows, features]`, `weight`
/// `[vocab, features]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    /// Rows of hidden states (tokens).
    pub rows: usize,
    /// Features per row.
    pub features: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// What cut cross-entropy's forward pass keeps: per counted row, the log-sum-exp and the
/// gradient factor, no logits.
pub struct CutForward {
    /// The summed loss over the counted rows.
    pub loss: f32,
    shape: HeadShape,
    counted: Counted,
    lse: CudaSlice<f32>,
    weight: CudaSlice<f32>,
    settings: cut_cross_entropy::Settings,
    options: LossOptions,
}

/// The counted rows of a head's input, gathered together.
struct Counted {
    /// Counted rows.
    len: usize,
    /// Each counted row's index in the input (None when every row counts).
    rows: Option<CudaSlice<i32>>,
    /// Each counted row's target.
    targets: CudaSlice<i32>,
}

/// The loss options as the kernels take them (`struct LossOptions` in `ops.cu`).
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelLossOptions {
    smoothing: f32,
    z_loss: f32,
    softcap: f32,
    token_scaling: i32,
}

// SAFETY: plain `repr(C)` data of the layout the kernels declare.
unsafe impl DeviceRepr for KernelLossOptions {}

impl From<&LossOptions> for KernelLossOptions {
    fn from(o: &LossOptions) -> Self {
        Self {
            smoothing: o.label_smoothing,
            z_loss: o.z_loss,
            softcap: o.softcap.unwrap_or(0.0),
            token_scaling: o.token_scaling as i32,
        }
    }
}

/// An open GPU with the kernels loaded.
pub struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    name: String,
}

fn shape_error<T>(message: String) -> Result<T> {
    Err(GpuError::Shape(message))
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return shape_error(format!(
            "{what}: a buffer of {len} values where {expected} are expected"
        ));
    }
    Ok(())
}

/// Checks a norm's input and weight against `shape`.
fn check_norm(op: &str, x: &CudaSlice<f32>, weight: &CudaSlice<f32>, shape: Rows) -> Result<()> {
    check_len(&format!("{op} input"), x.len(), shape.values())?;
    check_len(&format!("{op} weight"), weight.len(), shape.cols)
}

fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| GpuError::Shape(format!("{what} {value} is too large")))
}

/// Threads per block for kernels that give a block to each row of `cols` values.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, ELEMENTWISE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A null pointer for a kernel's optional input.
const NULL: u64 = 0;

impl Gpu {
    /// Opens GPU `ordinal` and compiles the kernels for it. [`GpuError::Unavailable`] says
    /// why there is none to use (no driver, no NVRTC or cuBLAS, no such device).
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: these only try to load the libraries.
        let libraries = unsafe {
            [
                (
                    cudarc::driver::sys::is_culib_present(),
                    "the NVIDIA driver (libcuda)",
                ),
                (cudarc::nvrtc::sys::is_culib_present(), "NVRTC (libnvrtc)"),
                (
                    cudarc::cublas::sys::is_culib_present(),
                    "cuBLAS (libcublas)",
                ),
            ]
        };
        if let Some((_, missing)) = libraries.iter().find(|(present, _)| !present) {
            return Err(GpuError::Unavailable(format!("{missing} is not installed")));
        }
        let devices = CudaContext::device_count()?;
        if ordinal >= devices.max(0) as usize {
            return Err(GpuError::Unavailable(format!(
                "device {ordinal} asked for, {devices} present"
            )));
        }
        let context = CudaContext::new(ordinal)?;
        let (major, minor) = context.compute_capability()?;
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, options)
            .map_err(|e| GpuError::Compile(format!("{e:?}")))?;
        let module = context.load_module(ptx)?;
        let mut kernels = HashMap::new();
        for name in KERNELS {
            kernels.insert(name, module.load_function(name)?);
        }
        let stream = context.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        Ok(Self {
            name: context.name()?,
            stream,
            blas,
            kernels,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `values` to the device.
    pub fn upload<T: DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(values)?)
    }

    /// Copies `values` back to the host (waiting for the ops that write them).
    pub fn download<T: DeviceRepr>(&self, values: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(values)?)
    }

    /// Waits for every op queued so far.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(len.max(1))?)
    }

    /// A buffer the op about to run writes whole before anything reads it.
    fn output(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: f32 has no invalid bit patterns, and the callers write every value before
        // reading or returning the buffer.
        Ok(unsafe { self.stream.alloc(len.max(1)) }?)
    }

    fn kernel(&self, name: &str) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.kernels[name])
    }

    /// RMSNorm of each row, `x / sqrt(mean(x²) + eps) · w` (or `· (1 + w)`).
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        shape: Rows,
        eps: f32,
        one_plus_weight: bool,
    ) -> Result<RmsNormForward> {
        check_norm("rms_norm", x, weight, shape)?;
        let mut output = self.output(shape.values())?;
        let mut inv_rms = self.output(shape.rows)?;
        if shape.values() > 0 {
            let (cols, one_plus) = (int(shape.cols, "width")?, one_plus_weight as i32);
            let mut launch = self.kernel("rms_norm_forward");
            launch
                .arg(x)
                .arg(weight)
                .arg(&mut output)
                .arg(&mut inv_rms)
                .arg(&cols)
                .arg(&eps)
                .arg(&one_plus);
            // SAFETY: the buffers hold the lengths checked above.
            unsafe { launch.launch(per_row(shape.rows, shape.cols)) }?;
        }
        Ok(RmsNormForward { output, inv_rms })
    }

    /// The gradients of [`Gpu::rms_norm`]'s input and weight from the output's gradient.
    pub fn rms_norm_backward(
        &self,
        grad: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        forward: &RmsNormForward,
        shape: Rows,
        one_plus_weight: bool,
    ) -> Result<NormGrads> {
        check_len("rms_norm gradient", grad.len(), shape.values())?;
        check_norm("rms_norm", x, weight, shape)?;
        let mut input = self.output(shape.values())?;
        let mut weight_grad = self.zeros(shape.cols)?;
        if shape.values() > 0 {
            let (cols, one_plus) = (int(shape.cols, "width")?, one_plus_weight as i32);
            let mut launch = self.kernel("rms_norm_backward");
            launch
                .arg(grad)
                .arg(x)
                .arg(weight)
                .arg(&forward.inv_rms)
                .arg(&mut input)
                .arg(&cols)
                .arg(&one_plus);
            // SAFETY: the buffers hold the lengths checked above.
            unsafe { launch.launch(per_row(shape.rows, shape.cols)) }?;
            self.column_sums(
                grad,
                Some((x, None)),
                Some(&forward.inv_rms),
                &mut weight_grad,
                shape,
            )?;
        }
        Ok(NormGrads {
            input,
            weight: weight_grad,
            bias: None,
        })
    }

    /// `out[c] += Σ_r a[r,c] · (b[r,c] − shift[r]) · scale[r]`, each factor optional.
    fn column_sums(
        &self,
        a: &CudaSlice<f32>,
        b: Option<(&CudaSlice<f32>, Option<&CudaSlice<f32>>)>,
        scale: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        shape: Rows,
    ) -> Result<()> {
        let (rows, cols) = (int(shape.rows, "rows")?, int(shape.cols, "width")?);
        let mut launch = self.kernel("column_sums");
        launch.arg(a);
        match b {
            Some((b, shift)) => {
                launch.arg(b);
                match shift {
                    Some(shift) => launch.arg(shift),
                    None => launch.arg(&NULL),
                };
            }
            None => {
                launch.arg(&NULL).arg(&NULL);
            }
        }
        match scale {
            Some(scale) => launch.arg(scale),
            None => launch.arg(&NULL),
        };
        launch.arg(out).arg(&rows).arg(&cols);
        let config = LaunchConfig {
            grid_dim: (
                shape.cols.div_ceil(32) as u32,
                shape.rows.div_ceil(8).clamp(1, 128) as u32,
                1,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the callers checked the buffers against `shape`.
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// LayerNorm of each row, `(x − mean) / sqrt(var + eps) · w + b`.
    pub fn layer_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        shape: Rows,
        eps: f32,
    ) -> Result<LayerNormForward> {
        check_norm("layer_norm", x, weight, shape)?;
        check_len("layer_norm bias", bias.len(), shape.cols)?;
        let mut output = self.output(shape.values())?;
        let mut mean = self.output(shape.rows)?;
        let mut rstd = self.output(shape.rows)?;
        if shape.values() > 0 {
            let cols = int(shape.cols, "width")?;
            let mut launch = self.kernel("layer_norm_forward");
            launch
                .arg(x)
                .arg(weight)
                .arg(bias)
                .arg(&mut output)
                .arg(&mut mean)
                .arg(&mut rstd)
                .arg(&cols)
                .arg(&eps);
            // SAFETY: the buffers hold the lengths checked above.
            unsafe { launch.launch(per_row(shape.rows, shape.cols)) }?;
        }
        Ok(LayerNormForward { output, mean, rstd })
    }

    /// The gradients of [`Gpu::layer_norm`]'s input, weight and bias.
    pub fn layer_norm_backward(
        &self,
        grad: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        forward: &LayerNormForward,
        shape: Rows,
    ) -> Result<NormGrads> {
        check_len("layer_norm gradient", grad.len(), shape.values())?;
        check_norm("layer_norm", x, weight, shape)?;
        let mut input = self.output(shape.values())?;
        let mut weight_grad = self.zeros(shape.cols)?;
        let mut bias_grad = self.zeros(shape.cols)?;
        if shape.values() > 0 {
            let cols = int(shape.cols, "width")?;
            let mut launch = self.kernel("layer_norm_backward");
            launch
                .arg(grad)
                .arg(x)
                .arg(weight)
                .arg(&forward.mean)
                .arg(&forward.rstd)
                .arg(&mut input)
                .arg(&cols);
            // SAFETY: the buffers hold the lengths checked above.
            unsafe { launch.launch(per_row(shape.rows, shape.cols)) }?;
            self.column_sums(
                grad,
                Some((x, Some(&forward.mean))),
                Some(&forward.rstd),
                &mut weight_grad,
                shape,
            )?;
            self.column_sums(grad, None, None, &mut bias_grad, shape)?;
        }
        Ok(NormGrads {
            input,
            weight: weight_grad,
            bias: Some(bias_grad),
        })
    }

    /// `act(gate) · up`, elementwise.
    pub fn gated(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        activation: GateActivation,
    ) -> Result<CudaSlice<f32>> {
        check_len("glu up", up.len(), gate.len())?;
        let n = gate.len();
        let mut out = self.output(n)?;
        let (len, act) = (n as i64, activation_code(activation));
        let mut launch = self.kernel("gated_forward");
        launch.arg(gate).arg(up).arg(&mut out).arg(&len).arg(&act);
        // SAFETY: three buffers of `n` values.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok(out)
    }

    /// The gradients of [`Gpu::gated`]'s gate and up from the output's gradient.
    pub fn gated_backward(
        &self,
        grad: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        activation: GateActivation,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        check_len("glu up", up.len(), gate.len())?;
        check_len("glu gradient", grad.len(), gate.len())?;
        let n = gate.len();
        let mut gate_grad = self.output(n)?;
        let mut up_grad = self.output(n)?;
        let (len, act) = (n as i64, activation_code(activation));
        let mut launch = self.kernel("gated_backward");
        launch
            .arg(grad)
            .arg(gate)
            .arg(up)
            .arg(&mut gate_grad)
            .arg(&mut up_grad)
            .arg(&len)
            .arg(&act);
        // SAFETY: five buffers of `n` values.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok((gate_grad, up_grad))
    }

    /// Rotates q and k by the angles of `cos` and `sin`, both in one launch.
    pub fn rope(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        shape: RopeShape,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        self.rotate(q, k, cos, sin, shape, false)
    }

    /// The gradients of [`Gpu::rope`]'s q and k: the inverse rotation of theirs.
    pub fn rope_backward(
        &self,
        q_grad: &CudaSlice<f32>,
        k_grad: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        shape: RopeShape,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        self.rotate(q_grad, k_grad, cos, sin, shape, true)
    }

    fn rotate(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        s: RopeShape,
        inverse: bool,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        if !s.head_dim.is_multiple_of(2) {
            return shape_error(format!("rope: odd head_dim {}", s.head_dim));
        }
        let tokens = s.batch * s.len;
        check_len("rope q", q.len(), tokens * s.q_heads * s.head_dim)?;
        check_len("rope k", k.len(), tokens * s.k_heads * s.head_dim)?;
        let table = if s.per_row { tokens } else { s.len } * s.head_dim;
        check_len("rope cos", cos.len(), table)?;
        check_len("rope sin", sin.len(), table)?;
        let mut q_out = self.output(q.len())?;
        let mut k_out = self.output(k.len())?;
        let pairs = (q.len() + k.len()) / 2;
        if pairs > 0 {
            let args = [
                int(s.batch, "batch")?,
                int(s.len, "length")?,
                int(s.q_heads, "heads")?,
                int(s.k_heads, "heads")?,
                int(s.head_dim, "head_dim")?,
                s.per_row as i32,
                inverse as i32,
            ];
            let mut launch = self.kernel("rope_qk");
            launch
                .arg(q)
                .arg(k)
                .arg(cos)
                .arg(sin)
                .arg(&mut q_out)
                .arg(&mut k_out);
            for value in &args {
                launch.arg(value);
            }
            // SAFETY: the buffers hold the lengths checked above.
            unsafe { launch.launch(elementwise(pairs)) }?;
        }
        Ok((q_out, k_out))
    }

    /// The summed loss of `logits` `[rows, vocab]` against `targets`, formed as `options`
    /// say; the logits are replaced by `scale` times the loss's gradient (Liger's in-place
    /// cross-entropy), zero in rows not counted.
    pub fn cross_entropy(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &[i64],
        vocab: usize,
        options: &LossOptions,
        scale: f32,
    ) -> Result<f32> {
        options
            .validate()
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        let rows = targets.len();
        check_len("cross_entropy logits", logits.len(), rows * vocab)?;
        CountedRows::new(targets, rows, vocab).map_err(|e| GpuError::Shape(e.to_string()))?;
        if rows == 0 {
            return Ok(0.0);
        }
        let ids: Vec<i32> = targets.iter().map(|&t| t.max(-1) as i32).collect();
        let ids = self.upload(&ids)?;
        let mut losses = self.output(rows)?;
        let (width, stride) = (int(vocab, "vocabulary")?, vocab as i64);
        let kernel_options = KernelLossOptions::from(options);
        let mut launch = self.kernel("cross_entropy_rows");
        launch
            .arg(logits)
            .arg(&ids)
            .arg(&mut losses)
            .arg(&width)
            .arg(&stride)
            .arg(&kernel_options)
            .arg(&scale);
        // SAFETY: `rows` rows of `vocab` logits, a target and a loss each.
        unsafe { launch.launch(per_row(rows, vocab)) }?;
        self.sum(&losses)
    }

    fn sum(&self, values: &CudaSlice<f32>) -> Result<f32> {
        Ok(self
            .download(values)?
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>() as f32)
    }

    /// Row-major `c[m, n] = op(a)·op(b) + beta·c`, where `op(a)` is `[m, k]` (stored as
    /// `[k, m]` when `a_t`) and `op(b)` is `[k, n]` (stored as `[n, k]` when `b_t`); `lda`,
    /// `ldb`, `ldc` are the stored rows' strides.
    #[allow(clippy::too_many_arguments)]
    fn matmul<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, lda, a_t): (&A, usize, bool),
        (b, ldb, b_t): (&B, usize, bool),
        c: &mut C,
        ldc: usize,
        beta: f32,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // cuBLAS is column-major: row-major c is column-major cᵀ = op(b)ᵀ·op(a)ᵀ.
        let config = GemmConfig {
            transa: op(b_t),
            transb: op(a_t),
            m: int(n, "product width")?,
            n: int(m, "product height")?,
            k: int(k, "product depth")?,
            alpha: 1.0f32,
            lda: int(ldb, "stride")?,
            ldb: int(lda, "stride")?,
            beta,
            ldc: int(ldc, "stride")?,
        };
        // SAFETY: the callers size the buffers for these dimensions and strides.
        unsafe { self.blas.gemm(config, b, a, c) }?;
        Ok(())
    }

    /// Gathers the counted rows of `hidden` and uploads their targets.
    fn counted(&self, targets: &[i64], shape: HeadShape) -> Result<Counted> {
        let counted = CountedRows::new(targets, shape.rows, shape.vocab)
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        let ids: Vec<i32> = counted.targets.iter().map(|&t| t as i32).collect();
        let rows = if counted.rows.len() == shape.rows {
            None
        } else {
            let rows: Vec<i32> = counted.rows.iter().map(|&r| r as i32).collect();
            Some(self.upload(&rows)?)
        };
        Ok(Counted {
            len: counted.rows.len(),
            rows,
            targets: self.upload(&ids)?,
        })
    }

    /// The counted rows of `hidden`, packed (a copy only when some rows are not counted).
    fn packed_hidden(
        &self,
        hidden: &CudaSlice<f32>,
        counted: &Counted,
        features: usize,
    ) -> Result<Option<CudaSlice<f32>>> {
        let Some(rows) = &counted.rows else {
            return Ok(None);
        };
        let mut packed = self.output(counted.len * features)?;
        if counted.len > 0 {
            let cols = int(features, "features")?;
            let mut launch = self.kernel("gather_rows");
            launch.arg(hidden).arg(rows).arg(&mut packed).arg(&cols);
            // SAFETY: `rows` indexes rows of `hidden`; `packed` holds one per index.
            unsafe { launch.launch(per_row(counted.len, features)) }?;
        }
        Ok(Some(packed))
    }

    /// Puts the packed rows' gradients back at their rows, zero elsewhere.
    fn unpacked(
        &self,
        packed: CudaSlice<f32>,
        counted: &Counted,
        shape: HeadShape,
    ) -> Result<CudaSlice<f32>> {
        let Some(rows) = &counted.rows else {
            return Ok(packed);
        };
        let mut full = self.zeros(shape.rows * shape.features)?;
        if counted.len > 0 {
            let cols = int(shape.features, "features")?;
            let mut launch = self.kernel("scatter_rows");
            launch.arg(&packed).arg(rows).arg(&mut full).arg(&cols);
            // SAFETY: `rows` indexes rows of `full`; `packed` holds one per index.
            unsafe { launch.launch(per_row(counted.len, shape.features)) }?;
        }
        Ok(full)
    }

    fn check_head(
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        targets: &[i64],
        shape: HeadShape,
        options: &LossOptions,
    ) -> Result<()> {
        options
            .validate()
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        check_len("head targets", targets.len(), shape.rows)?;
        check_len("head hidden", hidden.len(), shape.rows * shape.features)?;
        check_len("head weight", weight.len(), shape.vocab * shape.features)
    }

    /// Liger's fused linear cross-entropy: the summed loss of `hidden · weightᵀ` against
    /// `targets` and the gradients of `hidden` (and of `weight` with `weight_grad`), the
    /// logits made a chunk of rows at a time and turned into gradients in place.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_linear_cross_entropy(
        &self,
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        targets: &[i64],
        shape: HeadShape,
        options: &LossOptions,
        settings: fused_linear_cross_entropy::Settings,
        weight_grad: bool,
    ) -> Result<HeadLoss> {
        Self::check_head(hidden, weight, targets, shape, options)?;
        let HeadShape {
            features, vocab, ..
        } = shape;
        let counted = self.counted(targets, shape)?;
        let packed = self.packed_hidden(hidden, &counted, features)?;
        let h = packed.as_ref().unwrap_or(hidden);
        let n = counted.len;
        let chunk = settings.rows_per_chunk(vocab).min(n.max(1));
        let mut logits = self.output(chunk * vocab)?;
        let mut losses = self.output(n)?;
        let mut hidden_grad = self.output(n * features)?;
        let mut weight_grads = if weight_grad {
            Some(self.zeros::<f32>(vocab * features)?)
        } else {
            None
        };
        let kernel_options = KernelLossOptions::from(options);
        let (width, stride, scale) = (int(vocab, "vocabulary")?, vocab as i64, 1.0f32);
        for start in (0..n).step_by(chunk) {
            let r = chunk.min(n - start);
            let h_chunk = h.slice(start * features..(start + r) * features);
            self.matmul(
                (r, vocab, features),
                (&h_chunk, features, false),
                (weight, features, true),
                &mut logits,
                vocab,
                0.0,
            )?;
            let chunk_targets = counted.targets.slice(start..start + r);
            let mut chunk_losses = losses.slice_mut(start..start + r);
            let mut launch = self.kernel("cross_entropy_rows");
            launch
                .arg(&mut logits)
                .arg(&chunk_targets)
                .arg(&mut chunk_losses)
                .arg(&width)
                .arg(&stride)
                .arg(&kernel_options)
                .arg(&scale);
            // SAFETY: `r` rows of logits, targets and losses.
            unsafe { launch.launch(per_row(r, vocab)) }?;
            let mut dh_chunk = hidden_grad.slice_mut(start * features..(start + r) * features);
            self.matmul(
                (r, features, vocab),
                (&logits, vocab, false),
                (weight, features, false),
                &mut dh_chunk,
                features,
                0.0,
            )?;
            if let Some(dw) = weight_grads.as_mut() {
                self.matmul(
                    (vocab, features, r),
                    (&logits, vocab, true),
                    (&h_chunk, features, false),
                    dw,
                    features,
                    1.0,
                )?;
            }
        }
        Ok(HeadLoss {
            loss: if n == 0 { 0.0 } else { self.sum(&losses)? },
            hidden_grad: self.unpacked(hidden_grad, &counted, shape)?,
            weight_grad: weight_grads,
        })
    }

    /// The forward pass of cut cross-entropy: the summed loss of `hidden · weightᵀ` against
    /// `targets`, tile by tile (`settings`' row and vocabulary blocks) through each row's
    /// running log-sum-exp; what it keeps is two values per counted row.
    pub fn cut_cross_entropy(
        &self,
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        targets: &[i64],
        shape: HeadShape,
        options: &LossOptions,
        settings: cut_cross_entropy::Settings,
    ) -> Result<CutForward> {
        Self::check_head(hidden, weight, targets, shape, options)?;
        if settings.token_block == 0 || settings.vocab_block == 0 {
            return shape_error(
                "cut cross-entropy: blocks must hold at least one row and id".into(),
            );
        }
        let counted = self.counted(targets, shape)?;
        let packed = self.packed_hidden(hidden, &counted, shape.features)?;
        let h = packed.as_ref().unwrap_or(hidden);
        let n = counted.len;
        let mut max = self.upload(&vec![f32::NEG_INFINITY; n.max(1)])?;
        let mut sum_exp = self.zeros::<f32>(n)?;
        let mut logit_sum = self.zeros::<f32>(n)?;
        let mut target_logit = self.zeros::<f32>(n)?;
        let kernel_options = KernelLossOptions::from(options);
        let mut tile = self.output(settings.token_block.min(n.max(1)) * settings.vocab_block)?;
        for (r0, r) in blocks(n, settings.token_block) {
            for (v0, w) in blocks(shape.vocab, settings.vocab_block) {
                self.tile_logits(&mut tile, h, weight, shape.features, (r0, r), (v0, w))?;
                let (ld, width, offset) = (w as i64, int(w, "block")?, int(v0, "id")?);
                let tile_targets = counted.targets.slice(r0..r0 + r);
                let mut launch = self.kernel("row_stats_add");
                let (mut m, mut s) = (max.slice_mut(r0..r0 + r), sum_exp.slice_mut(r0..r0 + r));
                let mut ls = logit_sum.slice_mut(r0..r0 + r);
                let mut t = target_logit.slice_mut(r0..r0 + r);
                launch
                    .arg(&tile)
                    .arg(&ld)
                    .arg(&width)
                    .arg(&offset)
                    .arg(&tile_targets)
                    .arg(&mut m)
                    .arg(&mut s)
                    .arg(&mut ls)
                    .arg(&mut t)
                    .arg(&kernel_options);
                // SAFETY: a tile of `r` rows of `w` logits and `r` rows of statistics.
                unsafe { launch.launch(per_row(r, w)) }?;
            }
        }
        let mut losses = self.output(n)?;
        let mut lse = self.output(n)?;
        let mut factor = self.output(n)?;
        if n > 0 {
            let (rows, vocab) = (int(n, "rows")?, int(shape.vocab, "vocabulary")?);
            let mut launch = self.kernel("row_losses");
            launch
                .arg(&max)
                .arg(&sum_exp)
                .arg(&logit_sum)
                .arg(&target_logit)
                .arg(&mut losses)
                .arg(&mut lse)
                .arg(&mut factor)
                .arg(&rows)
                .arg(&vocab)
                .arg(&kernel_options);
            // SAFETY: `n` rows of statistics and results.
            unsafe { launch.launch(elementwise(n)) }?;
        }
        Ok(CutForward {
            loss: if n == 0 { 0.0 } else { self.sum(&losses)? },
            shape,
            counted,
            lse,
            weight: factor,
            settings,
            options: *options,
        })
    }

    /// `tile[r, w] = hidden[r0..r0+r] · weight[v0..v0+w]ᵀ`.
    fn tile_logits(
        &self,
        tile: &mut CudaSlice<f32>,
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        features: usize,
        (r0, r): (usize, usize),
        (v0, w): (usize, usize),
    ) -> Result<()> {
        let h = hidden.slice(r0 * features..(r0 + r) * features);
        let wt = weight.slice(v0 * features..(v0 + w) * features);
        self.matmul(
            (r, w, features),
            (&h, features, false),
            (&wt, features, true),
            tile,
            w,
            0.0,
        )
    }

    /// The backward pass of cut cross-entropy: `scale` times the gradients of `hidden` (and
    /// of `weight` with `weight_grad`). Each tile is recomputed and turned into its logits'
    /// gradients; blocks of columns whose every gradient is under the settings' filter
    /// threshold are left out of the products.
    pub fn cut_cross_entropy_backward(
        &self,
        forward: &CutForward,
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        scale: f32,
        weight_grad: bool,
    ) -> Result<HeadLoss> {
        let shape = forward.shape;
        let HeadShape {
            features, vocab, ..
        } = shape;
        check_len("head hidden", hidden.len(), shape.rows * features)?;
        check_len("head weight", weight.len(), vocab * features)?;
        let counted = &forward.counted;
        let packed = self.packed_hidden(hidden, counted, features)?;
        let h = packed.as_ref().unwrap_or(hidden);
        let n = counted.len;
        let settings = forward.settings;
        let mut hidden_grad = self.zeros::<f32>(n * features)?;
        let mut weight_grads = if weight_grad {
            Some(self.zeros::<f32>(vocab * features)?)
        } else {
            None
        };
        let kernel_options = KernelLossOptions::from(&forward.options);
        let threshold = settings.filter_threshold();
        let mut tile = self.output(settings.token_block.min(n.max(1)) * settings.vocab_block)?;
        let mut kept = self.zeros::<i32>(settings.vocab_block.div_ceil(FILTER_COLUMNS))?;
        for (r0, r) in blocks(n, settings.token_block) {
            for (v0, w) in blocks(vocab, settings.vocab_block) {
                self.tile_logits(&mut tile, h, weight, features, (r0, r), (v0, w))?;
                self.stream.memset_zeros(&mut kept)?;
                let (ld, width, offset) = (w as i64, int(w, "block")?, int(v0, "id")?);
                let (full_vocab, filter) = (int(vocab, "vocabulary")?, FILTER_COLUMNS as i32);
                let tile_targets = counted.targets.slice(r0..r0 + r);
                let (lse, factor) = (
                    forward.lse.slice(r0..r0 + r),
                    forward.weight.slice(r0..r0 + r),
                );
                let mut launch = self.kernel("tile_gradient");
                launch
                    .arg(&mut tile)
                    .arg(&ld)
                    .arg(&width)
                    .arg(&offset)
                    .arg(&tile_targets)
                    .arg(&lse)
                    .arg(&factor)
                    .arg(&full_vocab)
                    .arg(&kernel_options)
                    .arg(&scale)
                    .arg(&threshold)
                    .arg(&filter)
                    .arg(&mut kept);
                // SAFETY: a tile of `r` rows of `w` logits, `r` rows of statistics, and a flag
                // per block of columns.
                unsafe { launch.launch(per_row(r, w)) }?;
                let flags = self.download(&kept)?;
                for (c0, c1) in kept_runs(&flags[..w.div_ceil(FILTER_COLUMNS)], w) {
                    let g = tile.slice(c0..);
                    let mut dh = hidden_grad.slice_mut(r0 * features..(r0 + r) * features);
                    let wt = weight.slice((v0 + c0) * features..(v0 + c1) * features);
                    self.matmul(
                        (r, features, c1 - c0),
                        (&g, w, false),
                        (&wt, features, false),
                        &mut dh,
                        features,
                        1.0,
                    )?;
                    if let Some(dw) = weight_grads.as_mut() {
                        let hr = h.slice(r0 * features..(r0 + r) * features);
                        let mut dw = dw.slice_mut((v0 + c0) * features..(v0 + c1) * features);
                        self.matmul(
                            (c1 - c0, features, r),
                            (&g, w, true),
                            (&hr, features, false),
                            &mut dw,
                            features,
                            1.0,
                        )?;
                    }
                }
            }
        }
        Ok(HeadLoss {
            loss: forward.loss,
            hidden_grad: self.unpacked(hidden_grad, counted, shape)?,
            weight_grad: weight_grads,
        })
    }

    /// The AdamW update of `param` and its moments from `grad`, in one pass
    /// ([`adamw::update`](crate::adamw::update) on the GPU).
    pub fn adamw(
        &self,
        h: &AdamWStep,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        first: &mut CudaSlice<f32>,
        second: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = param.len();
        check_len("adamw gradient", grad.len(), n)?;
        check_len("adamw first moment", first.len(), n)?;
        check_len("adamw second moment", second.len(), n)?;
        let step = h.step.max(1) as i32;
        let values = [
            h.beta1 as f32,
            h.beta2 as f32,
            (h.lr / (1.0 - h.beta1.powi(step))) as f32,
            (1.0 - h.beta2.powi(step)).sqrt() as f32,
            (1.0 - h.lr * h.weight_decay) as f32,
            h.epsilon as f32,
        ];
        let len = n as i64;
        let mut launch = self.kernel("adamw_update");
        launch.arg(param).arg(grad).arg(first).arg(second).arg(&len);
        for value in &values {
            launch.arg(value);
        }
        // SAFETY: four buffers of `n` values.
        unsafe { launch.launch(elementwise(n)) }?;
        Ok(())
    }
}

fn activation_code(activation: GateActivation) -> i32 {
    match activation {
        GateActivation::Silu => 0,
        GateActivation::GeluTanh => 1,
    }
}

/// `(start, size)` of the blocks of `size` that cover `0..total`.
fn blocks(total: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(size)
        .map(move |start| (start, size.min(total - start)))
}

/// The column ranges of the kept blocks of [`FILTER_COLUMNS`], adjacent ones merged, in a tile
/// `width` wide.
fn kept_runs(flags: &[i32], width: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (block, _) in flags.iter().enumerate().filter(|(_, &kept)| kept != 0) {
        let (c0, c1) = (
            block * FILTER_COLUMNS,
            ((block + 1) * FILTER_COLUMNS).min(width),
        );
        match runs.last_mut() {
            Some(last) if last.1 == c0 => last.1 = c1,
            _ => runs.push((c0, c1)),
        }
    }
    runs
}
