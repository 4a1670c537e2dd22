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
        let packages = [
            "flashcards",
            "exact_answer",
            "hostile_plugin",
            "early_stopping",
        ];
        for wasm in [true, false] {
            let mut command = std::process::Command::new(&cargo);
            command.current_dir(env!("CARGO_MANIFEST_DIR")).arg("build");
            for p in packages {
                if !(wasm && p == "early_stopping") {
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

fn wasm(name: &str) -> PathBuf {
    built().join(format!("wasm32-wasip2/debug/{name}.wasm"))
}

fn native(name: &str) -> PathBuf {
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
        &[builtin("axolotl.integrations.kd.KDPlugin")],
        dir.path(),
        dir.path(),
    ) {
        Ok(_) => panic!("loaded"),
        Err(errors) => errors,
    };
    assert!(
        errors[0].to_string().contains("Axolotl's `kd` integration"),
        "{}",
        errors[0]
    );
}
