//! Plugins: the three transports, the sandbox against a hostile component, hook order and
//! aggregation, a plugin loss against the built-in one, and plugins in `axl train`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use axl::plugins::{OnError, PluginFailure, PluginManager, PluginSpec, Sandbox, Services, Source};
use axl_plugin_api::payload::{
    CommandCall, Control, Event, KernelChoices, ModelInfo, Row, RunContext, TrainState,
};
use axl_plugin_api::{Hook, Host, Manifest, Plugin, PluginError, API_VERSION};

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Builds the example and test plugins once: as WebAssembly components and as native
/// libraries.
fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // (package, as a component, as a native library)
        let packages = [
            ("flashcards", true, true),
            ("exact_answer", true, true),
            ("hostile_plugin", true, true),
            ("early_stopping", false, true),
            ("axl-plugin-swanlab", true, false),
        ];
        for wasm in [true, false] {
            let mut command = std::process::Command::new(&cargo);
            command.current_dir(env!("CARGO_MANIFEST_DIR")).arg("build");
            for (p, component, library) in packages {
                if (wasm && component) || (!wasm && library) {
                    command.args(["-p", p]);
                }
            }
            if wasm {
                command.args(["--target", "wasm32-wasip2"]);
            }
            let out = command.output().expect("cargo runs");
            assert!(
                out.status.success(),
                "building the plugins failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        target_dir()
    })
}

pub(super) fn wasm(name: &str) -> PathBuf {
    built().join(format!("wasm32-wasip2/debug/{name}.wasm"))
}

pub(super) fn native(name: &str) -> PathBuf {
    built().join(format!(
        "debug/{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

fn spec(source: Source, sandbox: Sandbox) -> PluginSpec {
    PluginSpec {
        entry: match &source {
            Source::Builtin(n) => n.clone(),
            Source::Native(p) | Source::Wasm(p) => p.display().to_string(),
        },
        source,
        sandbox,
        on_error: OnError::Abort,
    }
}

fn command(manager: &mut PluginManager, name: &str, arg: &str) -> Result<(), String> {
    let call = CommandCall {
        name: name.into(),
        args: vec![arg.into()],
    };
    manager
        .run_command(&call, &mut Services::default())
        .map_err(|e| e.to_string())
}

/// Reading `/etc/passwd`, connecting to a live loopback server, looping forever, allocating
/// 4 GiB and writing outside `allow_write` each end in an error naming the plugin and the
/// hook; nothing outside the grants is touched, and the host goes on using the plugin.
#[test]
fn a_hostile_component_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let sandbox = Sandbox {
        allow_write: vec![output.join("allowed")],
        timeout_ms: 300,
        max_memory_mb: 64,
        ..Sandbox::default()
    };
    let specs = [spec(Source::Wasm(wasm("hostile_plugin")), sandbox)];
    let mut manager = PluginManager::load(&specs, dir.path(), &output).unwrap();

    let err = command(&mut manager, "read_file", "/etc/passwd").unwrap_err();
    assert!(
        err.starts_with("plugin `hostile` failed in `commands`: cannot read /etc/passwd"),
        "{err}"
    );
    assert!(!err.contains("root:"), "{err}");

    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let address = server.local_addr().unwrap().to_string();
    let err = command(&mut manager, "connect", &address).unwrap_err();
    assert!(err.contains("cannot connect"), "{err}");
    assert!(server.accept().is_err(), "the plugin reached the server");

    let started = std::time::Instant::now();
    let err = command(&mut manager, "spin", "").unwrap_err();
    assert!(
        err.contains("did not finish within timeout_ms = 300"),
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 10);

    let err = command(&mut manager, "allocate", "4096").unwrap_err();
    assert!(
        err.contains("ran out of memory") && err.contains("max_memory_mb = 64"),
        "{err}"
    );

    let outside = dir.path().join("outside.txt");
    let allowed = output.join("allowed");
    for target in [
        outside.display().to_string(),
        format!("{}/../../outside.txt", allowed.display()),
    ] {
        let err = command(&mut manager, "write_file", &target).unwrap_err();
        assert!(err.contains("cannot write"), "{err}");
    }
    assert!(!outside.exists());

    let err = command(&mut manager, "panic", "").unwrap_err();
    assert!(err.contains("trapped"), "{err}");

    // After every trap, a fresh instance serves the next call.
    let inside = allowed.join("ok.txt");
    command(&mut manager, "write_file", &inside.display().to_string()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&inside).unwrap(),
        "written by a plugin"
    );
}

/// `allow_write` outside the output directory is refused when the plugin loads.
#[test]
fn allow_write_must_lie_under_the_output_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox {
        allow_write: vec![dir.path().join("elsewhere")],
        ..Sandbox::default()
    };
    let specs = [spec(Source::Wasm(wasm("hostile_plugin")), sandbox)];
    let errors = match PluginManager::load(&specs, dir.path(), &dir.path().join("out")) {
        Ok(_) => panic!("loaded"),
        Err(errors) => errors,
    };
    assert!(
        errors[0].to_string().contains("is not under output_dir"),
        "{}",
        errors[0]
    );
}

/// A panic inside a native plugin is an error naming plugin and hook, not the end of the
/// process; an observational hook's failure under `on_error: skip` lets the run go on.
#[test]
fn a_panicking_native_plugin_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut specs = [spec(
        Source::Native(native("hostile_plugin")),
        Sandbox::default(),
    )];
    let mut manager = PluginManager::load(&specs, dir.path(), dir.path()).unwrap();
    let err = command(&mut manager, "panic", "").unwrap_err();
    assert_eq!(
        err,
        "plugin `hostile` failed in `commands`: panicked: asked to panic"
    );
    let step = |global_step| Event {
        hook: Hook::OnStepEnd,
        state: TrainState {
            global_step,
            max_steps: 3,
            epoch: 0.0,
        },
        metrics: Default::default(),
        dir: None,
        message: None,
    };
    let err = manager
        .event(&step(2), &mut Services::default())
        .unwrap_err();
    assert!(err.to_string().contains("on_step_end"), "{err}");
    specs[0].on_error = OnError::Skip;
    let mut manager = PluginManager::load(&specs, dir.path(), dir.path()).unwrap();
    assert!(manager.event(&step(2), &mut Services::default()).is_ok());
    assert!(manager.event(&step(3), &mut Services::default()).is_ok());
}

/// What the ordering plugins saw, in call order.
static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

macro_rules! recording_plugin {
    ($ty:ident, $name:literal, $kernel:literal) => {
        #[derive(Default)]
        struct $ty;

        impl Plugin for $ty {
            fn manifest(&self) -> Manifest {
                Manifest {
                    name: $name.into(),
                    version: "0.1.0".into(),
                    api_version: API_VERSION,
                    description: String::new(),
                    hooks: vec![Hook::OnLog, Hook::PreModelLoad, Hook::LoadDatasets],
                    config_schema: Default::default(),
                    provides: Default::default(),
                }
            }

            fn on_event(
                &mut self,
                event: &Event,
                _host: &mut dyn Host,
            ) -> Result<Control, PluginError> {
                CALLS
                    .lock()
                    .unwrap()
                    .push(format!("{}:{}", $name, event.hook.name()));
                Ok(Control::default())
            }

            fn pre_model_load(
                &mut self,
                _model: &ModelInfo,
                _host: &mut dyn Host,
            ) -> Result<KernelChoices, PluginError> {
                Ok([("rms_norm".to_string(), serde_json::json!($kernel))].into())
            }

            fn load_datasets(
                &mut self,
                _run: &RunContext,
                _host: &mut dyn Host,
            ) -> Result<Option<Vec<Row>>, PluginError> {
                Ok(Some(Vec::new()))
            }
        }

        axl_plugin_api::register_builtin!($ty, $name);
    };
}

recording_plugin!(RecordingA, "recording_a", "fused");
recording_plugin!(RecordingB, "recording_b", "reference");

/// Plugins are called in `plugins:` order; a merged hook's conflict and a second answer to
/// a one-answer hook are errors naming both plugins.
#[test]
fn hooks_run_in_list_order_and_conflicts_name_both_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let builtin = |n: &str| spec(Source::Builtin(n.into()), Sandbox::default());
    let mut manager = PluginManager::load(
        &[builtin("recording_b"), builtin("recording_a")],
        dir.path(),
        dir.path(),
    )
    .unwrap();
    let log = Event {
        hook: Hook::OnLog,
        state: TrainState::default(),
        metrics: Default::default(),
        dir: None,
        message: None,
    };
    manager.event(&log, &mut Services::default()).unwrap();
    let calls: Vec<String> = CALLS
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.ends_with(":on_log"))
        .cloned()
        .collect();
    assert_eq!(calls, ["recording_b:on_log", "recording_a:on_log"]);

    let err = manager
        .pre_model_load(&ModelInfo::default(), &mut Services::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugins `recording_b` and `recording_a` disagree on `rms_norm` in `pre_model_load` (\"reference\" vs \"fused\")"
    );
    let err = manager
        .load_datasets(&RunContext::default(), &mut Services::default())
        .unwrap_err();
    assert!(matches!(err, PluginFailure::Combine(_)));
    assert!(err
        .to_string()
        .contains("`recording_b` and `recording_a` both answer"));

    let errors = match PluginManager::load(
        &[builtin("recording_a"), builtin("recording_a")],
        dir.path(),
        dir.path(),
    ) {
        Ok(_) => panic!("loaded twice"),
        Err(errors) => errors,
    };
    assert!(errors[0].to_string().contains("list each plugin once"));
    let errors = match PluginManager::load(
        &[builtin(
            "axolotl.integrations.llm_compressor.LLMCompressorPlugin",
        )],
        dir.path(),
        dir.path(),
    ) {
        Ok(_) => panic!("loaded"),
        Err(errors) => errors,
    };
    assert!(
        errors[0]
            .to_string()
            .contains("Axolotl's `llm_compressor` integration"),
        "{}",
        errors[0]
    );
}

/// Cross-entropy computed by a plugin, with its gradient w.r.t. the logits.
#[derive(Default)]
struct PluginCrossEntropy;

impl Plugin for PluginCrossEntropy {
    fn manifest(&self) -> Manifest {
        Manifest {
            name: "test_cross_entropy".into(),
            version: "0.1.0".into(),
            api_version: API_VERSION,
            description: String::new(),
            hooks: vec![Hook::ComputeLoss],
            config_schema: Default::default(),
            provides: Default::default(),
        }
    }

    fn compute_loss(
        &mut self,
        logits: axl_plugin_api::TensorView<'_>,
        grad: axl_plugin_api::TensorViewMut<'_>,
        batch: &axl_plugin_api::payload::LossBatch,
        _host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        let vocab = *logits.shape.last().unwrap();
        let mut loss = 0.0;
        for row in 0..batch.rows {
            for t in 0..batch.len - 1 {
                let target = batch.labels[row * batch.len + t + 1];
                if target < 0 {
                    continue;
                }
                let at = (row * batch.len + t) * vocab;
                let x = &logits.data[at..at + vocab];
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
                loss += max + sum.ln() - x[target as usize] as f64;
                let g = &mut grad.data[at..at + vocab];
                for (g, &v) in g.iter_mut().zip(x) {
                    *g = ((v as f64 - max).exp() / sum / batch.normalizer) as f32;
                }
                g[target as usize] -= (1.0 / batch.normalizer) as f32;
            }
        }
        Ok(Some(loss / batch.normalizer))
    }
}

axl_plugin_api::register_builtin!(PluginCrossEntropy, "test_cross_entropy");

/// A plugin's cross-entropy gives the built-in loss and, through the host's backward pass,
/// the same gradients and the same parameter update.
#[test]
fn a_plugin_cross_entropy_trains_like_the_builtin_loss() {
    use axl::cli::plugins::PluginLoop;
    use axl::train::hooks::loss_through_hooks;
    use axl::train::optimizer::Optimizer;
    use axl::train::plan::{micro_batches, TrainSettings};
    use axl::train::step::{accumulate, apply};
    let data = super::train::examples(6, 5);
    let refs: Vec<&axl::data::example::Tokenized> = data.iter().collect();
    let mut config = axl::config::AxlConfig::default();
    config.training.learning_rate = Some(axl::config::training::Number::Number(1e-3));
    config.sequence_len = 64;
    config.micro_batch_size = 2;
    // SGD: the update is proportional to the gradient, so it shows any difference in it
    // (Adam's first step is the gradient's sign).
    config.training.optimizer = "sgd".into();
    let settings = TrainSettings::from_config(&config).unwrap();
    let batches = micro_batches(&refs, &settings, false, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for through_plugin in [false, true] {
        let model = super::train::trainable_llama(false);
        let params = model.trainable_params();
        let specs = [spec(
            Source::Builtin("test_cross_entropy".into()),
            Sandbox::default(),
        )];
        let mut manager = PluginManager::load(&specs, dir.path(), dir.path()).unwrap();
        let mut hooks = PluginLoop::new(&mut manager, None);
        let mut hook = |logits: &candle_core::Tensor, batch: &_, trained: usize| {
            loss_through_hooks(&mut hooks, &model, logits, batch, trained)
        };
        let (grads, outcome) = accumulate(
            &model,
            &params,
            &batches,
            false,
            if through_plugin {
                Some(&mut hook)
            } else {
                None
            },
        )
        .unwrap();
        let mut optimizer = Optimizer::new(settings.optimizer.clone());
        apply(&mut optimizer, &params, &grads, 1e-3).unwrap();
        let updated: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        runs.push((outcome, grads.to_vecs(&params).unwrap(), updated));
    }
    let (builtin, plugin) = (&runs[0], &runs[1]);
    assert!(
        (builtin.0.loss - plugin.0.loss).abs() < 1e-5 * builtin.0.loss,
        "loss {} vs {}",
        builtin.0.loss,
        plugin.0.loss
    );
    assert!((builtin.0.grad_norm - plugin.0.grad_norm).abs() < 1e-4 * builtin.0.grad_norm);
    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&builtin.1, &plugin.1) < 1e-5, "gradients differ");
    assert!(max_diff(&builtin.2, &plugin.2) < 1e-6, "updates differ");
}

/// `axl train` with a native early-stopping plugin and a WebAssembly reward plugin: the
/// plugin's keys are validated, it stops the run, and the model is saved; `axl plugin list`
/// shows both in order; a misspelled plugin key is an error naming it.
#[test]
fn axl_train_runs_with_native_and_wasm_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = format!(
        "plugins:\n  - {}\n  - path: {}\n    timeout_ms: 5000\n",
        native("early_stopping").display(),
        wasm("exact_answer").display()
    );
    let extra = format!(
        "{plugins}num_epochs: 4\nval_set_size: 0.2\neval_steps: 1\nearly_stop_patience: 1\noptimizer: sgd\noutput_dir: {}\n",
        dir.path().join("out").display()
    );
    let config = super::train::training_config(dir.path(), &extra);
    let out = super::common::axl("train", &config, &["--learning-rate", "2.0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[early_stopping] info: eval_loss has not improved"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a plugin asked to stop training"),
        "{stderr}"
    );
    assert!(dir.path().join("out/model.safetensors").is_file());

    let listed = super::common::axl("plugin", Path::new("list"), &[config.to_str().unwrap()]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let early = listed.find("early_stopping 0.1.0 (native library").unwrap();
    let reward = listed.find("exact_answer 0.1.0 (wasm component").unwrap();
    assert!(early < reward, "{listed}");

    let misspelled =
        super::train::training_config(dir.path(), &format!("{plugins}early_stop_patients: 1\n"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["train", misspelled.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("early_stop_patients: unknown key"),
        "{stderr}"
    );
}

/// A dataset `type:` served by a WebAssembly plugin: `axl preprocess --debug` shows its
/// text, with only the card's back trained.
#[test]
fn a_wasm_plugin_provides_a_dataset_type() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "{\"front\": \"capital of France\", \"back\": \"Paris\"}\n{\"front\": \"2+2\", \"back\": \"4\"}\n";
    std::fs::write(dir.path().join("cards.jsonl"), rows).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "base_model: {}\nplugins:\n  - {}\ndatasets:\n  - path: {}\n    type: flashcards\nsequence_len: 64\nmicro_batch_size: 1\ndataset_prepared_path: {}\n",
            model.display(),
            wasm("flashcards").display(),
            dir.path().join("cards.jsonl").display(),
            dir.path().join("prepared").display()
        ),
    )
    .unwrap();
    let out = super::common::axl(
        "preprocess",
        &config,
        &["--debug", "--json", "--debug-num-examples", "2"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(
        text.contains("Front: capital of France\nBack: Paris"),
        "{text}"
    );
    let trained: Vec<u32> = first["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(first["labels"].as_array().unwrap())
        .filter(|(_, l)| l.as_i64() != Some(-100))
        .map(|(id, _)| id.as_u64().unwrap() as u32)
        .collect();
    let tokenizer = axl::model::tokenizer::ModelTokenizer::load(&model).unwrap();
    let trained_text = tokenizer.decode(&trained, false).unwrap();
    assert!(
        trained_text.trim_start().starts_with("Paris"),
        "{trained_text}"
    );
    assert!(!trained_text.contains("Front"), "{trained_text}");
}

/// Answers `alpaca` rows in a house style, replacing the built-in `alpaca`.
#[derive(Default)]
struct HouseStyle;

impl Plugin for HouseStyle {
    fn manifest(&self) -> Manifest {
        Manifest {
            name: "house_style".into(),
            version: "0.1.0".into(),
            api_version: API_VERSION,
            description: String::new(),
            hooks: vec![Hook::FormatExample],
            config_schema: Default::default(),
            provides: axl_plugin_api::Provides {
                strategies: vec!["alpaca".into()],
                ..Default::default()
            },
        }
    }

    fn format_example(
        &mut self,
        _dataset: &axl_plugin_api::payload::DatasetEntry,
        row: &Row,
        host: &mut dyn Host,
    ) -> Result<axl_plugin_api::payload::Formatted, PluginError> {
        let text = |key: &str| row.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let prompt = format!("Q: {}\nA: ", text("instruction"));
        let mut answer = axl_plugin_api::payload::Formatted::from_pieces([
            (prompt.as_str(), false),
            (text("output"), true),
        ]);
        let prompt_tokens = host.tokenize(&prompt)?.len();
        answer
            .fields
            .insert("prompt_tokens".into(), prompt_tokens.into());
        Ok(answer)
    }
}

axl_plugin_api::register_builtin!(HouseStyle, "house_style");

/// axl's own dataset types come from the built-in `prompt_strategies` plugin through
/// `format_example`, loaded after the listed plugins: a listed plugin that provides one of
/// its names formats that type (with the tokenizer at hand), and the other built-in types
/// stay.
#[test]
fn the_built_in_dataset_types_are_a_plugin_that_a_listed_one_replaces() {
    use axl::data::strategy::PluginFormat;
    use axl_plugin_api::payload::DatasetEntry;
    let dir = tempfile::tempdir().unwrap();
    let run = RunContext::default();
    let row = |value: serde_json::Value| value.as_object().unwrap().clone();
    let entry = |name: &str| DatasetEntry {
        dataset_type: name.into(),
        config: serde_json::json!({ "type": name }),
    };
    let hello = row(serde_json::json!({"instruction": "Hi", "output": "Yo"}));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let tokenizer = axl::model::tokenizer::ModelTokenizer::load(&model).unwrap();

    let built_in = PluginManager::default()
        .strategy_plugins(dir.path(), dir.path(), &run)
        .unwrap();
    let alpaca = built_in
        .format(&entry("alpaca"), &hello, &tokenizer)
        .unwrap();
    assert!(
        alpaca.segments[0]
            .text
            .starts_with("Below is an instruction"),
        "{alpaca:?}"
    );
    let err = built_in
        .format(
            &entry("alpaca"),
            &row(serde_json::json!({"output": "Yo"})),
            &tokenizer,
        )
        .unwrap_err();
    assert_eq!(
        err,
        "field `instruction`: missing (dataset type `alpaca` of plugin `prompt_strategies`)"
    );

    let listed = PluginManager::load(
        &[spec(
            Source::Builtin("house_style".into()),
            Sandbox::default(),
        )],
        dir.path(),
        dir.path(),
    )
    .unwrap()
    .strategy_plugins(dir.path(), dir.path(), &run)
    .unwrap();
    let house = listed.format(&entry("alpaca"), &hello, &tokenizer).unwrap();
    assert_eq!(house.segments[0].text, "Q: Hi\nA: ");
    let prompt_tokens = tokenizer.encode("Q: Hi\nA: ", false).unwrap().len();
    assert_eq!(house.fields["prompt_tokens"], prompt_tokens);
    for name in [
        "completion",
        "input_output",
        "chat_template",
        "alpaca_chat.load_qa",
    ] {
        assert!(listed.provides(name), "{name}");
    }
    let text = row(serde_json::json!({"text": "Once"}));
    assert!(
        listed
            .format(&entry("completion"), &text, &tokenizer)
            .unwrap()
            .chunk
    );
}

/// Runs cargo in `dir` with the shared target directory for generated plugin crates.
fn cargo_build(dir: &Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir().join("plugin-crates"))
        .args(["build", "--offline"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo build in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `axl plugin new` writes a crate that builds offline as it is and runs in `axl train`.
#[test]
fn a_scaffolded_plugin_builds_offline_and_trains() {
    // Building the example components first also fetches the WebAssembly-only dependencies
    // that an offline build needs.
    built();
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("demo_callback");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["plugin", "new", "demo_callback", "--kind", "wasm", "--dir"])
        .arg(&crate_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cargo_build(&crate_dir, &["--release", "--target", "wasm32-wasip2"]);
    let artifact = target_dir().join("plugin-crates/wasm32-wasip2/release/demo_callback.wasm");
    let config = super::train::training_config(
        dir.path(),
        &format!(
            "plugins:\n  - {}\nmax_steps: 3\nval_set_size: 0\noutput_dir: {}\n",
            artifact.display(),
            dir.path().join("out").display()
        ),
    );
    let out = super::common::axl("train", &config, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[demo_callback] info: step 3: loss"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[demo_callback] info: training is over"),
        "{stderr}"
    );
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"demo_callback_steps_seen\":3.0"),
        "{metrics}"
    );
}

/// A native plugin built against another API version is refused with both versions and
/// how to rebuild: the fixture is built against a copy of the API crate bumped to 0.3.0.
#[test]
fn a_plugin_built_against_another_api_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let copy = |from: &Path, to: &Path| {
        for entry in walk(from) {
            let relative = entry.strip_prefix(from).unwrap();
            let target = to.join(relative);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &target).unwrap();
        }
    };
    copy(&root.join("plugin-api"), &dir.path().join("plugin-api"));
    copy(&root.join("sdk"), &dir.path().join("sdk"));
    let bump = |file: &Path, from: &str, to: &str| {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.contains(from), "{} lacks {from}", file.display());
        std::fs::write(file, text.replacen(from, to, 1)).unwrap();
    };
    let api = dir.path().join("plugin-api");
    bump(
        &api.join("Cargo.toml"),
        "version = \"0.2.0\"",
        "version = \"0.3.0\"",
    );
    bump(&api.join("src/version.rs"), "minor: 2,", "minor: 3,");
    let sdk = dir.path().join("sdk");
    bump(
        &sdk.join("Cargo.toml"),
        "version = \"0.2.0\" }",
        "version = \"0.3.0\" }",
    );
    let plugin = dir.path().join("old_api");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["plugin", "new", "old_api", "--kind", "dylib", "--dir"])
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(out.status.success());
    // One workspace of the three, with axl's own shared settings and lock file.
    let cargo_toml = plugin.join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml).unwrap();
    let sdk_line = text
        .lines()
        .find(|l| l.starts_with("axl-sdk"))
        .unwrap()
        .to_string();
    let text = text
        .replace(&sdk_line, "axl-sdk = { path = \"../sdk\" }")
        .replace("[workspace]\n", "");
    std::fs::write(&cargo_toml, text).unwrap();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members_start = workspace.find("members = [").unwrap();
    let members_end = members_start + workspace[members_start..].find(']').unwrap() + 1;
    let workspace = format!(
        "{}members = [\"plugin-api\", \"sdk\", \"old_api\"]{}",
        &workspace[..members_start],
        &workspace[members_end..]
    );
    std::fs::write(dir.path().join("Cargo.toml"), workspace).unwrap();
    std::fs::copy(root.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
    cargo_build(&plugin, &[]);
    let library = target_dir().join(format!(
        "plugin-crates/debug/{}old_api{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let specs = [spec(Source::Native(library), Sandbox::default())];
    let errors = match PluginManager::load(&specs, dir.path(), dir.path()) {
        Ok(_) => panic!("a plugin of API 0.3.0 loaded"),
        Err(errors) => errors,
    };
    let message = errors[0].to_string();
    assert!(
        message.contains("built against plugin API 0.3.0")
            && message.contains("this axl implements 0.2.0")
            && message.contains("rebuild the plugin against axl-sdk 0.2.0"),
        "{message}"
    );
}

/// Every file under `dir`, skipping build output.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                files.extend(walk(&path));
            }
        } else {
            files.push(path);
        }
    }
    files
}

/// A plugin that shapes the optimizer, the schedule and the gradients.
#[derive(Default)]
struct Shaping;

impl Plugin for Shaping {
    fn manifest(&self) -> Manifest {
        Manifest {
            name: "shaping".into(),
            version: "0.1.0".into(),
            api_version: API_VERSION,
            description: String::new(),
            hooks: vec![Hook::CreateOptimizer, Hook::LrSchedule, Hook::OnGradients],
            config_schema: Default::default(),
            provides: Default::default(),
        }
    }

    fn create_optimizer(
        &mut self,
        context: &axl_plugin_api::payload::OptimizerContext,
        _host: &mut dyn Host,
    ) -> Result<Option<axl_plugin_api::payload::OptimizerSpec>, PluginError> {
        assert!(!context.parameters.is_empty());
        Ok(Some(axl_plugin_api::payload::OptimizerSpec {
            optimizer: "sgd".into(),
            groups: vec![axl_plugin_api::payload::ParameterGroup {
                parameters: vec!["model.embed_tokens*".into()],
                lr_scale: 0.0,
                weight_decay: None,
            }],
            ..Default::default()
        }))
    }

    fn lr_schedule(
        &mut self,
        context: &axl_plugin_api::payload::ScheduleContext,
        _host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        Ok(Some(context.scheduled * 2.0))
    }

    fn on_gradients(
        &mut self,
        gradients: &mut [axl_plugin_api::Gradient<'_>],
        _host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        for g in gradients {
            g.grad
                .data
                .iter_mut()
                .for_each(|x| *x = x.clamp(-1e-3, 1e-3));
        }
        Ok(())
    }
}

axl_plugin_api::register_builtin!(
    Shaping,
    "shaping",
    aliases = ["axolotl.integrations.shaping.ShapingPlugin"]
);

/// `create_optimizer` is honoured (optimizer and parameter groups), `lr_schedule` replaces
/// the scheduled rate, and `on_gradients` edits gradients in place; a built-in is found by
/// its Axolotl import path.
#[test]
fn optimizer_schedule_and_gradient_hooks_are_honoured() {
    use axl::train::optimizer::{Optimizer, OptimizerKind, OptimizerSettings};
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec(
        Source::Builtin("axolotl.integrations.shaping.ShapingPlugin".into()),
        Sandbox::default(),
    )];
    let mut manager = PluginManager::load(&specs, dir.path(), dir.path()).unwrap();
    let model = super::train::trainable_llama(false);
    let context = axl_plugin_api::payload::OptimizerContext {
        optimizer: "adamw_torch".into(),
        learning_rate: 1e-3,
        weight_decay: 0.0,
        parameters: axl::cli::plugins::model_info(&model).parameters,
    };
    let settings =
        axl::cli::plugins::optimizer_settings(&mut manager, &OptimizerSettings::default(), context)
            .unwrap();
    assert_eq!(settings.kind, OptimizerKind::Sgd);
    let mut optimizer = Optimizer::new(settings);
    optimizer.begin_step();
    let (mut embed, mut layer) = (vec![1.0f32; 4], vec![1.0f32; 4]);
    optimizer.update(
        "model.embed_tokens.weight",
        &[2, 2],
        &mut embed,
        &[1.0; 4],
        0.5,
    );
    optimizer.update(
        "model.layers.0.mlp.up_proj.weight",
        &[2, 2],
        &mut layer,
        &[1.0; 4],
        0.5,
    );
    assert_eq!(
        embed, [1.0; 4],
        "the group's lr_scale 0 freezes the embedding"
    );
    assert_eq!(layer, [0.5; 4]);

    let schedule = axl_plugin_api::payload::ScheduleContext {
        step: 3,
        total_steps: 10,
        learning_rate: 1e-3,
        scheduled: 4e-4,
    };
    let lr = manager
        .lr_schedule(&schedule, &mut Services::default())
        .unwrap()
        .unwrap();
    assert_eq!((lr.plugin.as_str(), lr.value), ("shaping", 8e-4));

    let mut data = vec![0.5f32, -2e-4, -0.7];
    let shape = [3usize];
    let mut gradients = [axl_plugin_api::Gradient {
        name: "w",
        grad: axl_plugin_api::TensorViewMut {
            shape: &shape,
            data: &mut data,
        },
    }];
    manager
        .on_gradients(&mut gradients, &mut Services::default())
        .unwrap();
    assert_eq!(data, [1e-3, -2e-4, -1e-3]);
}

/// The example reward function, as a WebAssembly component, scores completions against the
/// rows' answers; `axl plugin check` describes it.
#[test]
fn the_wasm_reward_example_scores_completions() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec(Source::Wasm(wasm("exact_answer")), Sandbox::default())];
    let mut manager = PluginManager::load(&specs, dir.path(), dir.path()).unwrap();
    let row = |answer: serde_json::Value| {
        let mut row = Row::new();
        row.insert("answer".into(), answer);
        row
    };
    let batch = axl_plugin_api::payload::RewardBatch {
        prompts: vec!["What is 6*7?".into(); 3],
        completions: vec!["6*7 = 42".into(), "about 40".into(), "no idea".into()],
        fields: vec![row(42.into()), row("#### 42".into()), Row::new()],
    };
    let scores = manager
        .reward("exact_answer", &batch, &mut Services::default())
        .unwrap();
    assert_eq!(scores, [Some(1.0), Some(0.0), None]);
    let err = manager
        .reward("missing", &batch, &mut Services::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no plugin in `plugins:` provides the reward function `missing`"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["plugin", "check"])
        .arg(wasm("exact_answer"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("name:        exact_answer")
            && stdout.contains("rewards: exact_answer")
            && stdout.contains("loads:       yes"),
        "{stdout}"
    );
}

/// A plugin's subcommand runs as `axl NAME config.yml ...` (here it finds the clock standing
/// still, as none was granted); a plugin command named like a core command loses to it; a
/// trap in a loop event under `on_error: skip` is reported and training goes on.
#[test]
fn plugin_commands_run_and_core_commands_win() {
    let dir = tempfile::tempdir().unwrap();
    let config = super::train::training_config(
        dir.path(),
        &format!(
            "plugins:\n  - path: {}\n    on_error: skip\nmax_steps: 3\nval_set_size: 0\noutput_dir: {}\n",
            wasm("hostile_plugin").display(),
            dir.path().join("out").display()
        ),
    );
    let out = super::common::axl("clock", &config, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[hostile] info: clock 0"), "{stderr}");

    let out = super::common::axl("train", &config, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warning: plugin `hostile` failed in `on_step_end` (on_error: skip, going on): trapped"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("trained 3 steps"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["no_such_command", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command `no_such_command`"));
}

/// What the sandbox grants works: a granted directory is readable and a granted address
/// reachable, while the same plugin without grants gets neither.
#[test]
fn sandbox_grants_open_exactly_what_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("note.txt"), "granted").unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = server.local_addr().unwrap().to_string();
    let sandbox = Sandbox {
        allow_read: vec![data.clone()],
        allow_net: vec![address.clone()],
        ..Sandbox::default()
    };
    let specs = [spec(Source::Wasm(wasm("hostile_plugin")), sandbox)];
    let mut manager = PluginManager::load(&specs, dir.path(), &dir.path().join("out")).unwrap();
    command(
        &mut manager,
        "read_file",
        &data.join("note.txt").display().to_string(),
    )
    .unwrap();
    command(&mut manager, "connect", &address).unwrap();
    server.set_nonblocking(true).unwrap();
    assert!(
        server.accept().is_ok(),
        "the granted connection did not arrive"
    );
    let err = command(
        &mut manager,
        "write_file",
        &data.join("x").display().to_string(),
    )
    .unwrap_err();
    assert!(
        err.contains("cannot write"),
        "read-only grant was writable: {err}"
    );
}

/// A loopback HTTP server that answers `count` requests with `body` and returns each request
/// it read (request line and headers).
pub fn http_server(
    count: usize,
    body: &'static str,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = server.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..count {
            let (stream, _) = server.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                request.push_str(&line);
            }
            let mut content = vec![0u8; length];
            reader.read_exact(&mut content).unwrap();
            request.push_str(&String::from_utf8_lossy(&content));
            seen.push(request);
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
        seen
    });
    (address, handle)
}

/// The `http` host service: a WebAssembly plugin reaches a host its `allow_net` grants (the
/// request arrives whole), and is refused another, naming the host and the grants.
#[test]
fn plugins_make_http_requests_only_to_granted_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (address, server) = http_server(1, "pong");
    let granted = Sandbox {
        allow_net: vec![address.clone()],
        ..Sandbox::default()
    };
    let specs = [spec(Source::Wasm(wasm("hostile_plugin")), granted)];
    let mut manager = PluginManager::load(&specs, dir.path(), &dir.path().join("out")).unwrap();
    command(&mut manager, "http_get", &format!("http://{address}/ping")).unwrap();
    let seen = server.join().unwrap();
    assert!(seen[0].starts_with("GET /ping HTTP/1.1"), "{seen:?}");
    assert!(
        seen[0].to_ascii_lowercase().contains("x-probe: 1"),
        "{seen:?}"
    );

    let other = Sandbox {
        allow_net: vec!["localhost:1".into()],
        ..Sandbox::default()
    };
    let specs = [spec(Source::Wasm(wasm("hostile_plugin")), other)];
    let mut manager = PluginManager::load(&specs, dir.path(), &dir.path().join("out")).unwrap();
    let err = command(&mut manager, "http_get", &format!("http://{address}/ping")).unwrap_err();
    assert!(
        err.contains(&format!(
            "`{address}` is not among the hosts this plugin may reach (allow_net: [localhost:1])"
        )),
        "{err}"
    );
}

/// The model services plugins call: a greedy generation scores as greedy, with a negative
/// log-likelihood, and a parameter reads back with its shape.
#[test]
fn model_services_score_generate_and_read_parameters() {
    use axl::plugins::services::{LoadedModel, ModelServices};
    use axl_plugin_api::payload::{GenerateRequest, ScoreRequest};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let model = axl::model::CausalLm::load(&dir, &Default::default()).unwrap();
    let tokenizer = axl::model::tokenizer::ModelTokenizer::load(&dir).unwrap();
    let services = LoadedModel {
        model: &model,
        tokenizer: &tokenizer,
    };
    let prompt = "the cat sat on";
    let generated = services
        .generate(&GenerateRequest {
            prompt: prompt.into(),
            max_new_tokens: 3,
            temperature: 0.0,
            stop: vec![],
            prompt_ids: None,
        })
        .unwrap();
    let scores = services
        .score(&[
            ScoreRequest {
                context: prompt.into(),
                continuation: generated.clone(),
                ..ScoreRequest::default()
            },
            ScoreRequest {
                context: prompt.into(),
                continuation: " zebra zebra".into(),
                ..ScoreRequest::default()
            },
        ])
        .unwrap();
    if !generated.is_empty()
        && tokenizer
            .encode(&format!("{prompt}{generated}"), true)
            .unwrap()
            == [
                tokenizer.encode(prompt, true).unwrap(),
                tokenizer.encode(&generated, false).unwrap(),
            ]
            .concat()
    {
        assert!(scores[0].greedy, "{generated:?} {scores:?}");
    }
    assert!(scores.iter().all(|s| s.log_likelihood < 0.0), "{scores:?}");
    let (shape, values) = services.parameter("model.embed_tokens.weight").unwrap();
    assert_eq!(shape.len(), 2);
    assert_eq!(values.len(), shape[0] * shape[1]);
    assert!(services.parameter("no.such.weight").is_err());
}

/// A loop event that fails under `on_error: abort` stops the run with the plugin's error,
/// after the model trained so far is saved.
#[test]
fn a_failing_loop_event_stops_the_run_without_losing_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let config = super::train::training_config(
        dir.path(),
        &format!(
            "plugins:\n  - {}\nmax_steps: 5\nval_set_size: 0\noutput_dir: {}\n",
            wasm("hostile_plugin").display(),
            output.display()
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_axl"))
        .args(["train", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plugin `hostile` failed in `on_step_end`: trapped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("saving before stopping: ending at step 2"),
        "{stderr}"
    );
    assert!(output.join("model.safetensors").is_file(), "{stderr}");
    let state = std::fs::read_to_string(output.join("trainer_state.json")).unwrap();
    assert!(state.contains("\"global_step\": 2"), "{state}");
}
