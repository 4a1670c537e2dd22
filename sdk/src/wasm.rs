//! The WebAssembly side of [`crate::export_plugin!`]: the guest bindings of the
//! `axl:plugin` world and the functions the exported component forwards to.

use axl_plugin_api::wire::{self, HostChannel, RemoteHost};
use axl_plugin_api::{Gradient, Hook, Plugin, PluginError, TensorView, TensorViewMut};

/// The generated guest bindings of `plugin-api/wit`.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../plugin-api/wit",
        pub_export_macro: true,
        default_bindings_module: "axl_sdk::wasm::bindings",
    });
}

use bindings::axl::plugin::host;
use bindings::axl::plugin::types;
pub use bindings::exports::axl::plugin::hooks::Guest;

/// The host services through the component's imports.
#[derive(Default)]
struct ComponentHost {
    parameter: Vec<f32>,
    shape: Vec<usize>,
}

impl HostChannel for ComponentHost {
    fn call(&mut self, call: &str) -> Result<String, PluginError> {
        host::call(call).map_err(PluginError::new)
    }

    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError> {
        let tensor = host::parameter(name).map_err(PluginError::new)?;
        self.shape = tensor.shape.iter().map(|&d| d as usize).collect();
        self.parameter = tensor.data;
        Ok(TensorView {
            shape: &self.shape,
            data: &self.parameter,
        })
    }
}

fn remote_host() -> RemoteHost<ComponentHost> {
    RemoteHost(ComponentHost::default())
}

/// `manifest` for `P`.
pub fn manifest<P: Plugin + Default>() -> String {
    serde_json::to_string(&P::default().manifest()).unwrap_or_default()
}

/// `call` on `plugin`.
pub fn call(plugin: &mut dyn Plugin, hook: types::Hook, request: &str) -> Result<String, String> {
    let hook = Hook::from_index(hook as u8).ok_or("unknown hook")?;
    wire::serve(plugin, hook, request, &mut remote_host()).map_err(|e| e.message)
}

/// `compute-loss` on `plugin`.
pub fn compute_loss(
    plugin: &mut dyn Plugin,
    logits: types::Tensor,
    batch: &str,
) -> Result<Option<types::LossOutput>, String> {
    let batch = serde_json::from_str(batch).map_err(|e| format!("malformed loss batch: {e}"))?;
    let shape: Vec<usize> = logits.shape.iter().map(|&d| d as usize).collect();
    let mut grad = vec![0.0f32; logits.data.len()];
    let loss = plugin
        .compute_loss(
            TensorView {
                shape: &shape,
                data: &logits.data,
            },
            TensorViewMut {
                shape: &shape,
                data: &mut grad,
            },
            &batch,
            &mut remote_host(),
        )
        .map_err(|e| e.message)?;
    Ok(loss.map(|loss| types::LossOutput { loss, grad }))
}

/// `on-gradients` on `plugin`.
pub fn on_gradients(
    plugin: &mut dyn Plugin,
    mut gradients: Vec<types::Gradient>,
) -> Result<Vec<types::Gradient>, String> {
    let shapes: Vec<Vec<usize>> = gradients
        .iter()
        .map(|g| g.grad.shape.iter().map(|&d| d as usize).collect())
        .collect();
    let mut views: Vec<Gradient<'_>> = gradients
        .iter_mut()
        .zip(&shapes)
        .map(|(g, shape)| Gradient {
            name: &g.name,
            grad: TensorViewMut {
                shape,
                data: &mut g.grad.data,
            },
        })
        .collect();
    plugin
        .on_gradients(&mut views, &mut remote_host())
        .map_err(|e| e.message)?;
    drop(views);
    Ok(gradients)
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_component {
    ($plugin:ty) => {
        const _: () = {
            use $crate::wasm::bindings::exports::axl::plugin::hooks::{
                Gradient, Guest, Hook, LossOutput, Tensor,
            };

            ::std::thread_local! {
                static INSTANCE: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            fn with_plugin<T>(f: impl FnOnce(&mut dyn $crate::Plugin) -> T) -> T {
                INSTANCE.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let plugin =
                        slot.get_or_insert_with(<$plugin as ::std::default::Default>::default);
                    f(plugin)
                })
            }

            struct Component;

            impl Guest for Component {
                fn manifest() -> ::std::string::String {
                    $crate::wasm::manifest::<$plugin>()
                }
                fn call(
                    hook: Hook,
                    request: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    with_plugin(|p| $crate::wasm::call(p, hook, &request))
                }
                fn compute_loss(
                    logits: Tensor,
                    batch: ::std::string::String,
                ) -> ::std::result::Result<::std::option::Option<LossOutput>, ::std::string::String>
                {
                    with_plugin(|p| $crate::wasm::compute_loss(p, logits, &batch))
                }
                fn on_gradients(
                    gradients: ::std::vec::Vec<Gradient>,
                ) -> ::std::result::Result<::std::vec::Vec<Gradient>, ::std::string::String>
                {
                    with_plugin(|p| $crate::wasm::on_gradients(p, gradients))
                }
            }

    $crate::wasm::bindings::export!(Component with_types_in $crate::wasm::bindings);
        };
    };
}
