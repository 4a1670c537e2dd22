//! The contract between axl and its plugins: which hooks a run calls and when, what each
//! receives and returns, how the results of several plugins combine, and the API version that
//! decides whether a plugin can be loaded.
//!
//! A plugin reaches a run only through these hooks, whether it is built into axl, loaded from
//! a native library (trusted code, running in the process), or run as a sandboxed WebAssembly
//! component. The host calls the plugins that implement a hook in the order of the config's
//! `plugins:` list.
//!
//! # When each hook runs
//!
//! | hook | when | combine |
//! |---|---|---|
//! | `commands` | the command line is parsed | all; core commands win a clash |
//! | `configure` | the config is validated, before data or weights | all; any error aborts |
//! | `load_datasets` | before the datasets are read | at most one |
//! | `format_example` | preprocessing, per row of a `type:` the plugin provides (axl's own types too: the built-in `prompt_strategies`, loaded after the listed plugins) | the first that provides it |
//! | `pre_model_load` | before the weights load (kernels, attention) | merge; a conflict is an error |
//! | `post_model_build` | the architecture is built, before adapters | all |
//! | `pre_lora_load`, `post_lora_load` | around creating or loading adapters | all |
//! | `post_model_load` | the model is final (which parameters train) | merge |
//! | `create_optimizer` | trainer setup | first |
//! | `lr_schedule` | every optimizer step | first |
//! | `on_train_begin` | before the first step, also after a resume | all; failures reported |
//! | `compute_loss` | every micro-step: loss and its gradient w.r.t. the logits | first |
//! | `on_gradients` | after backward, before clipping and the optimizer step | all, in list order |
//! | `on_step_end` | after every optimizer step | all; failures reported |
//! | `on_log` | whenever a step's metrics are logged | all; failures reported |
//! | `on_evaluate` | after every evaluation | all; failures reported |
//! | `on_save` | after every checkpoint is written | all; failures reported |
//! | `reward` | completions are scored (RL) | the named reward function |
//! | `on_train_end` | after the last step, before the final save | all; failures reported |
//! | `post_train` | once, after the final save | all; failures reported |
//! | `on_error` | training failed or was interrupted | all; failures reported |
//!
//! "Failures reported" hooks are observational: a failure names the plugin and the hook and,
//! with the plugin's `on_error: skip`, training goes on; every other hook shapes the run, so
//! its failure stops it. [`hooks::Hook`] carries this table as code ([`hooks::Hook::combine`],
//! [`hooks::Hook::fatal`]), and [`hooks`] has the combiners the host applies.
//!
//! # Versions
//!
//! [`API_VERSION`] is the version this crate defines; a plugin's manifest carries the version
//! it was built against, and [`ApiVersion::loads`] decides whether a host can load it.

#![deny(missing_docs)]

#[cfg(not(target_arch = "wasm32"))]
pub mod ffi;
pub mod hooks;
pub mod manifest;
pub mod payload;
pub mod plugin;
#[cfg(not(target_arch = "wasm32"))]
pub mod registry;
pub mod tensor;
pub mod version;
pub mod wire;

pub use hooks::{Combine, CombineError, Contribution, Hook};
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub use inventory;
pub use manifest::{Manifest, ManifestError, Provides};
pub use plugin::{Host, Plugin, PluginError};
pub use tensor::{Gradient, Tensor, TensorView, TensorViewMut};
pub use version::{ApiVersion, API_VERSION};
