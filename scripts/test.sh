#!/usr/bin/env bash
# Runs all of Attune's tests, the end-to-end test of the desktop app included.
# Needs scripts/setup.sh to have run once. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/fetch-model.sh >/dev/null
scripts/build-ui.sh
# The end-to-end test runs the app and CLI binaries, which cargo test does not
# build. `--workspace --all-targets` resolves features as `cargo test --workspace`
# does, so this build and the tests share every artifact (nothing builds twice).
# Release profile: the tests exercise the build users run.
cargo build --release --workspace --all-targets
cargo test --release --workspace "$@"
# The official OpenAI Python client against `attune serve`.
scripts/test-openai.sh
