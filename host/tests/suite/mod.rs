//! Test modules, one per area of the host.

mod common;
mod agreement;
mod lora;
