#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the QEMU-run integration tests (every test starts
# its own daemon and QEMU). Installs QEMU first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --locked --workspace --bins
cargo test --locked --workspace "$@"
