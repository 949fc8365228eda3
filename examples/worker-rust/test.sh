#!/usr/bin/env bash
# Runs the worker's tests against $DATABASE_URL (a database with the
# idempotency extension created): builds with the locked dependencies
# (Cargo.lock) in debug, then runs tests/worker.rs.
set -euo pipefail
cd "$(dirname "$0")"

command -v cargo >/dev/null || { echo "test.sh: needs Rust 1.95 (cargo)" >&2; exit 1; }
cargo build --locked --tests
timeout 300 cargo test --locked --test worker -- --show-output
