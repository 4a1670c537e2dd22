//! Generation with the KV cache: each step's logits equal those of a full forward pass over
//! the whole prefix, for every architecture (sliding windows shorter than the text included).

use axl::model::generate::{Decoder, SamplingParams, StopReason};
use axl::model::{CausalLm, LoadOptions};
use candle_core::{Device, Tensor};

use super::common::{fixture, max_abs_diff};

const IDS: [u32; 12] = [5, 17, 250, 3, 99, 42, 7, 128, 64, 300, 11, 2];

#[test]
fn cached_decoding_matches_full_forward_for_every_architecture() {
    for name in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "llama_linear_bf16_sharded",
    ] {
        let model = CausalLm::load(&fixture(name), &LoadOptions::default()).unwrap();
        let full = model
            .forward(
                &Tensor::new(&IDS[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        let mut decoder = Decoder::new(&model, 0);
        let prompt = 4;
        let mut steps = vec![decoder.feed(&IDS[..prompt]).unwrap()];
        for id in &IDS[prompt..] {
            steps.push(decoder.feed(&[*id]).unwrap());
        }
        for (i, logits) in steps.iter().enumerate() {
            let position = prompt - 1 + i;
            let expected = full.get(0).unwrap().get(position).unwrap();
            let got = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
            let diff = max_abs_diff(&got, &expected);
            assert!(
                diff <= 1e-4,
                "{name}: cached logits at position {position} differ by {diff}"
            );
        }
        assert_eq!(decoder.position(), IDS.len());
    }
}

#[test]
fn greedy_generation_is_deterministic_and_stops_at_the_limit_or_a_stop_id() {
    let model = CausalLm::load(&fixture("qwen2"), &LoadOptions::default()).unwrap();
    let params = SamplingParams {
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    let run = |stop: &[u32]| {
        let mut streamed = vec![];
        let out = Decoder::new(&model, 0)
            .generate(&IDS[..5], &params, stop, &mut |id| {
                streamed.push(id);
                true
            })
            .unwrap();
        assert_eq!(out.0, streamed);
        out
    };
    let (first, reason) = run(&[]);
    assert_eq!((first.len(), reason), (6, StopReason::Length));
    assert_eq!(run(&[]).0, first);
    let (stopped, reason) = run(&[first[2]]);
    assert_eq!(reason, StopReason::Stop);
    assert_eq!(
        stopped,
        first[..first.iter().position(|t| *t == first[2]).unwrap()]
    );

    let sampled = SamplingParams {
        do_sample: true,
        temperature: 0.8,
        top_p: 0.9,
        top_k: 20,
        repetition_penalty: 1.1,
        ..params.clone()
    };
    let a = Decoder::new(&model, 7)
        .generate(&IDS[..5], &sampled, &[], &mut |_| true)
        .unwrap()
        .0;
    let b = Decoder::new(&model, 7)
        .generate(&IDS[..5], &sampled, &[], &mut |_| true)
        .unwrap()
        .0;
    assert_eq!(a, b, "the same seed samples the same tokens");
}
