//! The model runtime: Hugging Face model directories in, logits, losses and gradients out.
//!
//! [`resolve`] finds a model directory, [`hf_config`] reads its `config.json`,
//! [`safetensors_io`] its weights, [`tokenizer`] its tokenizer files (with [`byte_bpe`], a fast encoder for datasets); [`transformer`] runs the
//! decoder, [`lora`] attaches and saves PEFT adapters, [`save`] writes HF model directories,
//! and [`generate`] decodes with a KV cache.

pub mod byte_bpe;
pub mod error;
pub mod generate;
pub mod hf_config;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod ops;
pub mod resolve;
pub mod safetensors_io;
pub mod save;
pub mod tokenizer;
pub mod transformer;

pub use axl_kernels::Precision;
pub use error::{ModelError, Result};
pub use hf_config::{Architecture, ModelConfig};
pub use layers::Param;
pub use transformer::{CausalLm, KvCache, LoadOptions, PackedLayout};
