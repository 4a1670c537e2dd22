//! The GPU kernels' benchmark (built with `--features cuda`): each op of a SmolLM2-135M
//! training step, forward and backward, at the step's shapes, timed on the GPU. Prints one JSON
//! line per op with the median milliseconds; `bench/gpu_peer.py` times PyTorch's eager
//! composition of the same ops (what transformers runs) for the side-by-side table of
//! `bench/gpu_kernels.sh`.
//!
//!   axl-bench-gpu [--tokens 8192] [--repeat 20]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use axl_kernels::adamw::AdamWStep;
use axl_kernels::cuda::{CudaSlice, Gpu, HeadShape, RopeShape, Rows};
use axl_kernels::glu::GateActivation;
use axl_kernels::token_loss::LossOptions;
use axl_kernels::{cut_cross_entropy, fused_linear_cross_entropy};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;
const SEQUENCE: usize = 2048;
/// SmolLM2-135M's parameters, for the optimizer step.
const PARAMETERS: usize = 134_515_008;

fn random(gpu: &Gpu, rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Result<CudaSlice<f32>> {
    let values: Vec<f32> = (0..len).map(|_| rng.random_range(-scale..scale)).collect();
    Ok(gpu.upload(&values)?)
}

/// The median milliseconds of `repeat` runs of `op`, after three unmeasured ones.
fn time(gpu: &Gpu, repeat: usize, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        op()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        op()?;
        gpu.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn flag(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a count")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tokens = flag(&args, "--tokens", 4 * SEQUENCE)?;
    let repeat = flag(&args, "--repeat", 20)?;
    if tokens % SEQUENCE != 0 {
        bail!("--tokens must be a multiple of {SEQUENCE}");
    }
    let gpu = Gpu::open(0)?;
    eprintln!("{}: {tokens} tokens", gpu.name());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let report = |op: &str, ms: f64| {
        println!("{}", json!({"op": op, "ms": ms, "tokens": tokens}));
    };

    let norm = Rows {
        rows: tokens,
        cols: HIDDEN,
    };
    let x = random(&gpu, &mut rng, norm.values(), 2.0)?;
    let w = random(&gpu, &mut rng, HIDDEN, 1.0)?;
    let dy = random(&gpu, &mut rng, norm.values(), 1.0)?;
    report(
        "rms_norm",
        time(&gpu, repeat, || {
            let forward = gpu.rms_norm(&x, &w, norm, 1e-5, false)?;
            gpu.rms_norm_backward(&dy, &x, &w, &forward, norm, false)?;
            Ok(())
        })?,
    );

    let mlp = tokens * INTERMEDIATE;
    let gate = random(&gpu, &mut rng, mlp, 4.0)?;
    let up = random(&gpu, &mut rng, mlp, 2.0)?;
    let dout = random(&gpu, &mut rng, mlp, 1.0)?;
    report(
        "swiglu",
        time(&gpu, repeat, || {
            gpu.gated(&gate, &up, GateActivation::Silu)?;
            gpu.gated_backward(&dout, &gate, &up, GateActivation::Silu)?;
            Ok(())
        })?,
    );

    let rope = RopeShape {
        batch: tokens / SEQUENCE,
        len: SEQUENCE,
        q_heads: Q_HEADS,
        k_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        per_row: false,
    };
    let q = random(&gpu, &mut rng, tokens * Q_HEADS * HEAD_DIM, 1.0)?;
    let k = random(&gpu, &mut rng, tokens * KV_HEADS * HEAD_DIM, 1.0)?;
    let cos = random(&gpu, &mut rng, SEQUENCE * HEAD_DIM, 1.0)?;
    let sin = random(&gpu, &mut rng, SEQUENCE * HEAD_DIM, 1.0)?;
    report(
        "rope_qk",
        time(&gpu, repeat, || {
            let (dq, dk) = gpu.rope(&q, &k, &cos, &sin, rope)?;
            gpu.rope_backward(&dq, &dk, &cos, &sin, rope)?;
            Ok(())
        })?,
    );

    let head = HeadShape {
        rows: tokens,
        features: HIDDEN,
        vocab: VOCAB,
    };
    let hidden = random(&gpu, &mut rng, tokens * HIDDEN, 1.0)?;
    let weight = random(&gpu, &mut rng, VOCAB * HIDDEN, 0.05)?;
    let targets: Vec<i64> = (0..tokens)
        .map(|_| rng.random_range(0..VOCAB as i64))
        .collect();
    let options = LossOptions::default();
    report(
        "head_loss_fused_linear",
        time(&gpu, repeat, || {
            gpu.fused_linear_cross_entropy(
                &hidden,
                &weight,
                &targets,
                head,
                &options,
                fused_linear_cross_entropy::Settings::default(),
                false,
            )?;
            Ok(())
        })?,
    );
    report(
        "head_loss_cut",
        time(&gpu, repeat, || {
            let settings = cut_cross_entropy::Settings::default();
            let forward =
                gpu.cut_cross_entropy(&hidden, &weight, &targets, head, &options, settings)?;
            gpu.cut_cross_entropy_backward(&forward, &hidden, &weight, 1.0, false)?;
            Ok(())
        })?,
    );

    report(
        "head_loss_cut_4096_tiles",
        time(&gpu, repeat, || {
            let settings = cut_cross_entropy::Settings {
                token_block: 4096,
                vocab_block: 4096,
                ..Default::default()
            };
            let forward =
                gpu.cut_cross_entropy(&hidden, &weight, &targets, head, &options, settings)?;
            gpu.cut_cross_entropy_backward(&forward, &hidden, &weight, 1.0, false)?;
            Ok(())
        })?,
    );

    let mut param = random(&gpu, &mut rng, PARAMETERS, 1.0)?;
    let grad = random(&gpu, &mut rng, PARAMETERS, 1.0)?;
    let mut first = random(&gpu, &mut rng, PARAMETERS, 0.1)?;
    let mut second = random(&gpu, &mut rng, PARAMETERS, 0.1)?;
    let mut step = 0;
    let ms = time(&gpu, repeat, || {
        step += 1;
        let h = AdamWStep {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            lr: 1e-5,
            weight_decay: 0.01,
            step,
        };
        gpu.adamw(&h, &mut param, &grad, &mut first, &mut second)?;
        Ok(())
    })?;
    report("adamw_135m", ms);
    Ok(())
}
