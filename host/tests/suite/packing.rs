//! Sample packing: first-fit-decreasing bins, and a packed batch computing exactly what its
//! examples compute unpacked — the same loss and the same gradients.

use axl::data::example::Tokenized;
use axl::data::packing::{pack_first_fit_decreasing, packing_efficiency, Batch};
use axl::model::{ops, CausalLm, LoadOptions};
use candle_core::{Device, Tensor};

use super::common::{fixture, relative_error};

#[test]
fn first_fit_decreasing_fills_bins_and_reports_efficiency() {
    let lengths = [5, 9, 3, 7, 2, 6];
    let bins = pack_first_fit_decreasing(&lengths, 12);
    let mut all: Vec<usize> = bins.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3, 4, 5], "every example packed once");
    for bin in &bins {
        assert!(bin.iter().map(|&i| lengths[i]).sum::<usize>() <= 12);
    }
    assert_eq!(bins[0][0], 1, "the longest example opens the first bin");
    assert_eq!(bins.len(), 3);
    let eff = packing_efficiency(&lengths, &bins, 12);
    assert!((eff - 32.0 / 36.0).abs() < 1e-12);
}

fn examples() -> Vec<Tokenized> {
    let lengths = [5usize, 9, 3, 7, 6];
    let mut state = 17u32;
    lengths
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) % 300
                })
                .collect();
            let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            labels[0] = -100;
            if n > 4 {
                labels[1] = -100;
            }
            Tokenized {
                input_ids: ids,
                labels,
                fields: None,
            }
        })
        .collect()
}

fn check(name: &str) {
    let options = LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    };
    let model = CausalLm::load(&fixture(name), &options).unwrap();
    let device = Device::Cpu;
    let examples = examples();

    let mut unpacked_sum: Option<Tensor> = None;
    let mut unpacked_count = 0;
    for e in &examples {
        let (ids, labels) = Batch::padded(&[e], 0, None).tensors(&device).unwrap();
        let loss = ops::causal_lm_loss(&model.forward(&ids, None).unwrap(), &labels).unwrap();
        unpacked_count += loss.count;
        unpacked_sum = Some(match unpacked_sum {
            None => loss.sum,
            Some(s) => (s + loss.sum).unwrap(),
        });
    }
    let unpacked = (unpacked_sum.unwrap() / unpacked_count as f64).unwrap();

    let lengths: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let bins = pack_first_fit_decreasing(&lengths, 16);
    assert!(bins.len() < examples.len(), "something was packed together");
    let mut packed_sum: Option<Tensor> = None;
    let mut packed_count = 0;
    for bin in &bins {
        let members: Vec<&Tokenized> = bin.iter().map(|&i| &examples[i]).collect();
        let batch = Batch::packed(&members, 0, Some(16));
        let (ids, labels) = batch.tensors(&device).unwrap();
        let hidden = model
            .hidden_states_packed(&ids, batch.layout.as_ref().unwrap())
            .unwrap();
        let loss = ops::causal_lm_loss(&model.logits(&hidden).unwrap(), &labels).unwrap();
        packed_count += loss.count;
        packed_sum = Some(match packed_sum {
            None => loss.sum,
            Some(s) => (s + loss.sum).unwrap(),
        });
    }
    let packed = (packed_sum.unwrap() / packed_count as f64).unwrap();
    assert_eq!(
        packed_count, unpacked_count,
        "{name}: the same tokens are trained"
    );
    let (a, b) = (
        packed.to_scalar::<f32>().unwrap(),
        unpacked.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b.abs(),
        "{name}: packed loss {a} vs unpacked {b}"
    );

    let (ga, gb) = (packed.backward().unwrap(), unpacked.backward().unwrap());
    for (param, var) in model.trainable_params() {
        let err = relative_error(ga.get(&var).unwrap(), gb.get(&var).unwrap());
        assert!(
            err <= 1e-4,
            "{name}: gradient of {param} differs packed vs unpacked ({err})"
        );
    }
}

#[test]
fn packed_batch_gives_the_loss_and_gradients_of_its_examples_unpacked() {
    // gemma2 and mistral have sliding windows shorter than some examples.
    for name in ["llama", "gemma2", "mistral", "qwen3"] {
        check(name);
    }
}
