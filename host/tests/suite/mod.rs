//! Test modules, one per area of the host.

mod common;
mod agreement;
mod lora;
mod generation;
mod resolve;
mod bad_input;
mod cli;
mod hub_download;
mod tokenizer;
pub mod data;
mod packing;
mod chat_templates;
