#!/usr/bin/env bash
# The test command: builds the workspace and runs every test. Installs nothing it cannot get
# from the toolchain's own registries.
set -euo pipefail
cd "$(dirname "$0")/.."
# The plugin tests build WebAssembly components.
rustup target add wasm32-wasip2
cargo build --workspace --locked
cargo test --workspace --locked
