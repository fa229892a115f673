#!/usr/bin/env bash
# Sets up everything Attune needs on a fresh Debian 12 machine, then runs the app
# on the default model. Idempotent: steps that are already done are skipped.
#
# Usage: scripts/setup.sh [--no-run]
#   --no-run   set up and build, but do not open the window (CI uses this)
# Runs as root, or as a user with sudo (for apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"

run=1
for arg in "$@"; do
  case "$arg" in
    --no-run) run=0 ;;
    -h | --help)
      sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup: unknown option $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

# 1. System packages (webkit for the window, the WebDriver and Xvfb for tests).
packages=(libwebkit2gtk-4.1-dev build-essential libxdo-dev libssl-dev
  libayatana-appindicator3-dev librsvg2-dev webkit2gtk-driver xvfb xauth
  pkg-config curl python3-pip python3-venv libdbus-1-dev cmake)
# npm fetches tauri-cli (the bundler); a Node.js from elsewhere that has npm is kept.
if ! command -v npm >/dev/null 2>&1; then packages+=(nodejs npm); fi
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  step "Installing system packages: ${missing[*]}"
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "setup: installing ${missing[*]} needs root; run as root or install sudo" >&2
      exit 1
    fi
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
else
  step "System packages: all present"
fi

# 2. Rust tools: the wasm target, wasm-bindgen-cli at Cargo.lock's version, tauri-driver,
#    tauri-cli (Tauri's bundler, for the .deb) at the tauri crate's minor version.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not installed; install Rust with rustup first" >&2
  exit 1
fi
if rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  step "Rust target wasm32-unknown-unknown: present"
else
  step "Adding the Rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" = "$want" ]; then
  step "wasm-bindgen-cli $want: present"
else
  step "Installing wasm-bindgen-cli $want"
  # --locked may name a dependency version the registry no longer serves.
  cargo install wasm-bindgen-cli --version "$want" --locked ||
    cargo install wasm-bindgen-cli --version "$want" --force
fi
if command -v tauri-driver >/dev/null 2>&1; then
  step "tauri-driver: present"
else
  step "Installing tauri-driver"
  cargo install tauri-driver --locked
fi

# Tauri's bundler: tauri-cli as the npm registry ships it prebuilt (@tauri-apps/cli, a few
# seconds; compiling it with `cargo install tauri-cli` took over an hour on 2 cores), at the
# tauri crate's minor version, in a cache folder of its own (never in the repository).
tauri_minor=$(awk '/^name = "tauri"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock | cut -d. -f1,2)
tauri_cli_dir="${ATTUNE_TAURI_CLI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attune/tauri-cli}"
have=$("$tauri_cli_dir/node_modules/.bin/tauri" --version 2>/dev/null | awk '{ print $2 }' | cut -d. -f1,2 || true)
if [ "$have" = "$tauri_minor" ]; then
  step "tauri-cli $tauri_minor: present"
else
  step "Installing tauri-cli $tauri_minor (Tauri's bundler, from the npm registry)"
  mkdir -p "$tauri_cli_dir"
  npm install --prefix "$tauri_cli_dir" --no-audit --no-fund --loglevel=error "@tauri-apps/cli@~$tauri_minor"
fi

# 3. The default model, the UI and the binaries (release profile: one build serves
#    the app, the CLI, the tests, the end-to-end test and the benches).
step "Fetching the default model"
model=$(scripts/fetch-model.sh | tail -n 1)
echo "$model"
step "Python for the export checks (PyPI gguf, transformers, torch; scripts/setup-pycheck.sh)"
scripts/setup-pycheck.sh >/dev/null
step "Building the UI"
scripts/build-ui.sh
step "Building attune (CLI), attune-app (desktop) and the tests"
# The whole workspace with all targets: the same feature resolution as
# `cargo test --workspace`, so scripts/test.sh reuses every artifact.
cargo build --release --workspace --all-targets
target_dir="${CARGO_TARGET_DIR:-$root/target}/release"

# The installable packages (.deb, .rpm) of this build, for `apt-get install`.
step "Bundling the .deb and .rpm"
scripts/package.sh

# 4. Register the default model (adding the same file twice changes nothing).
step "Registering the default model"
"$target_dir/attune" models add "$model"

if [ "$run" = 0 ]; then
  step "Set up. Run the app with: $target_dir/attune-app"
  exit 0
fi

# 5. Run the app; without a display, in Xvfb.
export WEBKIT_DISABLE_DMABUF_RENDERER=1
if [ -z "${DISPLAY:-}" ]; then
  n=99
  while [ -e "/tmp/.X11-unix/X$n" ] || [ -e "/tmp/.X$n-lock" ]; do n=$((n + 1)); done
  step "No \$DISPLAY: starting Xvfb on :$n (the window is drawn off-screen)"
  Xvfb ":$n" -screen 0 1280x860x24 -nolisten tcp >/dev/null 2>&1 &
  xvfb_pid=$!
  trap 'kill "$xvfb_pid" 2>/dev/null || true' EXIT
  export DISPLAY=":$n"
  sleep 1
fi
step "Starting Attune (close the window or press Ctrl+C to stop)"
"$target_dir/attune-app"
