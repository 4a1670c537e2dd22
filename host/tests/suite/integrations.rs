//! The first-party integration plugins (grokfast, spectrum, knowledge distillation, lm-eval,
//! SwanLab, rewards, prompt strategies) end to end: `axl train` with a config that lists each.

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

/// A directory with a chat dataset whose rows carry a teacher's top-3 log-probabilities in
/// vLLM's form (for the last 12 positions of each example), and a config that lists `kd`
/// with `extra` appended.
fn kd_config(dir: &std::path::Path, name: &str, extra: &str) -> std::path::PathBuf {
    use std::fmt::Write as _;
    let words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish"];
    let mut rows = String::new();
    for i in 0..30usize {
        let text = |n: usize, salt: usize| {
            (0..n)
                .map(|j| words[(i * 5 + j * 3 + salt) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let teacher: Vec<Value> = (0..12usize)
            .map(|p| {
                let entries: Vec<Value> = (0..3usize)
                    .map(|k| {
                        let id = 40 + (i * 17 + p * 7 + k * 29) % 250;
                        serde_json::json!({"token": format!("token_id:{id}"), "logprob": -0.3 - 1.1 * k as f64})
                    })
                    .collect();
                Value::Array(entries)
            })
            .collect();
        let row = serde_json::json!({
            "messages": [
                {"role": "user", "content": text(3, 1)},
                {"role": "assistant", "content": text(5 + i % 3, 2)},
            ],
            "teacher": teacher,
        });
        writeln!(rows, "{row}").unwrap();
    }
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("kd.jsonl"), rows).unwrap();
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let config = run_dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "base_model: {}\nchat_template: chatml\nplugins:\n  - axolotl.integrations.kd.KDPlugin\ndatasets:\n  - path: {}\n    type: axolotl.integrations.kd.chat_template\n    logprobs_field: teacher\n    temperature: 1.0\nsequence_len: 128\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nlearning_rate: 0.001\nlogging_steps: 1\nval_set_size: 0.2\neval_steps: 2\nmax_steps: 4\nseed: 7\noutput_dir: {}\ndataset_prepared_path: {}\n{extra}",
            model.display(),
            run_dir.join("kd.jsonl").display(),
            run_dir.join("out").display(),
            run_dir.join("prepared").display(),
        ),
    )
    .unwrap();
    config
}

fn run_axl(command: &str, config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args([command, config.to_str().unwrap()])
        .output()
        .unwrap()
}

fn eval_losses(output_dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("eval_loss").and_then(Value::as_f64))
        .collect()
}

/// `plugins: [kd]` with `kd_trainer`: packed training and evaluation both go through the
/// plugin's loss; with `kd_alpha: 0, kd_ce_alpha: 1` it is exactly the host's cross-entropy
/// (same normalization, same shift), in training and in evaluation; with the teacher it
/// differs, and the evaluation loss is on the training loss's scale (Axolotl's issue 3270 was
/// an evaluation loss 1000× too large); LoRA trains through it too.
#[test]
fn kd_distils_in_training_and_evaluation_with_packing_and_lora() {
    let dir = tempfile::tempdir().unwrap();
    let packed = "sample_packing: true\neval_sample_packing: true\n";
    let plain = kd_config(dir.path(), "plain", packed);
    let out = run_axl("train", &plain);
    assert!(out.status.success(), "{}", stderr(&out));
    let ce_only = kd_config(
        dir.path(),
        "ce_only",
        &format!("{packed}kd_trainer: true\nkd_alpha: 0\nkd_ce_alpha: 1\n"),
    );
    let out = run_axl("train", &ce_only);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("[kd] info: distilling: kd_alpha 0"),
        "{}",
        stderr(&out)
    );
    let (plain_dir, ce_dir) = (dir.path().join("plain/out"), dir.path().join("ce_only/out"));
    for (a, b) in logged_steps(&plain_dir).iter().zip(logged_steps(&ce_dir)) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-4 * a,
            "host {a} vs kd's cross-entropy {b}"
        );
    }
    let (plain_eval, ce_eval) = (eval_losses(&plain_dir), eval_losses(&ce_dir));
    assert_eq!(plain_eval.len(), 2);
    for (a, b) in plain_eval.iter().zip(&ce_eval) {
        assert!((a - b).abs() < 1e-4 * a, "host eval {a} vs kd's {b}");
    }

    let distil = kd_config(
        dir.path(),
        "distil",
        &format!("{packed}kd_trainer: true\nkd_alpha: 0.9\nkd_ce_alpha: 0.1\nkd_temperature: 2.0\nkd_beta: 0.5\n"),
    );
    let out = run_axl("train", &distil);
    assert!(out.status.success(), "{}", stderr(&out));
    let distil_dir = dir.path().join("distil/out");
    let losses: Vec<f64> = logged_steps(&distil_dir)
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!((losses[0] - logged_steps(&plain_dir)[0]["loss"].as_f64().unwrap()).abs() > 1e-3);
    for eval in eval_losses(&distil_dir) {
        assert!(
            eval.is_finite() && eval < 3.0 * losses[0] && eval > losses[0] / 3.0,
            "eval {eval} vs train {losses:?}"
        );
    }

    let lora = kd_config(
        dir.path(),
        "lora",
        "kd_trainer: true\nkd_alpha: 0.9\nkd_ce_alpha: 0.1\nadapter: lora\nlora_r: 4\nlora_target_linear: true\n",
    );
    let out = run_axl("train", &lora);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir
        .path()
        .join("lora/out/adapter_model.safetensors")
        .is_file());
}

/// The results files an lm-eval run wrote under `output_dir/lm_eval_results/`.
fn lm_eval_results(output_dir: &std::path::Path) -> Vec<Value> {
    let mut found = Vec::new();
    let mut stack = vec![output_dir.join("lm_eval_results")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("results_"))
            {
                found.push(serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap());
            }
        }
    }
    found
}

/// `plugins: [lm_eval]`: after training, the example tasks run on the trained model and the
/// results land in lm-eval's layout; `axl lm-eval` runs them alone on `lm_eval_model`; an
/// unknown task stops the run before training, naming it.
#[test]
fn lm_eval_runs_after_training_and_as_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lm_eval_tasks");
    let extra = format!(
        "plugins:\n  - lm_eval\nlm_eval_tasks:\n  - town_colors\n  - town_food:1\nlm_eval_include_path: {}\nmax_steps: 1\nval_set_size: 0\n",
        tasks.display()
    );
    let (run, out) = train_in(dir.path(), "trained", &extra);
    let log = stderr(&run);
    assert!(run.status.success(), "{log}");
    assert!(
        log.contains("[lm_eval] info: town_colors: 24 documents, 0-shot"),
        "{log}"
    );
    assert!(log.contains("|town_food|1|exact_match|"), "{log}");
    let results = lm_eval_results(&out);
    assert_eq!(results.len(), 1, "{log}");
    let r = &results[0];
    let acc = r["results"]["town_colors"]["acc,none"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(r["results"]["town_colors"]["acc_norm_stderr,none"].is_number());
    assert_eq!(r["n-shot"]["town_food"], 1);
    assert_eq!(r["n-samples"]["town_food"]["effective"], 24);
    assert_eq!(
        r["configs"]["town_colors"]["output_type"],
        "multiple_choice"
    );

    // Alone, on another model: the fixture itself, with its results beside the first ones.
    let config = dir.path().join("trained/config.yml");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}lm_eval_model: {}\noutput_dir: {}\n",
            fixture.display(),
            out.display()
        ),
    )
    .unwrap();
    let alone = run_axl("lm-eval", &config);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert!(stderr(&alone).contains(&format!("model: {}", fixture.display())));
    let results = lm_eval_results(&out);
    assert!(results
        .iter()
        .any(|r| r["model_name"] == fixture.display().to_string()));

    let bad = train_in(
        dir.path(),
        "bad",
        &extra.replace("town_colors", "town_colours"),
    )
    .0;
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("no task file names the task `town_colours`"),
        "{}",
        stderr(&bad)
    );
}

/// `plugins: [rewards]`: a training config that lists it (with its keys) runs, the plugin
/// lists its reward functions, and they score completions through the reward hook as a
/// third-party reward plugin's would.
#[test]
fn built_in_rewards_load_with_a_run_and_score_through_the_hook() {
    use axl::plugins::spec::{PluginSpec, Sandbox, Source};
    use axl::plugins::{PluginManager, Services};
    let dir = tempfile::tempdir().unwrap();
    let extra = "plugins:\n  - rewards\nreward_answer_field: solution\nreward_length_target: 8\nmax_steps: 1\nval_set_size: 0\n";
    let (run, _) = train_in(dir.path(), "run", extra);
    assert!(run.status.success(), "{}", stderr(&run));
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["plugin", "list"])
        .arg(dir.path().join("run/config.yml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("rewards 0.1.0 (built-in"));

    let spec = PluginSpec {
        entry: "rewards".into(),
        source: Source::Builtin("rewards".into()),
        sandbox: Sandbox::default(),
        on_error: Default::default(),
    };
    let mut manager = PluginManager::load(&[spec], dir.path(), dir.path()).unwrap();
    let run = axl_plugin_api::payload::RunContext {
        config: serde_json::json!({"reward_answer_field": "solution"}),
        ..Default::default()
    };
    manager.configure(&run, &mut Services::default()).unwrap();
    let mut row = serde_json::Map::new();
    row.insert("solution".into(), serde_json::json!("12"));
    let batch = axl_plugin_api::payload::RewardBatch {
        prompts: vec!["3*4?".into(); 2],
        completions: vec!["<think>3*4</think><answer>12</answer>".into(), "13".into()],
        fields: vec![row.clone(), row],
    };
    let mut services = Services::default();
    assert_eq!(
        manager
            .reward("exact_match", &batch, &mut services)
            .unwrap(),
        [Some(1.0), Some(0.0)]
    );
    assert_eq!(
        manager.reward("format", &batch, &mut services).unwrap(),
        [Some(1.0), Some(0.0)]
    );
}

/// `plugins: [prompt_strategies]`: listing the built-in dataset types' plugin, which every run
/// loads anyway, trains exactly as leaving it out does, and `axl plugin list` shows it once.
#[test]
fn prompt_strategies_listed_or_not_train_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let steps = "max_steps: 2\nval_set_size: 0\n";
    let (implicit, implicit_out) = train_in(dir.path(), "implicit", steps);
    assert!(implicit.status.success(), "{}", stderr(&implicit));
    let (listed, listed_out) = train_in(
        dir.path(),
        "listed",
        &format!("plugins:\n  - prompt_strategies\n{steps}"),
    );
    assert!(listed.status.success(), "{}", stderr(&listed));
    let losses = |out: &std::path::Path| -> Vec<Value> {
        logged_steps(out)
            .into_iter()
            .map(|step| step["loss"].clone())
            .collect()
    };
    assert_eq!(losses(&implicit_out).len(), 2);
    assert_eq!(losses(&implicit_out), losses(&listed_out));
    let list = |name: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
            .args(["plugin", "list"])
            .arg(dir.path().join(name).join("config.yml"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let listed = list("listed");
    let lines = listed.lines().filter(|l| l.contains("prompt_strategies"));
    assert_eq!(lines.count(), 1, "{listed}");
    assert!(
        listed.contains("prompt_strategies 0.1.0 (built-in"),
        "{listed}"
    );
    assert!(list("implicit").contains("prompt_strategies (built in, loaded for every run"));
}

/// Every config snippet (the `yaml` code blocks) of the README's "Integrations" section is a valid config: merged
/// over a minimal one, its keys pass validation and its plugins load and configure
/// (`axl plugin list`).
#[test]
fn the_readme_integration_snippets_are_valid_configs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("\n## Integrations\n").unwrap();
    let end = start + 1 + readme[start + 1..].find("\n## ").unwrap();
    let section = &readme[start..end];
    let snippets: Vec<&str> = section
        .split("```yaml\n")
        .skip(1)
        .map(|s| &s[..s.find("```").unwrap()])
        .collect();
    assert!(snippets.len() >= 5, "{} snippets", snippets.len());
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        root.join("examples/lm_eval_tasks"),
        dir.path().join("lm_eval_tasks"),
    )
    .unwrap();
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    for (i, snippet) in snippets.iter().enumerate() {
        let mut config: serde_yaml::Mapping = serde_yaml::from_str(&format!(
            "base_model: {}\ndatasets:\n  - path: data.jsonl\n    type: alpaca\nsequence_len: 64\nmicro_batch_size: 1\nlearning_rate: 0.001\n",
            model.display()
        ))
        .unwrap();
        let extra: serde_yaml::Mapping = serde_yaml::from_str(snippet).unwrap();
        config.extend(extra);
        let path = dir.path().join(format!("snippet{i}.yml"));
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
            .args(["plugin", "list"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snippet {i}:\n{snippet}\n{}",
            stderr(&out)
        );
    }
}

/// One request a [`FakeSwanLab`] received.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// A SwanLab server on loopback: the endpoints the plugin uses, answered as SwanLab does
/// (the project missing until created), and a Lark webhook at `/lark`; it records every
/// request.
struct FakeSwanLab {
    address: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl FakeSwanLab {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = server.local_addr().unwrap().to_string();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Received>::new()));
        let log = received.clone();
        std::thread::spawn(move || {
            let mut project_exists = false;
            for stream in server.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                let mut parts = first.split_whitespace();
                let method = parts.next().unwrap_or_default().to_string();
                let path = parts.next().unwrap_or_default().to_string();
                let mut headers = Vec::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end().to_string();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    let (name, value) = (name.to_ascii_lowercase(), value.trim().to_string());
                    if name == "content-length" {
                        length = value.parse().unwrap();
                    }
                    headers.push((name, value));
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let body = String::from_utf8(body).unwrap();
                let (status, answer) = match (method.as_str(), path.as_str()) {
                    ("POST", "/api/login/api_key") => (200, r#"{"sid":"session-1","expiredAt":"2030-01-01T00:00:00.000Z","userInfo":{"username":"alice","name":null}}"#.to_string()),
                    ("GET", "/api/project/alice/town") if !project_exists => (404, r#"{"code":404,"message":"not found"}"#.into()),
                    ("POST", "/api/projects/alice") => {
                        project_exists = true;
                        (201, "{}".into())
                    }
                    ("GET", "/api/project/alice/town") => (200, r#"{"cuid":"P1","name":"town","version":1,"path":"/alice/town"}"#.into()),
                    ("POST", "/api/project/alice/town/experiment") => (201, r#"{"cuid":"E1","slug":"e1-slug","name":"n"}"#.into()),
                    ("POST", "/lark") => (200, r#"{"code":0,"msg":"success"}"#.into()),
                    _ => (200, "{}".into()),
                };
                log.lock().unwrap().push(Received {
                    method,
                    path,
                    headers,
                    body,
                });
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Self { address, received }
    }

    fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// SwanLab's cloud path, as the sandboxed WebAssembly component granted only the (loopback)
/// API host: login with the key, the project created, the run created with its
/// hyperparameters, every logged and evaluated value uploaded by step, the run finished, and
/// Lark notified, signed, on start and finish; the API key appears in the login header and
/// nowhere else, not in the log either. Without the grant, the first request is refused.
#[test]
fn swanlab_cloud_runs_sandboxed_and_loses_nothing() {
    let server = FakeSwanLab::start();
    let api = format!("http://{}", server.address);
    let key = "sk-axl-test-5ecret-key";
    let component = super::plugins::wasm("axl_plugin_swanlab");
    let plugin = |grant: &str| {
        format!(
            "plugins:\n  - path: {}\n    allow_net: [\"{grant}\"]\n    allow_env: [SWANLAB_API_KEY]\n    allow_clock: true\nswanlab_project: town\nswanlab_experiment_name: first\nswanlab_description: a test run\nswanlab_api_host: {api}\nswanlab_lark_webhook_url: {api}/lark\nswanlab_lark_secret: lark-s3cret\nmax_steps: 4\nval_set_size: 0.2\neval_steps: 2\n",
            component.display()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&run_dir).unwrap();
    let config = super::train::training_config(&run_dir, &plugin(&server.address));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["train", config.to_str().unwrap(), "--output-dir"])
        .arg(run_dir.join("out"))
        .env("SWANLAB_API_KEY", key)
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("tracking at {api}/@alice/town/runs/e1-slug")),
        "{log}"
    );
    assert!(!log.contains(key), "the key was logged");

    let requests = server.requests();
    let calls: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        &calls[..5],
        [
            "POST /api/login/api_key",
            "GET /api/project/alice/town",
            "POST /api/projects/alice",
            "GET /api/project/alice/town",
            "POST /api/project/alice/town/experiment",
        ],
        "{calls:?}"
    );
    for r in &requests {
        let in_header = r.headers.iter().any(|(_, v)| v.contains(key));
        assert!(
            !r.body.contains(key),
            "the key was sent in {} {}",
            r.method,
            r.path
        );
        assert_eq!(
            in_header,
            r.path == "/api/login/api_key",
            "{} {}",
            r.method,
            r.path
        );
        if r.path.starts_with("/api/") && r.path != "/api/login/api_key" {
            assert!(
                r.headers
                    .contains(&("cookie".into(), "sid=session-1".into())),
                "{} {}",
                r.method,
                r.path
            );
        }
    }
    let body = |r: &Received| serde_json::from_str::<Value>(&r.body).unwrap();
    let profile = requests
        .iter()
        .find(|r| r.path.ends_with("/runs/E1/profile"))
        .unwrap();
    let profile = body(profile);
    assert_eq!(profile["config"]["learning_rate"]["value"], 0.001);
    assert!(profile["config"].get("swanlab_lark_secret").is_none());
    // Every value logged to metrics.jsonl reached the server, at its step.
    let mut uploaded = std::collections::BTreeSet::new();
    for r in requests.iter().filter(|r| r.path == "/api/house/metrics") {
        let b = body(r);
        assert_eq!(
            (b["projectId"].clone(), b["experimentId"].clone()),
            (serde_json::json!("P1"), serde_json::json!("E1"))
        );
        for m in b["metrics"].as_array().unwrap() {
            uploaded.insert((
                m["key"].as_str().unwrap().to_string(),
                m["index"].as_u64().unwrap(),
            ));
        }
    }
    let out_dir = run_dir.join("out");
    for step in logged_steps(&out_dir) {
        let n = step["step"].as_u64().unwrap();
        assert!(
            uploaded.contains(&("loss".to_string(), n)),
            "loss at step {n} missing: {uploaded:?}"
        );
    }
    assert!(
        uploaded.contains(&("eval_loss".to_string(), 2)),
        "{uploaded:?}"
    );
    assert!(
        uploaded.contains(&("eval_loss".to_string(), 4)),
        "{uploaded:?}"
    );
    let series = requests
        .iter()
        .filter(|r| r.path == "/api/projects/alice/town/series")
        .count();
    assert!(series >= 1);
    let state = requests
        .iter()
        .find(|r| r.path.ends_with("/runs/E1/state"))
        .unwrap();
    assert_eq!(body(state)["state"], "FINISHED");
    let lark: Vec<Value> = requests
        .iter()
        .filter(|r| r.path == "/lark")
        .map(body)
        .collect();
    assert_eq!(lark.len(), 2, "start and finish");
    assert!(lark[0]["content"]["text"]
        .as_str()
        .unwrap()
        .contains("has started"));
    assert!(lark[1]["content"]["text"]
        .as_str()
        .unwrap()
        .contains("completed successfully"));
    for message in &lark {
        let timestamp = message["timestamp"].as_u64().unwrap();
        assert_eq!(
            message["sign"],
            axl_plugin_swanlab::lark::sign(timestamp, "lark-s3cret")
        );
    }

    // Granted another host only: the sandbox refuses the API host, naming it.
    let refused_dir = dir.path().join("refused");
    std::fs::create_dir_all(&refused_dir).unwrap();
    let config = super::train::training_config(&refused_dir, &plugin("localhost:1"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["train", config.to_str().unwrap(), "--output-dir"])
        .arg(refused_dir.join("out"))
        .env("SWANLAB_API_KEY", key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "`{}` is not among the hosts this plugin may reach",
            server.address
        )),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(key));
}

/// `plugins: [swanlab]` with `swanlab_mode: local`: the run is written under
/// `output_dir/swanlog`, and a failed run is marked crashed with its error.
#[test]
fn swanlab_local_runs_are_written_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "plugins:\n  - axolotl.integrations.swanlab.SwanLabPlugin\nuse_swanlab: true\nswanlab_project: town\nswanlab_mode: local\nmax_steps: 3\nval_set_size: 0\n";
    let (run, out) = train_in(dir.path(), "local", extra);
    assert!(run.status.success(), "{}", stderr(&run));
    let runs: Vec<_> = std::fs::read_dir(out.join("swanlog"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(runs.len(), 1);
    let run_dir = runs[0].path();
    let losses = std::fs::read_to_string(run_dir.join("logs/loss/0.log")).unwrap();
    assert_eq!(losses.lines().count(), 3);
    let state = std::fs::read_to_string(run_dir.join("files/state.json")).unwrap();
    assert!(state.contains("\"FINISHED\""), "{state}");
    let config = std::fs::read_to_string(run_dir.join("files/config.yaml")).unwrap();
    assert!(config.contains("swanlab_project:"), "{config}");

    // A plugin that fails at step two stops the run: the tracker hears `on_error`.
    let failing = format!(
        "{}
plugins:
  - axolotl.integrations.swanlab.SwanLabPlugin
  - {}
",
        extra.replace(
            "plugins:\n  - axolotl.integrations.swanlab.SwanLabPlugin\n",
            ""
        ),
        super::plugins::native("hostile_plugin").display()
    );
    let (run, out) = train_in(dir.path(), "failing", &failing);
    assert!(!run.status.success());
    let runs: Vec<_> = std::fs::read_dir(out.join("swanlog"))
        .unwrap()
        .flatten()
        .collect();
    let state = std::fs::read_to_string(runs[0].path().join("files/state.json")).unwrap();
    assert!(
        state.contains("\"CRASHED\"") && state.contains("step two is unlucky"),
        "{state}"
    );
}
