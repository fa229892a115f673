#!/usr/bin/env bash
# Runs all of Attune's tests, the end-to-end test of the desktop app included (on the
# .deb this build makes, installed with apt: needs root or sudo).
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
# The package users install: bundled from this build, installed with apt, and the
# app the end-to-end test drives (ATTUNE_E2E_APP).
app=$(scripts/package.sh --install | tail -n 1)
echo "test: the end-to-end test drives the installed $app"
ATTUNE_E2E_APP="$app" cargo test --release --workspace "$@"
# The official OpenAI Python client against `attune serve`.
scripts/test-openai.sh
# A run bundle's CPU round trip: export for TRL, run.sh under accelerate on one CPU process,
# first-step loss against Attune's, import, evaluate; the Axolotl YAML through Axolotl's own
# config loader (a few minutes; its Python environment comes from scripts/setup-trl.sh).
scripts/check-bundle.sh target/release/attune
