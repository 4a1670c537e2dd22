//! The GPU kernels (`cuda` feature) against the CPU's reference compositions: values and the
//! gradients of every input, over the CPU tests' shapes. Without a usable GPU each test says so
//! on stderr and passes.

use std::io::Write;

use axl_kernels::adamw::{self, AdamWStep};
use axl_kernels::cuda::{CudaSlice, Gpu, GpuError, HeadShape, RopeShape, Rows};
use axl_kernels::{layer_norm, token_loss};

use super::*;

/// The GPU, or `None` after saying on stderr (past the test harness's capture) why `test`
/// is skipped.
fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(GpuError::Unavailable(why)) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn up(gpu: &Gpu, t: &Tensor) -> CudaSlice<f32> {
    gpu.upload(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .unwrap()
}

fn down(gpu: &Gpu, values: &CudaSlice<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(gpu.download(values).unwrap(), dims, &Device::Cpu).unwrap()
}

/// The reference's output and the gradients of `Σ out · upstream` for each input, with
/// `upstream` random (seeded) of the output's shape and returned too.
fn reference_grads(
    inputs: &[Tensor],
    reference: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>, Tensor) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = reference(&tensors);
    let upstream = if out.rank() == 0 {
        Tensor::new(1f32, &Device::Cpu).unwrap()
    } else {
        random(&mut ChaCha8Rng::seed_from_u64(11), out.dims(), 1.0)
    };
    let grads = (&out * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect();
    (out, grads, upstream)
}

fn assert_close(what: &str, gpu: &Tensor, reference: &Tensor, tolerance: f32) {
    let diff = max_rel_diff(gpu, reference);
    assert!(
        diff < tolerance,
        "{what}: differs from the reference by {diff}"
    );
}

const ROW_SHAPES: [(usize, usize); 6] = [(1, 1), (3, 5), (7, 96), (33, 577), (64, 2048), (5, 3000)];

#[test]
fn cuda_norms_match_reference() {
    let Some(gpu) = gpu("cuda_norms_match_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for (rows, cols) in ROW_SHAPES {
        let shape = Rows { rows, cols };
        let x = random(&mut rng, &[rows, cols], 2.0);
        let w = random(&mut rng, &[cols], 1.0);
        let b = random(&mut rng, &[cols], 1.0);
        let (dx, dw) = (up(&gpu, &x), up(&gpu, &w));
        // With one column the gradients are differences of nearly equal terms (RMSNorm's input
        // gradient is `eps / (x² + eps)` of the output's; LayerNorm's are zero, through
        // intermediates as large as `1/sqrt(eps)`): both sides keep only rounding, compared
        // here in absolute terms (the floor of `max_rel_diff`'s scale is 1e-3).
        let input_tolerance = if cols == 1 { 1e-2 } else { 2e-5 };
        for one_plus in [false, true] {
            let what = format!("rms_norm {rows}x{cols} one_plus={one_plus}");
            let (out, grads, upstream) = reference_grads(&[x.clone(), w.clone()], &|t| {
                rms_norm::reference(&t[0], &t[1], 1e-6, one_plus).unwrap()
            });
            let forward = gpu.rms_norm(&dx, &dw, shape, 1e-6, one_plus).unwrap();
            assert_close(
                &what,
                &down(&gpu, &forward.output, &[rows, cols]),
                &out,
                2e-5,
            );
            let g = gpu
                .rms_norm_backward(&up(&gpu, &upstream), &dx, &dw, &forward, shape, one_plus)
                .unwrap();
            assert_close(
                &what,
                &down(&gpu, &g.input, &[rows, cols]),
                &grads[0],
                input_tolerance,
            );
            assert_close(&what, &down(&gpu, &g.weight, &[cols]), &grads[1], 2e-5);
        }
        let what = format!("layer_norm {rows}x{cols}");
        let (out, grads, upstream) = reference_grads(&[x.clone(), w.clone(), b.clone()], &|t| {
            layer_norm::reference(&t[0], &t[1], &t[2], 1e-5).unwrap()
        });
        let db = up(&gpu, &b);
        let forward = gpu.layer_norm(&dx, &dw, &db, shape, 1e-5).unwrap();
        assert_close(
            &what,
            &down(&gpu, &forward.output, &[rows, cols]),
            &out,
            2e-5,
        );
        let g = gpu
            .layer_norm_backward(&up(&gpu, &upstream), &dx, &dw, &forward, shape)
            .unwrap();
        assert_close(
            &what,
            &down(&gpu, &g.input, &[rows, cols]),
            &grads[0],
            input_tolerance,
        );
        assert_close(
            &what,
            &down(&gpu, &g.weight, &[cols]),
            &grads[1],
            input_tolerance,
        );
        assert_close(
            &what,
            &down(&gpu, g.bias.as_ref().unwrap(), &[cols]),
            &grads[2],
            2e-5,
        );
    }
}

#[test]
fn cuda_gated_activations_match_reference() {
    let Some(gpu) = gpu("cuda_gated_activations_match_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    for n in [1, 7, 1000, 100_003] {
        let gate = random(&mut rng, &[n], 6.0);
        let upv = random(&mut rng, &[n], 2.0);
        for activation in [GateActivation::Silu, GateActivation::GeluTanh] {
            let what = format!("glu {activation:?} {n}");
            let (out, grads, upstream) = reference_grads(&[gate.clone(), upv.clone()], &|t| {
                glu::reference(&t[0], &t[1], activation).unwrap()
            });
            let (dg, du) = (up(&gpu, &gate), up(&gpu, &upv));
            let result = gpu.gated(&dg, &du, activation).unwrap();
            assert_close(&what, &down(&gpu, &result, &[n]), &out, 2e-5);
            let (gg, gu) = gpu
                .gated_backward(&up(&gpu, &upstream), &dg, &du, activation)
                .unwrap();
            assert_close(&what, &down(&gpu, &gg, &[n]), &grads[0], 2e-5);
            assert_close(&what, &down(&gpu, &gu, &[n]), &grads[1], 2e-5);
        }
    }
}

#[test]
fn cuda_rope_rotates_q_and_k_like_the_reference() {
    let Some(gpu) = gpu("cuda_rope_rotates_q_and_k_like_the_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    for (batch, len, q_heads, k_heads, head_dim) in [
        (1, 1, 1, 1, 2),
        (2, 5, 4, 2, 8),
        (3, 17, 9, 3, 64),
        (1, 129, 2, 2, 6),
    ] {
        for per_row in [false, true] {
            let table: &[usize] = if per_row {
                &[batch, len, head_dim]
            } else {
                &[len, head_dim]
            };
            let cos = random(&mut rng, table, 1.0);
            let sin = random(&mut rng, table, 1.0);
            let q = random(&mut rng, &[batch, len, q_heads, head_dim], 1.0);
            let k = random(&mut rng, &[batch, len, k_heads, head_dim], 1.0);
            let shape = RopeShape {
                batch,
                len,
                q_heads,
                k_heads,
                head_dim,
                per_row,
            };
            let what = format!("rope {shape:?}");
            let (q_ref, q_grads, q_up) = reference_grads(std::slice::from_ref(&q), &|t| {
                rope::reference(&t[0], &cos, &sin).unwrap()
            });
            let (k_ref, k_grads, k_up) = reference_grads(std::slice::from_ref(&k), &|t| {
                rope::reference(&t[0], &cos, &sin).unwrap()
            });
            let (dcos, dsin) = (up(&gpu, &cos), up(&gpu, &sin));
            let (qo, ko) = gpu
                .rope(&up(&gpu, &q), &up(&gpu, &k), &dcos, &dsin, shape)
                .unwrap();
            assert_close(&what, &down(&gpu, &qo, q.dims()), &q_ref, 2e-5);
            assert_close(&what, &down(&gpu, &ko, k.dims()), &k_ref, 2e-5);
            let (qg, kg) = gpu
                .rope_backward(&up(&gpu, &q_up), &up(&gpu, &k_up), &dcos, &dsin, shape)
                .unwrap();
            assert_close(&what, &down(&gpu, &qg, q.dims()), &q_grads[0], 2e-5);
            assert_close(&what, &down(&gpu, &kg, k.dims()), &k_grads[0], 2e-5);
        }
    }
}

#[test]
fn cuda_cross_entropy_matches_reference() {
    let Some(gpu) = gpu("cuda_cross_entropy_matches_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(34);
    for (i, &(rows, _, vocab, ignore_every)) in HEAD_SHAPES.iter().enumerate() {
        for options in loss_options() {
            let logits = random(&mut rng, &[rows, vocab], 8.0);
            let targets = targets(&mut rng, rows, vocab, ignore_every);
            let what = format!("cross_entropy {rows}x{vocab} {options:?}");
            let (loss, grads, _) = reference_grads(std::slice::from_ref(&logits), &|t| {
                token_loss::reference_from_logits(&t[0], &targets, &options).unwrap()
            });
            let mut values = up(&gpu, &logits);
            let scale = if i % 2 == 0 { 1.0 } else { 0.25 };
            let gpu_loss = gpu
                .cross_entropy(&mut values, &targets, vocab, &options, scale)
                .unwrap();
            let expected = loss.to_scalar::<f32>().unwrap();
            assert!(
                (gpu_loss - expected).abs() <= 2e-5 * expected.abs().max(1.0),
                "{what}: loss {gpu_loss} against {expected}"
            );
            let expected_grad = (&grads[0] * scale as f64).unwrap();
            assert_close(
                &what,
                &down(&gpu, &values, &[rows, vocab]),
                &expected_grad,
                2e-5,
            );
        }
    }
}

/// Checks a head loss and its gradients (with and without the weight's) against the
/// reference.
fn check_head(
    what: &str,
    gpu: &Gpu,
    (hidden, weight, targets, options): (&Tensor, &Tensor, &[i64], &LossOptions),
    run: &dyn Fn(bool) -> axl_kernels::cuda::HeadLoss,
) {
    let (loss, grads, _) = reference_grads(&[hidden.clone(), weight.clone()], &|t| {
        token_loss::reference(&t[0], &t[1], targets, options).unwrap()
    });
    let expected = loss.to_scalar::<f32>().unwrap();
    for weight_grad in [true, false] {
        let result = run(weight_grad);
        assert!(
            (result.loss - expected).abs() <= 1e-4 * expected.abs().max(1.0),
            "{what}: loss {} against {expected}",
            result.loss
        );
        assert_close(
            what,
            &down(gpu, &result.hidden_grad, hidden.dims()),
            &grads[0],
            1e-4,
        );
        match result.weight_grad {
            Some(g) => {
                assert!(weight_grad, "{what}: a weight gradient nobody asked for");
                assert_close(what, &down(gpu, &g, weight.dims()), &grads[1], 1e-4);
            }
            None => assert!(!weight_grad, "{what}: no weight gradient"),
        }
    }
}

/// A head loss's inputs, on the host and on the GPU.
struct HeadCase {
    shape: HeadShape,
    hidden: Tensor,
    weight: Tensor,
    targets: Vec<i64>,
    dh: CudaSlice<f32>,
    dw: CudaSlice<f32>,
}

/// Random inputs (seeded by `seed`) for the CPU tests' head shapes and one of SmolLM2's
/// vocabulary.
fn head_cases(gpu: &Gpu, seed: u64) -> Vec<HeadCase> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut shapes = HEAD_SHAPES.to_vec();
    shapes.push((96, 64, 49152, 6));
    shapes
        .into_iter()
        .map(|(rows, features, vocab, ignore_every)| {
            let hidden = random(&mut rng, &[rows, features], 1.0);
            let weight = random(&mut rng, &[vocab, features], 0.5);
            let targets = targets(&mut rng, rows, vocab, ignore_every);
            let (dh, dw) = (up(gpu, &hidden), up(gpu, &weight));
            let shape = HeadShape {
                rows,
                features,
                vocab,
            };
            HeadCase {
                shape,
                hidden,
                weight,
                targets,
                dh,
                dw,
            }
        })
        .collect()
}

#[test]
fn cuda_fused_linear_cross_entropy_matches_reference() {
    let Some(gpu) = gpu("cuda_fused_linear_cross_entropy_matches_reference") else {
        return;
    };
    for (i, case) in head_cases(&gpu, 35).into_iter().enumerate() {
        let options = loss_options()[i % loss_options().len()];
        let HeadCase {
            shape,
            hidden,
            weight,
            targets,
            dh,
            dw,
        } = case;
        for chunk_rows in [None, Some(1), Some(5)] {
            let settings = fused_linear_cross_entropy::Settings {
                precision: Precision::F32,
                chunk_rows,
            };
            check_head(
                &format!("fused_linear_cross_entropy {shape:?} {options:?} {chunk_rows:?}"),
                &gpu,
                (&hidden, &weight, &targets, &options),
                &|weight_grad| {
                    gpu.fused_linear_cross_entropy(
                        &dh,
                        &dw,
                        &targets,
                        shape,
                        &options,
                        settings,
                        weight_grad,
                    )
                    .unwrap()
                },
            );
        }
    }
}

#[test]
fn cuda_cut_cross_entropy_matches_reference() {
    let Some(gpu) = gpu("cuda_cut_cross_entropy_matches_reference") else {
        return;
    };
    for (i, case) in head_cases(&gpu, 36).into_iter().enumerate() {
        let options = loss_options()[(i + 3) % loss_options().len()];
        let HeadCase {
            shape,
            hidden,
            weight,
            targets,
            dh,
            dw,
        } = case;
        for (token_block, vocab_block) in [(512, 2048), (3, 7), (16, 300)] {
            let settings = cut_cross_entropy::Settings {
                token_block,
                vocab_block,
                ..Default::default()
            };
            check_head(
                &format!(
                    "cut_cross_entropy {shape:?} {options:?} blocks {token_block}x{vocab_block}"
                ),
                &gpu,
                (&hidden, &weight, &targets, &options),
                &|weight_grad| {
                    let forward = gpu
                        .cut_cross_entropy(&dh, &dw, &targets, shape, &options, settings)
                        .unwrap();
                    gpu.cut_cross_entropy_backward(&forward, &dh, &dw, 1.0, weight_grad)
                        .unwrap()
                },
            );
        }
    }
}

#[test]
fn cuda_adamw_matches_the_cpu_update_over_steps() {
    let Some(gpu) = gpu("cuda_adamw_matches_the_cpu_update_over_steps") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    let n = 100_003;
    let values = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    };
    let mut param = values(&mut rng);
    let (mut first, mut second) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut gpu_param = gpu.upload(&param).unwrap();
    let mut gpu_first = gpu.upload(&first).unwrap();
    let mut gpu_second = gpu.upload(&second).unwrap();
    for step in 1..=4 {
        let h = AdamWStep {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            lr: 1e-3,
            weight_decay: 0.01,
            step,
        };
        let grad = values(&mut rng);
        adamw::update(&h, &mut param, &grad, &mut first, &mut second);
        let gpu_grad = gpu.upload(&grad).unwrap();
        gpu.adamw(
            &h,
            &mut gpu_param,
            &gpu_grad,
            &mut gpu_first,
            &mut gpu_second,
        )
        .unwrap();
    }
    for (name, cpu, gpu_values) in [
        ("parameter", &param, &gpu_param),
        ("first moment", &first, &gpu_first),
        ("second moment", &second, &gpu_second),
    ] {
        let on_gpu = gpu.download(gpu_values).unwrap();
        let largest = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = cpu
            .iter()
            .zip(&on_gpu)
            .map(|(a, b)| (a - b).abs() / largest)
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "adamw {name}: differs by {worst}");
    }
}
