//! What an axl plugin author depends on: the plugin API ([`axl_plugin_api`], re-exported
//! whole), one macro that exports a [`Plugin`] as a native library or as a WebAssembly
//! component depending on the build target, and helpers for testing a plugin without axl.
//!
//! ```no_run
//! use axl_sdk::prelude::*;
//!
//! #[derive(Default)]
//! struct Shout;
//!
//! impl Plugin for Shout {
//!     fn manifest(&self) -> Manifest {
//!         manifest("shout", env!("CARGO_PKG_VERSION"), &[Hook::OnLog])
//!     }
//!     fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {
//!         host.log(LogLevel::Info, &format!("step {}", event.state.global_step));
//!         Ok(Control::default())
//!     }
//! }
//!
//! axl_sdk::export_plugin!(Shout);
//! ```
//!
//! Built with `cargo build --release` (crate type `cdylib`) the result is a native library
//! (`.so`, `.dylib`, `.dll`), trusted code loaded into the axl process; built with
//! `--target wasm32-wasip2` it is a sandboxed WebAssembly component. Either goes into a
//! config's `plugins:` by path.

#![deny(missing_docs)]

pub use axl_plugin_api::*;
pub use serde_json;

pub mod clock;
#[cfg(not(target_arch = "wasm32"))]
pub mod dylib;
pub mod testing;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

/// The names a plugin usually needs.
pub mod prelude {
    pub use crate::{config_schema, manifest};
    pub use axl_plugin_api::payload::*;
    pub use axl_plugin_api::{
        Gradient, Hook, Host, Manifest, Plugin, PluginError, Provides, Tensor, TensorView,
        TensorViewMut, API_VERSION,
    };
    pub use serde_json::{self, json};
}

/// A manifest for a plugin built against this SDK's API version: name, version and hooks,
/// no config keys and nothing provided (set those fields afterwards).
pub fn manifest(name: &str, version: &str, hooks: &[Hook]) -> Manifest {
    Manifest {
        name: name.to_string(),
        version: version.to_string(),
        api_version: API_VERSION,
        description: String::new(),
        hooks: hooks.to_vec(),
        config_schema: Default::default(),
        provides: Provides::default(),
    }
}

/// A [`Manifest::config_schema`] from a JSON object of key → schema
/// (`json!({"my_key": {"type": "integer"}})`); anything but an object gives no keys.
pub fn config_schema(properties: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match properties {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// Exports a plugin type (`Plugin + Default`): as the root module of a native library, or,
/// when built for `wasm32`, as the exports of the `axl:plugin` component world. Use once, at
/// the crate root of a `cdylib` crate. A native library also needs `abi_stable` among its
/// dependencies (its export attribute names that crate).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(not(target_arch = "wasm32"))]
        $crate::__export_native!($plugin);
        #[cfg(target_arch = "wasm32")]
        $crate::__export_component!($plugin);
    };
}
