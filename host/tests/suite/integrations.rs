//! The first-party integration plugins (grokfast, spectrum, knowledge distillation, lm-eval,
//! SwanLab, rewards) end to end: `axl train` with a config that lists each.

use serde_json::Value;

use super::train::train_in;

/// The logged values of every step of a run.
fn logged_steps(output_dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `plugins: [grokfast]`: the first step's gradient is the plain run's times 1 + λ (the
/// moving average starts as the gradient), and the loss before it is the same.
#[test]
fn grokfast_amplifies_the_first_gradient_by_one_plus_lamb() {
    let dir = tempfile::tempdir().unwrap();
    let common = "max_steps: 2\noptimizer: sgd\nmax_grad_norm: 0\nval_set_size: 0\n";
    let (plain, plain_dir) = train_in(dir.path(), "plain", common);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let (grok, grok_dir) = train_in(
        dir.path(),
        "grok",
        &format!(
            "{common}plugins:\n  - axolotl.integrations.grokfast.GrokfastPlugin\ngrokfast_lamb: 2.0\n"
        ),
    );
    assert!(grok.status.success(), "{}", stderr(&grok));
    assert!(
        stderr(&grok).contains("[grokfast] info: gradient filter: alpha 0.98, lamb 2"),
        "{}",
        stderr(&grok)
    );
    let (plain, grok) = (logged_steps(&plain_dir), logged_steps(&grok_dir));
    assert_eq!(plain[0]["loss"], grok[0]["loss"]);
    let ratio = grok[0]["grad_norm"].as_f64().unwrap() / plain[0]["grad_norm"].as_f64().unwrap();
    assert!((ratio - 3.0).abs() < 1e-4, "grad norm ratio {ratio}");
    assert_ne!(plain[1]["loss"], grok[1]["loss"]);
}

/// The weights of a safetensors file, by name, as `f32` values.
fn weights(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect()
}

/// `plugins: [spectrum]`: the SNR file written beside the config matches Spectrum's ratios
/// computed with torch (`fixtures/spectrum/generate.py`); of each layer type exactly the
/// higher-SNR half trains, with the embeddings, and everything else keeps the base weights;
/// a second run reads the file instead of computing it.
#[test]
fn spectrum_trains_the_highest_snr_half_of_each_layer_type() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let reference = std::fs::read_to_string(fixtures.join("spectrum/snr_results_llama.json"))
        .unwrap()
        .replace("Infinity", "1e308");
    let reference: serde_json::Map<String, Value> = serde_json::from_str(&reference).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let extra =
        "plugins:\n  - spectrum\nspectrum_top_fraction: 0.5\nmax_steps: 2\nval_set_size: 0\n";
    let (run, out) = train_in(dir.path(), "spectrum", extra);
    let log = stderr(&run);
    assert!(run.status.success(), "{log}");
    assert!(
        log.contains("[spectrum] info: computing the signal-to-noise ratio"),
        "{log}"
    );
    assert!(log.contains("parameters train ("), "{log}");

    let written = dir.path().join("spectrum/spectrum_snr/llama.json");
    let computed = std::fs::read_to_string(&written)
        .unwrap()
        .replace("Infinity", "1e308");
    let computed: serde_json::Map<String, Value> = serde_json::from_str(&computed).unwrap();
    assert_eq!(computed.len(), reference.len());
    for (layer, want) in &reference {
        let got = &computed[layer];
        assert_eq!(got["type"], want["type"], "{layer}");
        let (got, want) = (got["snr"].as_f64().unwrap(), want["snr"].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{layer}: {got} vs torch {want}"
        );
    }

    let base = weights(&fixtures.join("models/llama/model.safetensors"));
    let trained = weights(&out.join("model.safetensors"));
    let changed = |layer: &str| {
        let name = format!("{layer}.weight");
        base[&name] != trained[&name]
    };
    assert!(changed("model.embed_tokens"));
    assert!(
        !changed("model.norm"),
        "one final norm: half of one rounds down to none"
    );
    let mut types: std::collections::BTreeMap<&str, Vec<(&str, f64)>> = Default::default();
    for (layer, entry) in &reference {
        if layer.starts_with("model.layers.") {
            types
                .entry(entry["type"].as_str().unwrap())
                .or_default()
                .push((layer, entry["snr"].as_f64().unwrap()));
        }
    }
    for (kind, mut layers) in types {
        // Highest first; equal ratios keep layer order.
        layers.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert!(changed(layers[0].0), "{kind}: {} should train", layers[0].0);
        assert!(
            !changed(layers[1].0),
            "{kind}: {} should be frozen",
            layers[1].0
        );
    }

    let again = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args([
            "train",
            dir.path().join("spectrum/config.yml").to_str().unwrap(),
            "--output-dir",
        ])
        .arg(dir.path().join("again"))
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains(&format!("layers from {}", written.display())),
        "{}",
        stderr(&again)
    );
}
