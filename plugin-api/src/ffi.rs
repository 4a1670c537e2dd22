//! The native-library transport: the `abi_stable` root module a plugin library exports, and
//! the ABI-checked trait objects that carry hook calls and host services across it.
//!
//! A library exports one [`PluginModule`]. The host checks, in order: `abi_stable`'s own
//! header and this crate's version (a different `0.y` is refused before any layout is
//! compared), the layout of every type below, and the manifest's API version
//! ([`crate::ApiVersion::loads`]). Hook calls then travel as the JSON of [`crate::wire`];
//! tensors cross as slices of the host's memory, valid for the call.
//!
//! Native plugins are trusted code running in the host's process, with the host's rights.

// `sabi_trait` expands to impls inside a generated constant.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_trait;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::sabi_types::RMut;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString};
use abi_stable::{declare_root_module_statics, package_version_strings, StableAbi};

/// A read-only tensor crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiTensor<'a> {
    /// The shape.
    pub shape: RSlice<'a, usize>,
    /// The elements, row-major.
    pub data: RSlice<'a, f32>,
}

/// A writable tensor crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiTensorMut<'a> {
    /// The shape.
    pub shape: RSlice<'a, usize>,
    /// The elements, row-major.
    pub data: RSliceMut<'a, f32>,
}

/// A named gradient crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiGradient<'a> {
    /// The parameter's name.
    pub name: RStr<'a>,
    /// Its gradient.
    pub grad: FfiTensorMut<'a>,
}

/// The host services, as the host hands them to a native plugin for one call.
#[sabi_trait]
pub trait FfiHost {
    /// A JSON [`crate::wire::HostCall`]; the JSON answer.
    fn call(&mut self, call: RStr<'_>) -> RResult<RString, RString>;

    /// [`crate::Host::parameter`].
    #[sabi(last_prefix_field)]
    fn parameter(&mut self, name: RStr<'_>) -> RResult<FfiTensor<'_>, RString>;
}

/// The host services trait object a call receives.
pub type FfiHostRef<'a> = FfiHost_TO<'a, RMut<'a, ()>>;

/// One plugin instance inside a native library.
#[sabi_trait]
pub trait FfiPlugin: Send {
    /// The JSON call `hook(payload)` of [`crate::wire`]; the JSON answer.
    fn call(
        &mut self,
        hook: RStr<'_>,
        payload: RStr<'_>,
        host: FfiHostRef<'_>,
    ) -> RResult<RString, RString>;

    /// [`crate::Plugin::compute_loss`], the batch as JSON.
    fn compute_loss(
        &mut self,
        logits: FfiTensor<'_>,
        grad: FfiTensorMut<'_>,
        batch: RStr<'_>,
        host: FfiHostRef<'_>,
    ) -> RResult<ROption<f64>, RString>;

    /// [`crate::Plugin::on_gradients`].
    #[sabi(last_prefix_field)]
    fn on_gradients(
        &mut self,
        gradients: RSliceMut<'_, FfiGradient<'_>>,
        host: FfiHostRef<'_>,
    ) -> RResult<(), RString>;
}

/// An owned plugin instance.
pub type FfiPluginBox = FfiPlugin_TO<'static, RBox<()>>;

/// The root module of a plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The API version the library was built against, `MAJOR.MINOR.PATCH`.
    pub api_version: extern "C" fn() -> RString,
    /// The manifest, as JSON.
    pub manifest: extern "C" fn() -> RResult<RString, RString>,
    /// A new plugin instance.
    #[sabi(last_prefix_field)]
    pub instantiate: extern "C" fn() -> RResult<FfiPluginBox, RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "axl_plugin";
    const NAME: &'static str = "axl plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

impl<'a> From<crate::TensorView<'a>> for FfiTensor<'a> {
    fn from(view: crate::TensorView<'a>) -> Self {
        Self {
            shape: view.shape.into(),
            data: view.data.into(),
        }
    }
}

impl<'a> From<FfiTensor<'a>> for crate::TensorView<'a> {
    fn from(t: FfiTensor<'a>) -> Self {
        Self {
            shape: t.shape.as_slice(),
            data: t.data.as_slice(),
        }
    }
}

impl<'a> From<crate::TensorViewMut<'a>> for FfiTensorMut<'a> {
    fn from(view: crate::TensorViewMut<'a>) -> Self {
        Self {
            shape: view.shape.into(),
            data: view.data.into(),
        }
    }
}

impl<'a> From<FfiTensorMut<'a>> for crate::TensorViewMut<'a> {
    fn from(t: FfiTensorMut<'a>) -> Self {
        Self {
            shape: t.shape.as_slice(),
            data: t.data.into_mut_slice(),
        }
    }
}

/// Runs one side of a call across the boundary: its error, or a panic (which must not unwind
/// through the other side's frames), becomes the error string that crosses. A panic reads
/// `{panicked}: {its message}`.
pub fn guarded<T>(
    panicked: &str,
    f: impl FnOnce() -> Result<T, crate::PluginError>,
) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => RResult::ROk(value),
        Ok(Err(e)) => RResult::RErr(e.message.into()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            RResult::RErr(format!("{panicked}: {message}").into())
        }
    }
}
