//! Native-library plugins: loaded with `abi_stable`, whose header and layout checks come
//! first, then the API version of the manifest. Native plugins are trusted code: they run in
//! the axl process with its rights, and are never unloaded.

use std::path::Path;

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString};
use axl_plugin_api::ffi::{
    FfiGradient, FfiHost, FfiHost_TO, FfiPluginBox, FfiTensor, PluginModuleRef,
};
use axl_plugin_api::payload::LossBatch;
use axl_plugin_api::wire::{self, Channel};
use axl_plugin_api::{
    ApiVersion, Gradient, Hook, Host, Manifest, PluginError, TensorView, TensorViewMut, API_VERSION,
};

/// How to rebuild a plugin against this axl.
fn rebuild_hint() -> String {
    format!(
        "rebuild the plugin against axl-sdk {API_VERSION} (set `axl-sdk = \"{}.{}\"` in its Cargo.toml, then `cargo build --release`)",
        API_VERSION.major, API_VERSION.minor
    )
}

/// The one-line form of a load failure (layout mismatches are long type dumps).
fn describe(error: LibraryError) -> String {
    match error {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "was built against plugin API {actual_version}, and this axl implements {expected_version}: {}",
            rebuild_hint()
        ),
        LibraryError::AbiInstability(_) => format!(
            "has types that do not match this axl's plugin API {API_VERSION} (an ABI layout mismatch): {}",
            rebuild_hint()
        ),
        LibraryError::InvalidAbiHeader(_) => format!(
            "was built with an abi_stable this axl cannot read: {}",
            rebuild_hint()
        ),
        LibraryError::OpenError { err, .. } => format!("cannot be opened: {err}"),
        LibraryError::GetSymbolError { .. } => {
            "is not an axl plugin (it exports no axl plugin module; use `axl_sdk::export_plugin!`)"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// A loaded native plugin.
pub struct NativePlugin {
    manifest: Manifest,
    instance: FfiPluginBox,
}

impl NativePlugin {
    /// Opens the library at `path`, checks it, and makes the plugin instance.
    pub fn load(path: &Path) -> Result<Self, String> {
        let header = lib_header_from_path(path).map_err(describe)?;
        // The API crate's version is the API version: compare it before the layouts, whose
        // mismatch would otherwise be all a user learns.
        let built_against = header.version_strings().version;
        if let Some(version) = ApiVersion::parse(built_against.as_str()) {
            if !API_VERSION.loads(version) {
                return Err(format!(
                    "was built against plugin API {version}, and this axl implements {API_VERSION}: {}",
                    rebuild_hint()
                ));
            }
        }
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(describe)?;
        let claimed = (module.api_version())().into_string();
        let version = ApiVersion::parse(&claimed)
            .ok_or_else(|| format!("reports a malformed API version `{claimed}`"))?;
        if !API_VERSION.loads(version) {
            return Err(format!(
                "was built against plugin API {version}, and this axl implements {API_VERSION}: {}",
                rebuild_hint()
            ));
        }
        let json = (module.manifest())()
            .into_result()
            .map_err(|e| format!("manifest: {e}"))?;
        let manifest: Manifest =
            serde_json::from_str(&json).map_err(|e| format!("malformed manifest: {e}"))?;
        let instance = (module.instantiate())()
            .into_result()
            .map_err(|e| format!("cannot be instantiated: {e}"))?;
        Ok(Self { manifest, instance })
    }
}

/// The host services handed across for one call.
struct HostBridge<'a> {
    host: &'a mut dyn Host,
}

/// Runs the host's side of a call from a plugin; a panic becomes the plugin's error.
fn guarded<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, RString> {
    axl_plugin_api::ffi::guarded("the host panicked serving the call", f)
}

impl FfiHost for HostBridge<'_> {
    fn call(&mut self, call: RStr<'_>) -> RResult<RString, RString> {
        guarded(|| wire::serve_host(self.host, call.as_str()).map(RString::from))
    }

    fn parameter(&mut self, name: RStr<'_>) -> RResult<FfiTensor<'_>, RString> {
        guarded(|| self.host.parameter(name.as_str()).map(FfiTensor::from))
    }
}

fn answer<T>(result: RResult<T, RString>) -> Result<T, PluginError> {
    result
        .into_result()
        .map_err(|e| PluginError::new(e.into_string()))
}

impl Channel for NativePlugin {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn call(
        &mut self,
        hook: Hook,
        payload: &str,
        host: &mut dyn Host,
    ) -> Result<String, PluginError> {
        let mut bridge = HostBridge { host };
        let host = FfiHost_TO::from_ptr(&mut bridge, TD_Opaque);
        answer(self.instance.call(hook.name().into(), payload.into(), host)).map(String::from)
    }

    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        let batch = serde_json::to_string(batch)
            .map_err(|e| PluginError::new(format!("cannot encode the batch: {e}")))?;
        let mut bridge = HostBridge { host };
        let host = FfiHost_TO::from_ptr(&mut bridge, TD_Opaque);
        let loss = answer(self.instance.compute_loss(
            logits.into(),
            grad.into(),
            batch.as_str().into(),
            host,
        ))?;
        Ok(loss.into_option())
    }

    fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let mut crossing: Vec<FfiGradient<'_>> = gradients
            .iter_mut()
            .map(|g| FfiGradient {
                name: g.name.into(),
                grad: TensorViewMut {
                    shape: g.grad.shape,
                    data: &mut *g.grad.data,
                }
                .into(),
            })
            .collect();
        let mut bridge = HostBridge { host };
        let host = FfiHost_TO::from_ptr(&mut bridge, TD_Opaque);
        answer(
            self.instance
                .on_gradients(crossing.as_mut_slice().into(), host),
        )
    }
}
