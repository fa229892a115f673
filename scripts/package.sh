#!/usr/bin/env bash
# Builds Attune's installable packages with Tauri's bundler from the release build (the
# UI embedded in the binary): a .deb and an .rpm under target/release/bundle/. The
# AppImage is not built: Tauri's bundler downloads its tools (linuxdeploy and its
# plugins) from GitHub while bundling, and set-up here works without that.
#
# Usage: scripts/package.sh [--install]
#   prints the .deb's path on stdout (the build's messages go to stderr);
#   --install   also install the .deb with apt (as root, or with sudo) and print the
#               installed app's path instead
# Needs scripts/setup.sh to have run once (it installs tauri-cli from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"

install=0
for arg in "$@"; do
  case "$arg" in
    --install) install=1 ;;
    -h | --help)
      sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "package: unknown option $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

tauri="${ATTUNE_TAURI_CLI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attune/tauri-cli}/node_modules/.bin/tauri"
if ! "$tauri" --version >/dev/null 2>&1; then
  echo "package: tauri-cli is not installed at $tauri; run scripts/setup.sh" >&2
  exit 1
fi
target_dir="${CARGO_TARGET_DIR:-$root/target}"
scripts/build-ui.sh >&2
# The same build as setup.sh and test.sh (nothing is rebuilt when they ran): the
# bundler packs the binary as it is.
cargo build --release --workspace --all-targets >&2
version=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' src-tauri/tauri.conf.json | head -n 1)
deb="$target_dir/release/bundle/deb/Attune_${version}_amd64.deb"
# Bundled again only when the binary or the bundle's settings changed since the last .deb.
if [ -f "$deb" ] && [ "$deb" -nt "$target_dir/release/attune-app" ] && [ "$deb" -nt src-tauri/tauri.conf.json ]; then
  echo "package: $deb is up to date" >&2
else
  (cd src-tauri && "$tauri" bundle --bundles deb,rpm) >&2
  # The bundler marks the binary with each package's type after writing the .deb, which
  # leaves the binary newer; the .deb's time records that this build is bundled.
  touch "$deb"
fi

rpm=$(ls "$target_dir"/release/bundle/rpm/Attune-"$version"-*.rpm 2>/dev/null | head -n 1 || true)
if [ ! -f "$deb" ]; then
  echo "package: the bundler did not write $deb" >&2
  exit 1
fi
echo "package: $deb" >&2
if [ -n "$rpm" ]; then echo "package: $rpm" >&2; fi
if [ "$install" = 0 ]; then
  echo "$deb"
  exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "package: installing $deb needs root; run as root or install sudo" >&2
    exit 1
  fi
fi
# --reinstall: a package of the same version from an earlier build is replaced.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --reinstall "$deb" >&2
app=$(dpkg -L attune | grep -x '/usr/bin/[^/]*' | head -n 1)
if [ -z "$app" ] || [ ! -x "$app" ]; then
  echo "package: the installed package has no program in /usr/bin" >&2
  exit 1
fi
echo "$app"
