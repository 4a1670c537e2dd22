#!/usr/bin/env bash
# The test command: builds the workspace and runs every test. Installs nothing it cannot get
# from the toolchain's own registries.
set -euo pipefail
cd "$(dirname "$0")/.."
# The plugin tests build WebAssembly components.
rustup target add wasm32-wasip2
cargo build --workspace --locked
cargo test --workspace --locked
# The GPU kernels build without a CUDA toolkit; their tests compare each with its CPU
# reference on a GPU, and say on stderr that they are skipped where there is none.
cargo check --locked -p axl-kernels -p axl-bench --features cuda --all-targets
cargo test --locked -p axl-kernels --features cuda --test kernels cuda::
