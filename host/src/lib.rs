//! axl: YAML-driven fine-tuning of large language models.
//!
//! This crate is the host runtime: it owns the model code ([`model`]), the configuration
//! ([`config`]) and the `axl` command line ([`cli`]).

pub mod fsio;
pub mod model;
