//! The data pipeline: the `datasets:` section of a configuration in, tokenized training
//! examples out.
//!
//! [`source`] reads files into rows, strategies turn rows into text with trainable spans,
//! tokenization turns those into ids and labels, and packing and the cache follow.

pub mod error;
pub mod source;

pub use error::{DataError, Location};
pub mod config;
pub mod example;
pub mod instruct;
pub mod chat;
pub mod hub;
pub mod pipeline;
pub mod strategy;
