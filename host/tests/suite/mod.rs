//! Test modules, one per area of the host.

mod agreement;
mod bad_input;
mod chat_templates;
mod cli;
mod common;
pub mod data;
mod examples;
mod generation;
mod hub_download;
mod integrations;
mod kernels;
mod lora;
mod packing;
mod plugins;
mod resolve;
mod tokenizer;
mod train;
