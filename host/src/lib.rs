//! axl: YAML-driven fine-tuning of large language models.
//!
//! This crate is the host runtime: the model code ([`model`]), the configuration
//! ([`config`]), chat templates ([`chat_template`]) and the `axl` command line ([`cli`]).

pub mod allocator;
pub mod chat_template;
pub mod cli;
pub mod config;
pub mod data;
pub mod fsio;
pub mod model;
pub mod plugins;
pub mod setup;
pub mod threads;

// The first-party built-in plugins: linked in so that their registrations are found.
use axl_plugin_cut_cross_entropy as _;
use axl_plugin_grokfast as _;
use axl_plugin_kd as _;
use axl_plugin_liger as _;
use axl_plugin_lm_eval as _;
use axl_plugin_prompt_strategies as _;
use axl_plugin_rewards as _;
use axl_plugin_spectrum as _;
use axl_plugin_swanlab as _;
pub mod train;
