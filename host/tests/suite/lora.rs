//! LoRA: adapters saved by Python peft load in axl and give peft's logits and gradients;
//! adapters axl saves have PEFT's names and config; merging gives the adapted logits; fresh
//! adapters train only themselves and receive gradients.

use axl::model::lora::{self, LoraSettings, TargetModules};
use axl::model::safetensors_io::{self, SaveDtype};
use axl::model::save;
use axl::model::{ops, CausalLm, LoadOptions};
use candle_core::{DType, Device};
use serde_json::Value;

use super::common::{fixture, get, max_abs, max_abs_diff, reference, relative_error};

fn base(name: &str) -> CausalLm {
    CausalLm::load(&fixture(name), &LoadOptions::default()).unwrap()
}

/// PEFT's parameter name (as `named_parameters` reports it) to axl's.
fn axl_name(peft: &str) -> String {
    peft.trim_start_matches("base_model.model.")
        .replace(".lora_A.default.", ".lora_A.")
        .replace(".lora_B.default.", ".lora_B.")
        .replace(".modules_to_save.default.", ".")
}

fn check_peft_fixture(adapter: &str, base_name: &str) {
    let mut model = base(base_name);
    lora::load_adapter(&mut model, &fixture(adapter), true).unwrap();
    let refs = reference(adapter);
    let logits = model.forward(&get(&refs, "input_ids"), None).unwrap();
    let diff = max_abs_diff(&logits, &get(&refs, "logits"));
    assert!(
        diff <= 1e-4,
        "{adapter}: logits differ from peft's by {diff}"
    );
    let base_logits = base(base_name)
        .forward(&get(&refs, "input_ids"), None)
        .unwrap();
    assert!(
        max_abs_diff(&base_logits, &logits) > 1e-2,
        "{adapter}: the adapter changed nothing"
    );

    let loss = ops::causal_lm_loss(&logits, &get(&refs, "labels"))
        .unwrap()
        .mean()
        .unwrap();
    let expected = get(&refs, "loss").to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - expected).abs() <= 1e-4);
    let grads = loss.backward().unwrap();
    let mut expected_names: Vec<String> = refs
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("grad."))
        .map(axl_name)
        .collect();
    expected_names.sort();
    let trainable = model.trainable_params();
    let mut names: Vec<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        names, expected_names,
        "{adapter}: trainable parameters differ from peft's"
    );
    for (name, var) in &trainable {
        let peft_name = refs
            .names()
            .into_iter()
            .find(|n| n.strip_prefix("grad.").map(axl_name).as_deref() == Some(name.as_str()))
            .unwrap();
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        assert!(max_abs(grad) > 0.0, "{name}: zero gradient");
        let err = relative_error(grad, &get(&refs, &peft_name));
        assert!(
            err <= 1e-4,
            "{adapter}: gradient of {name} differs from peft's (relative {err})"
        );
    }
}

#[test]
fn peft_lora_adapter_gives_peft_logits_loss_and_gradients() {
    check_peft_fixture("peft_llama_lora", "llama");
}

#[test]
fn peft_rslora_adapter_with_layers_to_transform_and_modules_to_save_matches_peft() {
    check_peft_fixture("peft_qwen2_rslora_layers_save", "qwen2");
}

#[test]
fn adapter_saved_by_axl_has_peft_names_config_and_values() {
    for (adapter, base_name) in [
        ("peft_llama_lora", "llama"),
        ("peft_qwen2_rslora_layers_save", "qwen2"),
    ] {
        let mut model = base(base_name);
        let settings = lora::load_adapter(&mut model, &fixture(adapter), false).unwrap();
        let out = tempfile::tempdir().unwrap();
        lora::save_adapter(&model, &settings, out.path(), base_name).unwrap();
        keep_for_python_check(out.path(), &format!("{adapter}_saved_by_axl"));

        let original = safetensors_io::load_file(
            &fixture(adapter).join(lora::ADAPTER_WEIGHTS),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let saved = safetensors_io::load_file(
            &out.path().join(lora::ADAPTER_WEIGHTS),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            saved.names(),
            original.names(),
            "{adapter}: tensor names differ from peft's"
        );
        for name in original.names() {
            assert_eq!(
                max_abs_diff(&get(&saved, &name), &get(&original, &name)),
                0.0,
                "{name}"
            );
        }
        let read = |p: &std::path::Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p.join(lora::ADAPTER_CONFIG)).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (read(out.path()), read(&fixture(adapter)));
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "layers_to_transform",
            "modules_to_save",
            "bias",
        ] {
            assert_eq!(
                ours[key], theirs[key],
                "{adapter}: adapter_config.json key {key}"
            );
        }
        let sorted = |v: &Value| {
            let mut l: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            l.sort();
            l
        };
        assert_eq!(
            sorted(&ours["target_modules"]),
            sorted(&theirs["target_modules"])
        );

        // And what axl saved loads back to the same logits.
        let refs = reference(adapter);
        let mut again = base(base_name);
        lora::load_adapter(&mut again, out.path(), false).unwrap();
        let diff = max_abs_diff(
            &again.forward(&get(&refs, "input_ids"), None).unwrap(),
            &get(&refs, "logits"),
        );
        assert!(
            diff <= 1e-4,
            "{adapter}: reloaded adapter logits differ by {diff}"
        );
    }
}

#[test]
fn merged_model_gives_adapter_logits_and_saves_as_hf_directory() {
    for (adapter, base_name) in [
        ("peft_llama_lora", "llama"),
        ("peft_qwen2_rslora_layers_save", "qwen2"),
    ] {
        let refs = reference(adapter);
        let mut model = base(base_name);
        lora::load_adapter(&mut model, &fixture(adapter), false).unwrap();
        let merged_count = lora::merge(&mut model).unwrap();
        assert!(merged_count > 0);
        assert!(model.trainable_params().is_empty());
        let logits = model.forward(&get(&refs, "input_ids"), None).unwrap();
        let diff = max_abs_diff(&logits, &get(&refs, "logits"));
        assert!(diff <= 1e-4, "{adapter}: merged logits differ by {diff}");

        let out = tempfile::tempdir().unwrap();
        save::save_pretrained(
            &model,
            out.path(),
            Some(&fixture(base_name)),
            SaveDtype::F32,
            40_000,
        )
        .unwrap();
        keep_for_python_check(out.path(), &format!("{adapter}_merged_by_axl"));
        assert!(
            out.path().join("model.safetensors.index.json").is_file(),
            "small shard limit shards"
        );
        assert!(out.path().join("tokenizer.json").is_file());
        let reloaded = CausalLm::load(out.path(), &LoadOptions::default()).unwrap();
        let diff = max_abs_diff(
            &reloaded.forward(&get(&refs, "input_ids"), None).unwrap(),
            &logits,
        );
        assert!(
            diff == 0.0,
            "{adapter}: saved merged model gives other logits ({diff})"
        );
    }
}

/// With `AXL_KEEP_TEST_OUTPUTS=DIR`, copies what a test wrote to `DIR/name`, for
/// `tests/fixtures/verify_with_python.py` to load with peft and transformers.
fn keep_for_python_check(dir: &std::path::Path, name: &str) {
    let Ok(keep) = std::env::var("AXL_KEEP_TEST_OUTPUTS") else {
        return;
    };
    let target = std::path::Path::new(&keep).join(name);
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
}

fn data_ptr(t: &candle_core::Tensor) -> usize {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            cpu.as_slice::<f32>().unwrap()[layout.start_offset()..].as_ptr() as usize
        }
        _ => unreachable!("tests run on CPU"),
    }
}

fn settings(target: TargetModules) -> LoraSettings {
    LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target,
        modules_to_save: vec![],
        use_rslora: false,
        layers_to_transform: None,
    }
}

#[test]
fn fresh_adapter_is_a_no_op_trains_only_itself_and_never_copies_base_weights() {
    let refs = reference("llama");
    let mut model = base("llama");
    let base_q = model.layers[0].self_attn.q_proj.weight.tensor().clone();
    let adapted = lora::attach_new(&mut model, &settings(TargetModules::AllLinear), 0).unwrap();
    assert_eq!(
        adapted.len(),
        2 * 7,
        "every linear of both layers, lm_head excluded"
    );
    let q = model.layers[0].self_attn.q_proj.weight.tensor();
    assert_eq!(data_ptr(q), data_ptr(&base_q), "base weight was copied");
    let logits = model.forward(&get(&refs, "input_ids"), None).unwrap();
    assert!(
        max_abs_diff(&logits, &get(&refs, "logits")) <= 1e-4,
        "B = 0 must leave the model unchanged"
    );
    let trainable = model.trainable_params();
    assert!(trainable
        .iter()
        .all(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B.")));
    let (train_count, total) = lora::parameter_counts(&model);
    assert!(train_count > 0 && train_count < total / 2);

    // With B nudged away from zero, every adapter weight receives a non-zero gradient.
    model.map_params(&mut |n, p| {
        if n.contains(".lora_B.") {
            p.var()
                .unwrap()
                .set(&(p.tensor().ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
        p.clone()
    });
    let logits = model.forward(&get(&refs, "input_ids"), None).unwrap();
    let loss = ops::causal_lm_loss(&logits, &get(&refs, "labels"))
        .unwrap()
        .mean()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &trainable {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn target_modules_layers_to_transform_modules_to_save_and_rslora_follow_peft() {
    let mut model = base("qwen2");
    let mut s = settings(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    s.layers_to_transform = Some(vec![1]);
    s.modules_to_save = vec!["lm_head".into(), "embed_tokens".into()];
    s.use_rslora = true;
    let adapted = lora::attach_new(&mut model, &s, 0).unwrap();
    assert_eq!(
        adapted,
        vec![
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    assert_eq!(
        model.layers[1]
            .self_attn
            .q_proj
            .lora
            .as_ref()
            .unwrap()
            .scale,
        8.0 / 2.0
    );
    let names: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"lm_head.weight".to_string()));
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));

    let err = lora::attach_new(
        &mut base("qwen2"),
        &settings(TargetModules::Names(vec!["qkv".into()])),
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("qkv"), "{err}");
    let regex = lora::attach_new(
        &mut base("qwen2"),
        &settings(TargetModules::Regex(r".*\.0\.mlp\..*_proj".into())),
        0,
    )
    .unwrap();
    assert_eq!(regex.len(), 3);
}

#[test]
fn lora_dropout_applies_only_while_training_and_is_seeded() {
    let refs = reference("llama");
    let ids = get(&refs, "input_ids");
    let mut model = base("llama");
    let mut s = settings(TargetModules::AllLinear);
    s.dropout = 0.5;
    lora::attach_new(&mut model, &s, 0).unwrap();
    model.map_params(&mut |n, p| {
        if n.contains(".lora_B.") {
            p.var()
                .unwrap()
                .set(&(p.tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
        p.clone()
    });
    let eval = model.forward(&ids, None).unwrap();
    model.set_dropout(Some(3));
    let first = model.forward(&ids, None).unwrap();
    model.set_dropout(Some(3));
    let again = model.forward(&ids, None).unwrap();
    assert_eq!(
        max_abs_diff(&first, &again),
        0.0,
        "the same seed drops the same units"
    );
    assert!(
        max_abs_diff(&first, &eval) > 1e-3,
        "dropout changed nothing while training"
    );
    model.set_dropout(None);
    assert_eq!(
        max_abs_diff(&model.forward(&ids, None).unwrap(), &eval),
        0.0
    );
}
