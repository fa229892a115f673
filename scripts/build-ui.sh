#!/usr/bin/env bash
# Builds the Leptos UI into ui/dist without trunk: cargo (wasm32) + wasm-bindgen,
# then copies the static files. The Tauri app embeds ui/dist when it compiles.
# Usage: scripts/build-ui.sh            (skips the work when ui/dist is up to date)
#        scripts/build-ui.sh --force
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dist="$root/ui/dist"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
wasm="$target_dir/wasm32-unknown-unknown/release/attune_ui.wasm"

force=0
[ "${1:-}" = "--force" ] && force=1

if ! command -v wasm-bindgen >/dev/null 2>&1; then
  echo "build-ui: wasm-bindgen is not installed; run scripts/setup.sh" >&2
  exit 1
fi
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
have=$(wasm-bindgen --version | awk '{ print $2 }')
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  echo "build-ui: wasm-bindgen-cli $have does not match wasm-bindgen $want in Cargo.lock;" >&2
  echo "          run: cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi

# Up to date when every UI and protocol source is older than the built index.
if [ "$force" = 0 ] && [ -f "$dist/index.html" ] && [ -f "$dist/attune_ui_bg.wasm" ]; then
  newer=$(find ui/src ui/Cargo.toml ui/index.html ui/main.js ui/locale-shim.js ui/style.css ui/css ui/vendor icons/icon.png crates/protocol Cargo.lock \
    -newer "$dist/index.html" -print -quit)
  if [ -z "$newer" ]; then
    echo "build-ui: ui/dist is up to date"
    exit 0
  fi
fi

cargo build -p attune-ui --target wasm32-unknown-unknown --release
tmp="$root/ui/dist.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
wasm-bindgen --target web --no-typescript --out-dir "$tmp" "$wasm"
cp ui/index.html ui/main.js ui/locale-shim.js ui/style.css icons/icon.png "$tmp/"
cp -r ui/vendor "$tmp/vendor"
mkdir -p "$tmp/css"
# One stylesheet per screen in ui/css, served as one file.
cat ui/css/*.css > "$tmp/css/pages.css"
rm -rf "$dist"
mv "$tmp" "$dist"
echo "build-ui: built $dist"
