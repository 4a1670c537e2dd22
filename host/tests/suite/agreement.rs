//! Agreement with transformers: logits, loss and the gradient of the loss with respect to
//! every parameter, for every supported architecture, against fixtures transformers saved.

use axl::model::{ops, CausalLm, LoadOptions};
use candle_core::DType;

use super::common::{fixture, get, max_abs_diff, reference, relative_error};

const LOGIT_TOLERANCE: f32 = 1e-4;
const GRAD_TOLERANCE: f32 = 1e-4;

fn check_architecture(name: &str) {
    let options = LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    };
    let model = CausalLm::load(&fixture(name), &options).unwrap();
    let refs = reference(name);
    let input_ids = get(&refs, "input_ids");
    let labels = get(&refs, "labels");
    let logits = model.forward(&input_ids, None).unwrap();
    let logit_diff = max_abs_diff(&logits, &get(&refs, "logits"));
    assert!(
        logit_diff <= LOGIT_TOLERANCE,
        "{name}: logits differ by {logit_diff}"
    );

    let loss = ops::causal_lm_loss(&logits, &labels).unwrap();
    let mean = loss.mean().unwrap();
    let expected = get(&refs, "loss").to_vec1::<f32>().unwrap()[0];
    let got = mean.to_scalar::<f32>().unwrap();
    assert!(
        (got - expected).abs() <= LOGIT_TOLERANCE,
        "{name}: loss {got} vs transformers {expected}"
    );

    let grads = mean.backward().unwrap();
    let params = model.trainable_params();
    let mut reference_names: Vec<String> = refs
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("grad.").map(str::to_string))
        .collect();
    let mut names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    reference_names.sort();
    names.sort();
    assert_eq!(
        names, reference_names,
        "{name}: parameter sets differ from transformers'"
    );
    for (param, var) in &params {
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient reached {param}"));
        assert_eq!(grad.dtype(), DType::F32);
        let err = relative_error(grad, &get(&refs, &format!("grad.{param}")));
        assert!(
            err <= GRAD_TOLERANCE,
            "{name}: gradient of {param} differs (relative error {err})"
        );
    }
}

#[test]
fn llama_with_llama3_rope_scaling_and_tied_embeddings_matches_transformers() {
    check_architecture("llama");
}

#[test]
fn llama_with_linear_rope_from_sharded_bf16_weights_matches_transformers() {
    check_architecture("llama_linear_bf16_sharded");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check_architecture("mistral");
}

#[test]
fn qwen2_with_qkv_bias_matches_transformers() {
    check_architecture("qwen2");
}

#[test]
fn qwen3_with_qk_norm_matches_transformers() {
    check_architecture("qwen3");
}

#[test]
fn gemma2_matches_transformers() {
    check_architecture("gemma2");
}
