//! The native-library side of [`crate::export_plugin!`]: a [`Plugin`] behind the
//! `abi_stable` root module of [`axl_plugin_api::ffi`], with every call guarded so that a
//! panic becomes an error instead of ending the host's process.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSliceMut, RStr, RString};
use axl_plugin_api::ffi::{
    FfiGradient, FfiHostRef, FfiPlugin, FfiPluginBox, FfiPlugin_TO, FfiTensor, FfiTensorMut,
};
use axl_plugin_api::wire::{self, HostChannel, RemoteHost};
use axl_plugin_api::{Gradient, Hook, Plugin, PluginError, TensorView, API_VERSION};

/// A plugin as a native library exports it.
pub struct Exported<P>(pub P);

/// The host services of one call.
struct NativeHost<'a>(FfiHostRef<'a>);

impl HostChannel for NativeHost<'_> {
    fn call(&mut self, call: &str) -> Result<String, PluginError> {
        self.0
            .call(call.into())
            .into_result()
            .map(String::from)
            .map_err(|e| PluginError::new(e.into_string()))
    }

    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError> {
        self.0
            .parameter(name.into())
            .into_result()
            .map(TensorView::from)
            .map_err(|e| PluginError::new(e.into_string()))
    }
}

/// Runs the plugin's side of a call; a panic becomes an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, RString> {
    axl_plugin_api::ffi::guarded("panicked", f)
}

impl<P: Plugin> FfiPlugin for Exported<P> {
    fn call(
        &mut self,
        hook: RStr<'_>,
        payload: RStr<'_>,
        host: FfiHostRef<'_>,
    ) -> RResult<RString, RString> {
        guarded(|| {
            let hook = Hook::from_name(hook.as_str())
                .ok_or_else(|| PluginError::new(format!("unknown hook `{hook}`")))?;
            let mut host = RemoteHost(NativeHost(host));
            wire::serve(&mut self.0, hook, payload.as_str(), &mut host).map(RString::from)
        })
    }

    fn compute_loss(
        &mut self,
        logits: FfiTensor<'_>,
        grad: FfiTensorMut<'_>,
        batch: RStr<'_>,
        host: FfiHostRef<'_>,
    ) -> RResult<ROption<f64>, RString> {
        guarded(|| {
            let batch = serde_json::from_str(batch.as_str())
                .map_err(|e| PluginError::new(format!("malformed loss batch: {e}")))?;
            let mut host = RemoteHost(NativeHost(host));
            let loss = self
                .0
                .compute_loss(logits.into(), grad.into(), &batch, &mut host)?;
            Ok(loss.into())
        })
    }

    fn on_gradients(
        &mut self,
        mut gradients: RSliceMut<'_, FfiGradient<'_>>,
        host: FfiHostRef<'_>,
    ) -> RResult<(), RString> {
        guarded(|| {
            let mut views: Vec<Gradient<'_>> = gradients
                .iter_mut()
                .map(|g| Gradient {
                    name: g.name.as_str(),
                    grad: axl_plugin_api::TensorViewMut {
                        shape: g.grad.shape.as_slice(),
                        data: g.grad.data.as_mut_slice(),
                    },
                })
                .collect();
            let mut host = RemoteHost(NativeHost(host));
            self.0.on_gradients(&mut views, &mut host)
        })
    }
}

/// The root module's `api_version`.
pub extern "C" fn api_version() -> RString {
    API_VERSION.to_string().into()
}

/// The root module's `manifest` for `P`.
pub extern "C" fn manifest<P: Plugin + Default>() -> RResult<RString, RString> {
    guarded(|| {
        serde_json::to_string(&P::default().manifest())
            .map(RString::from)
            .map_err(|e| PluginError::new(format!("cannot encode the manifest: {e}")))
    })
}

/// The root module's `instantiate` for `P`.
pub extern "C" fn instantiate<P: Plugin + Default + 'static>() -> RResult<FfiPluginBox, RString> {
    guarded(|| Ok(FfiPlugin_TO::from_value(Exported(P::default()), TD_Opaque)))
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_native {
    ($plugin:ty) => {
        #[::abi_stable::export_root_module]
        pub fn __axl_plugin_root_module() -> $crate::ffi::PluginModuleRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::ffi::PluginModule {
                api_version: $crate::dylib::api_version,
                manifest: $crate::dylib::manifest::<$plugin>,
                instantiate: $crate::dylib::instantiate::<$plugin>,
            }
            .leak_into_prefix()
        }
    };
}
