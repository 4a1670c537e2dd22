//! Each fused op against its reference composition of candle primitives: values and the
//! gradients of every input, over many shapes (odd sizes, one token, grouped heads, packed
//! rows, windows, soft caps).

use std::sync::Arc;

use axl_kernels::attention::{self, CausalMask, Scores};
use axl_kernels::cross_entropy::{self, IGNORE_INDEX};
use axl_kernels::glu::{self, GateActivation};
use axl_kernels::token_loss::LossOptions;
use axl_kernels::{cut_cross_entropy, fused_linear_cross_entropy};
use axl_kernels::{rms_norm, rope, Precision};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

/// Runs `op` with fused and reference implementations on the same inputs, and checks the
/// outputs and the gradients of `Σ out · w` for a random `w` against each other.
fn compare(
    what: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    tolerance: f32,
) {
    let mut results = Vec::new();
    for f in [fused, reference] {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tensors);
        let weights = random(&mut ChaCha8Rng::seed_from_u64(11), out.dims(), 1.0);
        let grads = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .expect("a gradient for every input")
                    .clone()
            })
            .collect();
        results.push((out, grads));
    }
    let ((out, grads), (ref_out, ref_grads)) = (&results[0], &results[1]);
    let diff = max_rel_diff(out, ref_out);
    assert!(diff < tolerance, "{what}: output differs by {diff}");
    for (i, (g, r)) in grads.iter().zip(ref_grads).enumerate() {
        let diff = max_rel_diff(g, r);
        assert!(
            diff < tolerance,
            "{what}: gradient of input {i} differs by {diff}"
        );
    }
}

#[test]
fn attention_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // (batch, len, heads, kv_heads, head_dim, window, softcap, packed)
    let cases = [
        (1, 1, 1, 1, 4, None, None, false),
        (2, 7, 4, 2, 8, None, None, false),
        (1, 65, 3, 1, 16, None, None, false),
        (2, 130, 6, 2, 32, None, None, true),
        (1, 100, 4, 4, 8, Some(17), None, false),
        (2, 70, 2, 1, 8, Some(9), Some(5.0), true),
        (1, 129, 9, 3, 64, None, Some(50.0), false),
    ];
    for (batch, len, heads, kv_heads, dim, window, softcap, packed) in cases {
        let q = random(&mut rng, &[batch, len, heads, dim], 1.5);
        let k = random(&mut rng, &[batch, len, kv_heads, dim], 1.5);
        let v = random(&mut rng, &[batch, len, kv_heads, dim], 1.0);
        let mask = if packed {
            let ids: Vec<Vec<usize>> = (0..batch)
                .map(|b| {
                    let mut id = 0;
                    (0..len)
                        .map(|i| {
                            if i > 0 && (i * (b + 3)) % 23 == 0 {
                                id += 1;
                            }
                            id
                        })
                        .collect()
                })
                .collect();
            CausalMask::packed(&ids, window)
        } else {
            CausalMask::causal(0, window)
        };
        let mask = Arc::new(mask);
        let scores = Scores {
            scale: 1.0 / (dim as f64).sqrt(),
            softcap,
        };
        let what = format!("attention {batch}x{len} heads {heads}/{kv_heads} dim {dim} window {window:?} softcap {softcap:?} packed {packed}");
        compare(
            &what,
            &[q.clone(), k.clone(), v.clone()],
            &|t| attention::causal_attention(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
            &|t| attention::reference(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
            2e-5,
        );
        // The same attention rotating q and k itself, with a table per row when packed.
        let table: &[usize] = if packed {
            &[batch, len, dim]
        } else {
            &[len, dim]
        };
        let angles = random(&mut rng, table, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        compare(
            &format!("{what} with rope"),
            &[q.clone(), k.clone(), v.clone()],
            &|t| {
                attention::causal_attention_with_rope(
                    &t[0],
                    &t[1],
                    &t[2],
                    (&cos, &sin),
                    &mask,
                    scores,
                )
                .unwrap()
            },
            &|t| {
                let q = rope::reference(&t[0], &cos, &sin).unwrap();
                let k = rope::reference(&t[1], &cos, &sin).unwrap();
                attention::reference(&q, &k, &t[2], &mask, scores).unwrap()
            },
            2e-5,
        );
    }
}

#[test]
fn attention_with_past_keys_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (past, len, heads, kv_heads, dim) = (37, 5, 4, 2, 8);
    let q = random(&mut rng, &[1, len, heads, dim], 1.0);
    let k = random(&mut rng, &[1, past + len, kv_heads, dim], 1.0);
    let v = random(&mut rng, &[1, past + len, kv_heads, dim], 1.0);
    for window in [None, Some(8)] {
        let mask = Arc::new(CausalMask::causal(past, window));
        let scores = Scores {
            scale: 0.3,
            softcap: None,
        };
        compare(
            "attention over a cache",
            &[q.clone(), k.clone(), v.clone()],
            &|t| attention::causal_attention(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
            &|t| attention::reference(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
            2e-5,
        );
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (shape, one_plus) in [
        (vec![1, 1, 8], false),
        (vec![3, 17, 33], false),
        (vec![2, 50, 576], true),
        (vec![4, 7, 2, 64], false),
    ] {
        let x = random(&mut rng, &shape, 2.0);
        let w = random(&mut rng, &[*shape.last().unwrap()], 1.0);
        compare(
            &format!("rms_norm {shape:?} one_plus {one_plus}"),
            &[x, w],
            &|t| rms_norm::rms_norm(&t[0], &t[1], 1e-6, one_plus).unwrap(),
            &|t| rms_norm::reference(&t[0], &t[1], 1e-6, one_plus).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn gated_activations_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for activation in [GateActivation::Silu, GateActivation::GeluTanh] {
        for shape in [vec![1, 1, 3], vec![2, 33, 1536], vec![5, 4097]] {
            let gate = random(&mut rng, &shape, 6.0);
            let up = random(&mut rng, &shape, 2.0);
            compare(
                &format!("glu {activation:?} {shape:?}"),
                &[gate, up],
                &|t| glu::gated(&t[0], &t[1], activation).unwrap(),
                &|t| glu::reference(&t[0], &t[1], activation).unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn rope_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (batch, len, heads, dim, per_row) in [
        (1, 1, 1, 2, false),
        (2, 9, 3, 16, false),
        (3, 31, 4, 64, true),
    ] {
        let x = random(&mut rng, &[batch, len, heads, dim], 2.0);
        let table: &[usize] = if per_row {
            &[batch, len, dim]
        } else {
            &[len, dim]
        };
        let angles = random(&mut rng, table, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        compare(
            &format!("rope {batch}x{len} heads {heads} dim {dim} per_row {per_row}"),
            &[x],
            &|t| rope::rope(&t[0], &cos, &sin).unwrap(),
            &|t| rope::reference(&t[0], &cos, &sin).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn cross_entropy_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // Leading dimensions (the rows) and vocabulary.
    for (i, (leading, vocab)) in [
        (vec![1], 1),
        (vec![3], 5),
        (vec![67], 1000),
        (vec![3, 3], 49152),
        (vec![5, 7], 333),
        (vec![9], 64),
    ]
    .into_iter()
    .enumerate()
    {
        let options = loss_options()[i % loss_options().len()];
        let rows: usize = leading.iter().product();
        let logits = random(&mut rng, &[leading.as_slice(), &[vocab]].concat(), 8.0);
        let targets: Vec<i64> = (0..rows)
            .map(|r| {
                if r % 4 == 3 {
                    IGNORE_INDEX
                } else {
                    rng.random_range(0..vocab as i64)
                }
            })
            .collect();
        compare(
            &format!("cross_entropy {leading:?}x{vocab} {options:?}"),
            &[logits],
            &|t| cross_entropy::cross_entropy_sum(&t[0], &targets, &options).unwrap(),
            &|t| cross_entropy::reference(&t[0], &targets, &options).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn cross_entropy_rejects_labels_outside_the_vocabulary() {
    let logits = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err =
        cross_entropy::cross_entropy_sum(&logits, &[1, 4], &LossOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("label 4 is outside the vocabulary of 4"),
        "{err}"
    );
}

#[test]
fn lora_linear_matches_reference() {
    use axl_kernels::lora_linear;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (leading, inp, out, rank, with_mask) in [
        (vec![1], 3, 2, 1, false),
        (vec![37], 64, 48, 8, true),
        (vec![130], 96, 200, 16, false),
        (vec![2, 32], 128, 32, 4, true),
    ] {
        let rows: usize = leading.iter().product();
        let x_dims = [leading.as_slice(), &[inp]].concat();
        let x = random(&mut rng, &x_dims, 1.0);
        let weight = random(&mut rng, &[out, inp], 0.2);
        let a = random(&mut rng, &[rank, inp], 0.3);
        let b = random(&mut rng, &[out, rank], 0.3);
        let mask = with_mask.then(|| {
            let keep: Vec<f32> = (0..rows * inp)
                .map(|_| if rng.random_bool(0.8) { 1.25 } else { 0.0 })
                .collect();
            Tensor::from_vec(keep, x_dims.as_slice(), &Device::Cpu).unwrap()
        });
        compare(
            &format!("lora_linear {leading:?}x{inp} -> {out}, rank {rank}, mask {with_mask}"),
            &[x, a, b],
            &|t| {
                lora_linear::lora_linear(
                    &t[0],
                    &weight,
                    &t[1],
                    &t[2],
                    2.0,
                    mask.as_ref(),
                    Precision::F32,
                )
                .unwrap()
            },
            &|t| lora_linear::reference(&t[0], &weight, &t[1], &t[2], 2.0, mask.as_ref()).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn linear_matches_reference() {
    use axl_kernels::linear;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Leading dimensions (the rows, here also `[batch, len]`), input and output features.
    for (leading, inp, out) in [
        (vec![1], 1, 1),
        (vec![3], 17, 5),
        (vec![130], 64, 200),
        (vec![2, 65], 64, 200),
        (vec![512], 96, 33),
    ] {
        let x = random(&mut rng, &[leading.as_slice(), &[inp]].concat(), 1.0);
        let w = random(&mut rng, &[out, inp], 0.5);
        compare(
            &format!("linear {leading:?}x{inp} -> {out}"),
            &[x, w],
            &|t| linear::linear(&t[0], &t[1], Precision::F32).unwrap(),
            &|t| linear::reference(&t[0], &t[1]).unwrap(),
            1e-5,
        );
    }
}

/// The public product, in every layout and precision, against candle's matmul of the same
/// operands (bf16: of the operands rounded to bf16).
#[test]
fn matmul_product_matches_candle_in_every_layout() {
    use axl_kernels::matmul::{product, Layout};
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (m, n, k) in [(1, 1, 1), (33, 70, 45), (100, 40, 300)] {
        let a = random(&mut rng, &[m, k], 1.0);
        let b = random(&mut rng, &[k, n], 1.0);
        for precision in [Precision::F32, Precision::Bf16] {
            let rounded = |t: &Tensor| match precision {
                Precision::Bf16 if Precision::bf16_available() && m.min(n).min(k) >= 32 => {
                    bf16_rounded(t)
                }
                _ => t.clone(),
            };
            let expected = rounded(&a).matmul(&rounded(&b)).unwrap();
            for (a_layout, b_layout) in [
                (Layout::Rows, Layout::Rows),
                (Layout::Transposed, Layout::Rows),
                (Layout::Rows, Layout::Transposed),
                (Layout::Transposed, Layout::Transposed),
            ] {
                let data = |t: &Tensor, layout| {
                    let t = if layout == Layout::Transposed {
                        t.t().unwrap()
                    } else {
                        t.clone()
                    };
                    t.contiguous()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let mut dst = vec![f32::NAN; m * n];
                product(
                    precision,
                    m,
                    n,
                    k,
                    &data(&a, a_layout),
                    a_layout,
                    &data(&b, b_layout),
                    b_layout,
                    &mut dst,
                );
                let got = Tensor::from_vec(dst, (m, n), &Device::Cpu).unwrap();
                let diff = max_rel_diff(&got, &expected);
                assert!(
                    diff < 1e-5,
                    "{m}x{n}x{k} {precision:?} {a_layout:?} {b_layout:?}: {diff}"
                );
            }
        }
    }
}

#[test]
fn frozen_linear_matches_reference_and_leaves_the_weight_without_gradient() {
    use axl_kernels::linear;
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for (leading, inp, out) in [(vec![1], 1, 1), (vec![33], 64, 130), (vec![4, 128], 96, 7)] {
        let x = random(&mut rng, &[leading.as_slice(), &[inp]].concat(), 1.0);
        let w = Var::from_tensor(&random(&mut rng, &[out, inp], 0.5)).unwrap();
        compare(
            &format!("frozen linear {leading:?}x{inp} -> {out}"),
            std::slice::from_ref(&x),
            &|t| linear::frozen(&t[0], w.as_tensor(), Precision::F32).unwrap(),
            &|t| linear::reference(&t[0], &w.as_tensor().detach()).unwrap(),
            1e-5,
        );
        let xv = Var::from_tensor(&x).unwrap();
        let grads = linear::frozen(xv.as_tensor(), w.as_tensor(), Precision::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the frozen weight gets no gradient"
        );
    }
}

/// `x` rounded to bf16 and back: what a bf16 product reads of it.
fn bf16_rounded(x: &Tensor) -> Tensor {
    x.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// In bf16 the linear ops round their inputs and nothing else: on inputs that bf16 holds
/// exactly they give the f32 result, on others they differ from it by bf16's rounding, and
/// their gradients are within bf16's precision of the reference's.
#[test]
fn linear_ops_in_bf16_round_only_their_inputs() {
    use axl_kernels::{linear, lora_linear};
    if !Precision::bf16_available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    let bf16 = Precision::Bf16;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (rows, inp, out) in [(64, 96, 130), (130, 64, 33), (300, 350, 40)] {
        let x = random(&mut rng, &[rows, inp], 1.0);
        let w = random(&mut rng, &[out, inp], 0.5);
        let (a, b) = (
            random(&mut rng, &[8, inp], 0.3),
            random(&mut rng, &[out, 8], 0.3),
        );
        let lora = |x: &Tensor, a: &Tensor, b: &Tensor, w: &Tensor, precision| {
            lora_linear::lora_linear(x, w, a, b, 2.0, None, precision).unwrap()
        };
        let what = format!("{rows}x{inp} -> {out}");
        type LinearOp<'a> = &'a dyn Fn(&[Tensor], Precision) -> Tensor;
        let ops: [(&str, LinearOp); 3] = [
            ("linear", &|t, p| linear::linear(&t[0], &t[1], p).unwrap()),
            ("frozen", &|t, p| linear::frozen(&t[0], &t[1], p).unwrap()),
            ("lora", &|t, p| lora(&t[0], &t[2], &t[3], &t[1], p)),
        ];
        for (name, op) in ops {
            let inputs = [x.clone(), w.clone(), a.clone(), b.clone()];
            let exact: Vec<Tensor> = inputs.iter().map(bf16_rounded).collect();
            let diff = max_rel_diff(&op(&exact, bf16), &op(&exact, Precision::F32));
            assert!(diff < 1e-5, "{name} {what} on bf16 inputs: {diff}");
            let diff = max_rel_diff(&op(&inputs, bf16), &op(&inputs, Precision::F32));
            assert!(
                diff > 1e-5 && diff < 1e-2,
                "{name} {what}: bf16 off f32 by {diff}"
            );
        }
        compare(
            &format!("linear in bf16 {what}"),
            &[x.clone(), w.clone()],
            &|t| linear::linear(&t[0], &t[1], bf16).unwrap(),
            &|t| linear::reference(&t[0], &t[1]).unwrap(),
            1e-2,
        );
        compare(
            &format!("frozen linear in bf16 {what}"),
            std::slice::from_ref(&x),
            &|t| linear::frozen(&t[0], &w, bf16).unwrap(),
            &|t| linear::reference(&t[0], &w).unwrap(),
            1e-2,
        );
        compare(
            &format!("lora_linear in bf16 {what}"),
            &[x, a, b],
            &|t| lora(&t[0], &t[1], &t[2], &w, bf16),
            &|t| lora_linear::reference(&t[0], &w, &t[1], &t[2], 2.0, None).unwrap(),
            1e-2,
        );
    }
}

/// The attention backward pass sums each key's gradient over many parallel tasks; the sum
/// must not depend on which task finishes first.
#[test]
fn attention_gradients_are_the_same_on_every_run() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let q = Var::from_tensor(&random(&mut rng, &[2, 300, 6, 16], 1.0)).unwrap();
    let k = Var::from_tensor(&random(&mut rng, &[2, 300, 2, 16], 1.0)).unwrap();
    let v = Var::from_tensor(&random(&mut rng, &[2, 300, 2, 16], 1.0)).unwrap();
    let weights = random(&mut rng, &[2, 300, 6, 16], 1.0);
    let mask = Arc::new(CausalMask::causal(0, None));
    let scores = Scores {
        scale: 0.25,
        softcap: None,
    };
    let run = || {
        let out =
            attention::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scores)
                .unwrap();
        let grads = (out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dk = grads
            .get(k.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let dv = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (dk, dv)
    };
    let first = run();
    for _ in 0..8 {
        assert!(run() == first, "key/value gradients differ between runs");
    }
}

/// The loss forms every cross-entropy kernel is checked in: plain, label smoothing, z-loss,
/// soft-capping, token scaling, and all of them at once.
fn loss_options() -> Vec<LossOptions> {
    let plain = LossOptions::default();
    vec![
        plain,
        LossOptions {
            label_smoothing: 0.1,
            ..plain
        },
        LossOptions {
            z_loss: 1e-3,
            ..plain
        },
        LossOptions {
            softcap: Some(3.0),
            ..plain
        },
        LossOptions {
            token_scaling: true,
            ..plain
        },
        LossOptions {
            label_smoothing: 0.2,
            z_loss: 1e-2,
            softcap: Some(5.0),
            token_scaling: true,
        },
    ]
}

/// Targets for `rows` rows, one in `ignore_every` ignored (none when 0).
fn targets(rng: &mut ChaCha8Rng, rows: usize, vocab: usize, ignore_every: usize) -> Vec<i64> {
    (0..rows)
        .map(|r| {
            if ignore_every > 0 && r % ignore_every == ignore_every - 1 {
                IGNORE_INDEX
            } else {
                rng.random_range(0..vocab as i64)
            }
        })
        .collect()
}

/// Shapes of the head-and-loss kernels: rows, features, vocabulary, and one row in how many
/// ignored. Odd sizes, one token, a vocabulary that is not a multiple of any block, every row
/// ignored.
const HEAD_SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 8, 5, 0),
    (7, 16, 33, 3),
    (33, 24, 1000, 4),
    (64, 32, 2049, 0),
    (17, 13, 4099, 2),
    (5, 8, 40, 1),
    (130, 20, 300, 5),
];

#[test]
fn fused_linear_cross_entropy_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (i, &(rows, features, vocab, ignore_every)) in HEAD_SHAPES.iter().enumerate() {
        let options = loss_options()[i % loss_options().len()];
        let hidden = random(&mut rng, &[rows, features], 1.0);
        let weight = random(&mut rng, &[vocab, features], 0.5);
        let targets = targets(&mut rng, rows, vocab, ignore_every);
        for chunk_rows in [None, Some(1), Some(5)] {
            let settings = fused_linear_cross_entropy::Settings {
                precision: Precision::F32,
                chunk_rows,
            };
            compare(
                &format!("fused_linear_cross_entropy {rows}x{features}x{vocab} {options:?} {chunk_rows:?}"),
                &[hidden.clone(), weight.clone()],
                &|t| {
                    fused_linear_cross_entropy::fused_linear_cross_entropy(
                        &t[0], &t[1], &targets, &options, settings,
                    )
                    .unwrap()
                },
                &|t| axl_kernels::token_loss::reference(&t[0], &t[1], &targets, &options).unwrap(),
                2e-5,
            );
        }
    }
}

#[test]
fn cut_cross_entropy_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for (i, &(rows, features, vocab, ignore_every)) in HEAD_SHAPES.iter().enumerate() {
        let options = loss_options()[(i + 3) % loss_options().len()];
        let hidden = random(&mut rng, &[rows, features], 1.0);
        let weight = random(&mut rng, &[vocab, features], 0.5);
        let targets = targets(&mut rng, rows, vocab, ignore_every);
        for (token_block, vocab_block) in [(512, 2048), (3, 7), (16, 300)] {
            let settings = cut_cross_entropy::Settings {
                token_block,
                vocab_block,
                ..Default::default()
            };
            compare(
                &format!("cut_cross_entropy {rows}x{features}x{vocab} {options:?} blocks {token_block}x{vocab_block}"),
                &[hidden.clone(), weight.clone()],
                &|t| {
                    cut_cross_entropy::cut_cross_entropy(&t[0], &t[1], &targets, &options, settings)
                        .unwrap()
                },
                &|t| axl_kernels::token_loss::reference(&t[0], &t[1], &targets, &options).unwrap(),
                2e-5,
            );
        }
    }
}

/// With a frozen weight (not a variable), the fused head kernels give the hidden states the
/// reference's gradient and make none for the weight; a detached input gives the value alone.
#[test]
fn head_losses_with_a_frozen_weight_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (rows, features, vocab) = (19, 12, 777);
    let weight = random(&mut rng, &[vocab, features], 0.5);
    let hidden = random(&mut rng, &[rows, features], 1.0);
    let targets = targets(&mut rng, rows, vocab, 3);
    let options = LossOptions::default();
    type Kernel<'a> = &'a dyn Fn(&Tensor) -> Tensor;
    let kernels: [(&str, Kernel); 3] = [
        ("flce", &|h| {
            fused_linear_cross_entropy::fused_linear_cross_entropy(
                h,
                &weight,
                &targets,
                &options,
                Default::default(),
            )
            .unwrap()
        }),
        ("cce", &|h| {
            cut_cross_entropy::cut_cross_entropy(h, &weight, &targets, &options, Default::default())
                .unwrap()
        }),
        ("reference", &|h| {
            axl_kernels::token_loss::reference(h, &weight.detach(), &targets, &options).unwrap()
        }),
    ];
    let mut results = Vec::new();
    for (name, kernel) in kernels {
        let var = Var::from_tensor(&hidden).unwrap();
        let loss = kernel(var.as_tensor());
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&weight).is_none(),
            "{name}: the frozen weight got a gradient"
        );
        let value = kernel(&hidden.detach()).to_scalar::<f32>().unwrap();
        results.push((name, value, grads.get(var.as_tensor()).unwrap().clone()));
    }
    let (_, ref_value, ref_grad) = results.pop().unwrap();
    for (name, value, grad) in results {
        assert!(
            (value - ref_value).abs() <= 1e-5 * ref_value.abs(),
            "{name}: {value} vs {ref_value}"
        );
        let diff = max_rel_diff(&grad, &ref_grad);
        assert!(diff < 2e-5, "{name}: gradient differs by {diff}");
    }
}

/// The loss forms against values worked out by hand for one row of three logits, so that the
/// reference composition itself is checked: `z = (1, 2, 3)`, target 0.
#[test]
fn loss_forms_match_hand_computed_values() {
    let logits = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap();
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let plain = LossOptions::default();
    let cases = [
        (plain, lse - 1.0),
        (
            LossOptions {
                label_smoothing: 0.3,
                ..plain
            },
            0.7 * (lse - 1.0) + 0.3 * (lse - 2.0),
        ),
        (
            LossOptions {
                z_loss: 0.01,
                ..plain
            },
            lse - 1.0 + 0.01 * lse * lse,
        ),
        (
            LossOptions {
                token_scaling: true,
                ..plain
            },
            (lse - 1.0) * (1.0 - lse).exp(),
        ),
    ];
    for (options, expected) in cases {
        for got in [
            cross_entropy::reference(&logits, &[0], &options).unwrap(),
            cross_entropy::cross_entropy_sum(&logits, &[0], &options).unwrap(),
        ] {
            let got = got.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got - expected).abs() < 1e-5,
                "{options:?}: {got} vs {expected}"
            );
        }
    }
    let capped = LossOptions {
        softcap: Some(2.0),
        ..plain
    };
    let z: Vec<f64> = [1f64, 2.0, 3.0]
        .iter()
        .map(|v| 2.0 * (v / 2.0).tanh())
        .collect();
    let expected = z.iter().map(|v| v.exp()).sum::<f64>().ln() - z[0];
    let got = cross_entropy::cross_entropy_sum(&logits, &[0], &capped)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (got - expected).abs() < 1e-5,
        "softcap: {got} vs {expected}"
    );
}

/// Gradient filtering skips only what is below its threshold: a threshold above every
/// gradient but the targets' leaves the hidden states' gradient of the target columns alone.
#[test]
fn cut_cross_entropy_filter_skips_negligible_blocks() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (rows, features, vocab) = (8, 16, 4096);
    // Logits peaked on the targets: the other columns' gradients are tiny.
    let weight = random(&mut rng, &[vocab, features], 0.01);
    let hidden = random(&mut rng, &[rows, features], 1.0);
    let targets = targets(&mut rng, rows, vocab, 0);
    let options = LossOptions::default();
    let grad = |filter_eps: Option<f32>| {
        let var = Var::from_tensor(&hidden).unwrap();
        let settings = cut_cross_entropy::Settings {
            filter_eps,
            ..Default::default()
        };
        let loss = cut_cross_entropy::cut_cross_entropy(
            var.as_tensor(),
            &weight,
            &targets,
            &options,
            settings,
        )
        .unwrap();
        loss.backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .clone()
    };
    let exact = grad(Some(0.0));
    let auto = grad(None);
    assert!(max_rel_diff(&auto, &exact) < 1e-5);
    // Every non-target probability is about 1/4096 < 1e-3: with that threshold only the
    // blocks of 256 ids holding a target remain (for all rows of the tile).
    let filtered = grad(Some(1e-3));
    let only_targets = {
        let w = weight.to_vec2::<f32>().unwrap();
        let mut g = vec![vec![0f32; features]; rows];
        let loss_grad = |r: usize| {
            let h = hidden.get(r).unwrap().to_vec1::<f32>().unwrap();
            let logits: Vec<f32> = w
                .iter()
                .map(|row| row.iter().zip(&h).map(|(a, b)| a * b).sum())
                .collect();
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            (logits, max, sum)
        };
        let kept: std::collections::BTreeSet<usize> =
            targets.iter().map(|&t| t as usize / 256).collect();
        for (r, row) in g.iter_mut().enumerate() {
            let (logits, max, sum) = loss_grad(r);
            let t = targets[r] as usize;
            for c in kept
                .iter()
                .flat_map(|b| b * 256..(b * 256 + 256).min(vocab))
            {
                let p = (logits[c] - max).exp() / sum;
                let d = if c == t { p - 1.0 } else { p };
                for (gi, wi) in row.iter_mut().zip(&w[c]) {
                    *gi += d * wi;
                }
            }
        }
        Tensor::new(g, &Device::Cpu).unwrap()
    };
    assert!(max_rel_diff(&filtered, &only_targets) < 1e-4);
    assert!(
        max_rel_diff(&filtered, &exact) > 1e-3,
        "the filter skipped nothing"
    );
    // The filter looks at each row's gradient before the incoming gradient scales it: a mean
    // over many tokens keeps the same blocks.
    let var = Var::from_tensor(&hidden).unwrap();
    let settings = cut_cross_entropy::Settings {
        filter_eps: Some(1e-3),
        ..Default::default()
    };
    let loss = cut_cross_entropy::cut_cross_entropy(
        var.as_tensor(),
        &weight,
        &targets,
        &options,
        settings,
    )
    .unwrap();
    let scaled = (loss * 1e-4).unwrap().backward().unwrap();
    let scaled = (scaled.get(var.as_tensor()).unwrap() * 1e4).unwrap();
    assert!(max_rel_diff(&scaled, &only_targets) < 1e-4);
}

#[test]
fn layer_norm_matches_reference() {
    use axl_kernels::layer_norm;
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for shape in [
        vec![1, 1, 8],
        vec![2, 5, 33],
        vec![3, 17, 64],
        vec![1, 40, 576],
    ] {
        let width = *shape.last().unwrap();
        // An offset mean, so that the variance is not the mean square.
        let x = (random(&mut rng, &shape, 2.0) + 3.0).unwrap();
        let w = random(&mut rng, &[width], 1.0);
        let b = random(&mut rng, &[width], 1.0);
        compare(
            &format!("layer_norm {shape:?}"),
            &[x, w, b],
            &|t| layer_norm::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            &|t| layer_norm::reference(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            2e-5,
        );
    }
}

#[test]
fn fused_adamw_matches_reference_over_steps() {
    use axl_kernels::adamw::{self, AdamWStep};
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    for len in [1usize, 7, 70_001] {
        let to_vec = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let mut param = to_vec(&random(&mut rng, &[len], 1.0));
        let (mut first, mut second) = (vec![0f32; len], vec![0f32; len]);
        let (mut p_ref, mut m_ref, mut v_ref) = (
            Tensor::new(param.as_slice(), &Device::Cpu).unwrap(),
            Tensor::zeros(len, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(len, DType::F32, &Device::Cpu).unwrap(),
        );
        for step in 1..=4 {
            let grad = random(&mut rng, &[len], 0.1);
            let h = AdamWStep {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                lr: 1e-3,
                weight_decay: 0.01,
                step,
            };
            adamw::update(&h, &mut param, &to_vec(&grad), &mut first, &mut second);
            (p_ref, m_ref, v_ref) = adamw::reference(&h, &p_ref, &grad, &m_ref, &v_ref).unwrap();
            for (name, got, want) in [
                ("param", &param, to_vec(&p_ref)),
                ("first", &first, to_vec(&m_ref)),
                ("second", &second, to_vec(&v_ref)),
            ] {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                        "{len} elements, step {step}, {name}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda;
