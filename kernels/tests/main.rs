//! Each fused op against its reference composition of candle primitives: values and the
//! gradients of every input, over many shapes (odd sizes, one token, grouped heads, packed
//! rows, windows, soft caps).

use std::sync::Arc;

use axl_kernels::attention::{self, CausalMask, Scores};
use axl_kernels::cross_entropy::{self, IGNORE_INDEX};
use axl_kernels::glu::{self, GateActivation};
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
            &[q, k, v],
            &|t| attention::causal_attention(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
            &|t| attention::reference(&t[0], &t[1], &t[2], &mask, scores).unwrap(),
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
    for (leading, vocab) in [
        (vec![1], 1),
        (vec![3], 5),
        (vec![67], 1000),
        (vec![3, 3], 49152),
    ] {
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
            &format!("cross_entropy {leading:?}x{vocab}"),
            &[logits],
            &|t| cross_entropy::cross_entropy_sum(&t[0], &targets).unwrap(),
            &|t| cross_entropy::reference(&t[0], &targets).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn cross_entropy_rejects_labels_outside_the_vocabulary() {
    let logits = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = cross_entropy::cross_entropy_sum(&logits, &[1, 4]).unwrap_err();
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
