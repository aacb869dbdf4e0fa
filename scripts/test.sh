#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, checks format and
# lints, then runs every test (unit, power-loss simulation, end-to-end with the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components the checks need (the machine's rustup toolchain may lack them).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --workspace
