//! WebAssembly component plugins: compiled once and cached on disk, run by wasmtime in a
//! sandbox that grants nothing the config does not (files, network, environment, clocks),
//! with a time limit per call (epoch interruption) and a memory limit.
//!
//! A trap, a timeout or a refused allocation ends the call with an error saying which; the
//! instance is then dropped and a fresh one is made for the next call.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use axl_plugin_api::payload::LossBatch;
use axl_plugin_api::wire::{self, Channel};
use axl_plugin_api::{Gradient, Hook, Host, Manifest, PluginError, TensorView, TensorViewMut};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{
    FsPerms, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::spec::Sandbox;

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../plugin-api/wit",
});

use self::axl::plugin::types;

/// How often the epoch advances; call deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);

/// The process's engine, with epoch interruption, and the thread that advances the epoch
/// while a call is running (and sleeps otherwise, so that it never takes a core from
/// training).
struct Runtime {
    engine: Engine,
    calls_running: AtomicUsize,
    ticker: std::thread::Thread,
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).expect("the default wasmtime configuration is valid");
        let weak = engine.weak();
        let ticker = std::thread::Builder::new()
            .name("axl-wasm-epoch".into())
            .spawn(move || loop {
                let running = RUNTIME
                    .get()
                    .is_none_or(|r| r.calls_running.load(Ordering::Acquire) > 0);
                if !running {
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })
            .expect("a thread can be started")
            .thread()
            .clone();
        Runtime {
            engine,
            calls_running: AtomicUsize::new(0),
            ticker,
        }
    })
}

fn engine() -> &'static Engine {
    &runtime().engine
}

/// Keeps the epoch advancing while it lives.
struct CallClock;

impl CallClock {
    fn start() -> Self {
        let runtime = runtime();
        runtime.calls_running.fetch_add(1, Ordering::AcqRel);
        runtime.ticker.unpark();
        CallClock
    }
}

impl Drop for CallClock {
    fn drop(&mut self) {
        runtime().calls_running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where compiled components are kept: `$AXL_CACHE_DIR/wasm`, else `$XDG_CACHE_HOME/axl/wasm`,
/// else `~/.cache/axl/wasm`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("AXL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("axl")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/axl")))?;
    Some(base.join("wasm"))
}

/// The component of `bytes`, from the cache when this wasmtime, with these settings, has
/// compiled it before. The key is the content's hash and the engine's compatibility hash
/// (wasmtime version and settings); only files written here are ever loaded.
fn compile(bytes: &[u8]) -> Result<Component, String> {
    let engine = engine();
    let mut compat = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let key = format!("{:x}-{:016x}.cwasm", Sha256::digest(bytes), compat.finish());
    let cached = cache_dir().map(|d| d.join(key));
    if let Some(path) = &cached {
        if path.is_file() {
            // SAFETY: the file was written by `Component::serialize` below, under a name that
            // fixes both its source and the engine settings it was compiled for.
            if let Ok(component) = unsafe { Component::deserialize_file(engine, path) } {
                return Ok(component);
            }
        }
    }
    let component =
        Component::new(engine, bytes).map_err(|e| format!("not a valid component: {e:#}"))?;
    if let (Some(path), Ok(serialized)) = (&cached, component.serialize()) {
        let written = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| crate::fsio::write_atomic(path, &serialized));
        if let Err(e) = written {
            eprintln!(
                "warning: cannot cache the compiled plugin in {}: {e}",
                path.display()
            );
        }
    }
    Ok(component)
}

struct StandingWallClock;

impl HostWallClock for StandingWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

struct StandingMonotonicClock;

impl HostMonotonicClock for StandingMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The host services of the call in progress.
struct CallHost(*mut (dyn Host + 'static));

// SAFETY: set only for the duration of a call on the calling thread (see `WasmPlugin::run`).
unsafe impl Send for CallHost {}

/// What a store holds: the WASI context, the memory limit, and the current call's host.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    max_memory: usize,
    memory_refused: Option<usize>,
    host: Option<CallHost>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl State {
    fn host(&mut self) -> Result<&mut dyn Host, String> {
        match &self.host {
            // SAFETY: the pointer is set by `WasmPlugin::run` from a live `&mut dyn Host` and
            // cleared before that borrow ends; the guest runs on this thread, inside the call.
            Some(CallHost(host)) => Ok(unsafe { &mut **host }),
            None => Err("host services are available only during a hook call".into()),
        }
    }
}

impl types::Host for State {}

/// Runs a host service for a guest; a panic in it becomes the guest's error instead of
/// unwinding through the guest's frames.
fn serving<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the host failed serving the call".into()))
}

impl self::axl::plugin::host::Host for State {
    fn call(&mut self, request: String) -> Result<String, String> {
        serving(|| {
            let host = self.host()?;
            wire::serve_host(host, &request).map_err(|e| e.message)
        })
    }

    fn parameter(&mut self, name: String) -> Result<types::Tensor, String> {
        serving(|| {
            let host = self.host()?;
            let view = host.parameter(&name).map_err(|e| e.message)?;
            Ok(types::Tensor {
                shape: view.shape.iter().map(|&d| d as u64).collect(),
                data: view.data.to_vec(),
            })
        })
    }
}

/// The addresses `allow_net` grants: every address each host name resolves to now, with
/// the port when one is given.
fn granted_addresses(hosts: &[String]) -> Result<Vec<(SocketAddr, bool)>, String> {
    let mut granted = Vec::new();
    for entry in hosts {
        let (name, port) = match entry.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => (name, Some(port)),
            _ => (entry.as_str(), None),
        };
        let lookup = format!("{name}:{}", port.unwrap_or("0"));
        let addresses = lookup
            .to_socket_addrs()
            .map_err(|e| format!("allow_net: cannot resolve `{entry}`: {e}"))?;
        granted.extend(addresses.map(|a| (a, port.is_some())));
    }
    Ok(granted)
}

/// A directory as the sandbox grants it: its host path, and the path the guest opens.
fn preopen(path: &Path, base_dir: &Path) -> (PathBuf, String) {
    let host = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    };
    let guest = path.to_string_lossy().trim_start_matches("./").to_string();
    (host, guest)
}

/// `path` with `.` and `..` resolved without touching the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The WASI context of a sandbox: nothing but what the settings grant.
fn wasi_context(sandbox: &Sandbox, base_dir: &Path, output_dir: &Path) -> Result<WasiCtx, String> {
    let mut builder = WasiCtxBuilder::new();
    builder.allow_blocking_current_thread(true);
    if !sandbox.allow_clock {
        builder.wall_clock(StandingWallClock);
        builder.monotonic_clock(StandingMonotonicClock);
    }
    for var in &sandbox.allow_env {
        if let Ok(value) = std::env::var(var) {
            builder.env(var, value);
        }
    }
    for dir in &sandbox.allow_read {
        let (host, guest) = preopen(dir, base_dir);
        builder
            .preopened_dir(&host, &guest, FsPerms::ReadOnly)
            .map_err(|e| format!("allow_read: cannot open {}: {e}", host.display()))?;
    }
    let output = std::fs::create_dir_all(output_dir)
        .and_then(|_| output_dir.canonicalize())
        .map_err(|e| format!("cannot create output_dir {}: {e}", output_dir.display()))?;
    for dir in &sandbox.allow_write {
        let (host, guest) = preopen(dir, base_dir);
        let written = lexical(&host);
        let lexically_inside = written.starts_with(lexical(&base_dir.join(output_dir)))
            || written.starts_with(&output);
        let inside = lexically_inside
            && std::fs::create_dir_all(&host)
                .and_then(|_| host.canonicalize())
                .map(|h| h.starts_with(&output))
                .unwrap_or(false);
        if !inside {
            return Err(format!(
                "allow_write: {} is not under output_dir ({}); a plugin may write only there",
                dir.display(),
                output_dir.display()
            ));
        }
        builder
            .preopened_dir(&host, &guest, FsPerms::ReadWrite)
            .map_err(|e| format!("allow_write: cannot open {}: {e}", host.display()))?;
    }
    let granted = granted_addresses(&sandbox.allow_net)?;
    let any_net = !granted.is_empty();
    builder
        .allow_tcp(any_net)
        .allow_udp(false)
        .allow_ip_name_lookup(any_net);
    builder.socket_addr_check(move |addr, usage| {
        let granted_peer = || {
            granted.iter().any(|(g, with_port)| {
                g.ip() == addr.ip() && (!with_port || g.port() == addr.port())
            })
        };
        let ok = match usage {
            // The implicit bind of an outgoing socket: any local address, a port of the OS's
            // choosing.
            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
                any_net && addr.ip().is_unspecified() && addr.port() == 0
            }
            SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
                granted_peer()
            }
            // A plugin is a client: it never listens or accepts.
            SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => false,
        };
        Box::pin(async move { ok })
    });
    Ok(builder.build())
}

/// A loaded WebAssembly plugin.
pub struct WasmPlugin {
    manifest: Manifest,
    pre: PluginPre<State>,
    sandbox: Sandbox,
    base_dir: PathBuf,
    output_dir: PathBuf,
    live: Option<(Store<State>, Plugin)>,
    /// The last `configure` request, replayed into an instance made after a trap.
    configured: Option<String>,
}

/// The content hash of a plugin file, as the preprocessing cache records it.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl WasmPlugin {
    /// Compiles (or takes from the cache) the component at `path` and reads its manifest.
    pub fn load(
        path: &Path,
        sandbox: &Sandbox,
        base_dir: &Path,
        output_dir: &Path,
    ) -> Result<(Self, String), String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let hash = content_hash(&bytes);
        let component = compile(&bytes)?;
        let mut linker: Linker<State> = Linker::new(engine());
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| format!("cannot link WASI: {e:#}"))?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("cannot link the host interface: {e:#}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(PluginPre::new)
            .map_err(|e| {
                format!("is not an axl plugin component for the world axl:plugin/plugin@0.2.0, or imports what axl does not offer: {e:#}")
            })?;
        let mut plugin = Self {
            manifest: Manifest {
                name: String::new(),
                version: String::new(),
                api_version: axl_plugin_api::API_VERSION,
                description: String::new(),
                hooks: Vec::new(),
                config_schema: Default::default(),
                provides: Default::default(),
            },
            pre,
            sandbox: sandbox.clone(),
            base_dir: base_dir.to_path_buf(),
            output_dir: output_dir.to_path_buf(),
            live: None,
            configured: None,
        };
        let json = plugin
            .run(None, |store, p| p.axl_plugin_hooks().call_manifest(store))
            .map_err(|e| format!("manifest: {}", e.message))?;
        plugin.manifest =
            serde_json::from_str(&json).map_err(|e| format!("malformed manifest: {e}"))?;
        Ok((plugin, hash))
    }

    fn instantiate(&self) -> Result<(Store<State>, Plugin), PluginError> {
        let wasi = wasi_context(&self.sandbox, &self.base_dir, &self.output_dir)
            .map_err(PluginError::new)?;
        let state = State {
            wasi,
            table: ResourceTable::new(),
            max_memory: (self.sandbox.max_memory_mb as usize).saturating_mul(1 << 20),
            memory_refused: None,
            host: None,
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| s);
        store.set_epoch_deadline(self.deadline_ticks());
        let clock = CallClock::start();
        let plugin = self.pre.instantiate(&mut store);
        drop(clock);
        let plugin = plugin.map_err(|e| self.failure(&store, e))?;
        Ok((store, plugin))
    }

    fn deadline_ticks(&self) -> u64 {
        self.sandbox.timeout_ms.div_ceil(TICK.as_millis() as u64) + 1
    }

    fn failure(&self, store: &Store<State>, error: wasmtime::Error) -> PluginError {
        if let Some(desired) = store.data().memory_refused {
            return PluginError::new(format!(
                "ran out of memory: it asked for {} MiB, beyond max_memory_mb = {}",
                desired >> 20,
                self.sandbox.max_memory_mb
            ));
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::new(format!(
                "did not finish within timeout_ms = {}",
                self.sandbox.timeout_ms
            )),
            Some(trap) => PluginError::new(format!("trapped: {trap}")),
            None => PluginError::new(format!("failed: {error:#}")),
        }
    }

    /// Runs `f` on the live instance (made anew if the last call trapped), with `host` as the
    /// host services and the time limit armed.
    fn run<T>(
        &mut self,
        host: Option<&mut dyn Host>,
        f: impl FnOnce(&mut Store<State>, &Plugin) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let replay = match self.live {
            Some(_) => None,
            None => {
                self.live = Some(self.instantiate()?);
                self.configured.clone()
            }
        };
        let deadline = self.deadline_ticks();
        let (store, plugin) = self.live.as_mut().expect("instantiated above");
        store.set_epoch_deadline(deadline);
        store.data_mut().memory_refused = None;
        store.data_mut().host = host.map(|h| {
            // SAFETY: erases the borrow's lifetime; the pointer is cleared below, before
            // `host` can be used again by the caller.
            let ptr: *mut (dyn Host + '_) = h;
            CallHost(unsafe {
                std::mem::transmute::<*mut (dyn Host + '_), *mut (dyn Host + 'static)>(ptr)
            })
        });
        let clock = CallClock::start();
        let replayed = match &replay {
            Some(request) => plugin
                .axl_plugin_hooks()
                .call_call(&mut *store, types::Hook::Configure, request)
                .and_then(|answer| {
                    answer.map(|_| ()).map_err(|e| {
                        wasmtime::Error::msg(format!("configure, replayed in a new instance: {e}"))
                    })
                }),
            None => Ok(()),
        };
        let result = replayed.and_then(|()| f(store, plugin));
        drop(clock);
        store.data_mut().host = None;
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                let (store, _) = self.live.take().expect("live during the call");
                Err(self.failure(&store, error))
            }
        }
    }
}

impl Channel for WasmPlugin {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn call(
        &mut self,
        hook: Hook,
        payload: &str,
        host: &mut dyn Host,
    ) -> Result<String, PluginError> {
        if hook == Hook::Configure {
            self.configured = Some(payload.to_string());
        }
        let wit_hook = hook_to_wit(hook);
        self.run(Some(host), |store, p| {
            p.axl_plugin_hooks()
                .call_call(store, wit_hook, &payload.to_string())
        })?
        .map_err(PluginError::new)
    }

    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        let tensor = types::Tensor {
            shape: logits.shape.iter().map(|&d| d as u64).collect(),
            data: logits.data.to_vec(),
        };
        let batch = serde_json::to_string(batch)
            .map_err(|e| PluginError::new(format!("cannot encode the batch: {e}")))?;
        let output = self
            .run(Some(host), |store, p| {
                p.axl_plugin_hooks()
                    .call_compute_loss(store, &tensor, &batch)
            })?
            .map_err(PluginError::new)?;
        let Some(output) = output else {
            return Ok(None);
        };
        if output.grad.len() != grad.data.len() {
            return Err(PluginError::new(format!(
                "returned a gradient of {} values for logits of {}",
                output.grad.len(),
                grad.data.len()
            )));
        }
        grad.data.copy_from_slice(&output.grad);
        Ok(Some(output.loss))
    }

    fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let copies: Vec<types::Gradient> = gradients
            .iter()
            .map(|g| types::Gradient {
                name: g.name.to_string(),
                grad: types::Tensor {
                    shape: g.grad.shape.iter().map(|&d| d as u64).collect(),
                    data: g.grad.data.to_vec(),
                },
            })
            .collect();
        let edited = self
            .run(Some(host), |store, p| {
                p.axl_plugin_hooks().call_on_gradients(store, &copies)
            })?
            .map_err(PluginError::new)?;
        if edited.len() != gradients.len() {
            return Err(PluginError::new("returned a different number of gradients"));
        }
        for (g, e) in gradients.iter_mut().zip(edited) {
            if e.name != g.name || e.grad.data.len() != g.grad.data.len() {
                return Err(PluginError::new(format!(
                    "returned gradient `{}` in place of `{}`, or resized it",
                    e.name, g.name
                )));
            }
            g.grad.data.copy_from_slice(&e.grad.data);
        }
        Ok(())
    }
}

fn hook_to_wit(hook: Hook) -> types::Hook {
    use types::Hook as W;
    match hook {
        Hook::Configure => W::Configure,
        Hook::LoadDatasets => W::LoadDatasets,
        Hook::FormatExample => W::FormatExample,
        Hook::PreModelLoad => W::PreModelLoad,
        Hook::PostModelBuild => W::PostModelBuild,
        Hook::PreLoraLoad => W::PreLoraLoad,
        Hook::PostLoraLoad => W::PostLoraLoad,
        Hook::PostModelLoad => W::PostModelLoad,
        Hook::CreateOptimizer => W::CreateOptimizer,
        Hook::LrSchedule => W::LrSchedule,
        Hook::ComputeLoss => W::ComputeLoss,
        Hook::OnGradients => W::OnGradients,
        Hook::OnTrainBegin => W::OnTrainBegin,
        Hook::OnStepEnd => W::OnStepEnd,
        Hook::OnLog => W::OnLog,
        Hook::OnEvaluate => W::OnEvaluate,
        Hook::OnSave => W::OnSave,
        Hook::OnTrainEnd => W::OnTrainEnd,
        Hook::Reward => W::Reward,
        Hook::PostTrain => W::PostTrain,
        Hook::OnError => W::OnError,
        Hook::Commands => W::Commands,
    }
}
