#!/usr/bin/env bash
# Builds Attune with the `cuda` feature (candle's CUDA backend) on Debian 12, to check that the
# GPU build compiles on a machine with no GPU: installs the CUDA toolkit from Debian's non-free
# component (nvidia-cuda-toolkit, CUDA 11.8) when nvcc is missing, then builds in its own target
# folder (the CUDA build recompiles candle and everything above it; keeping it apart leaves the
# default build's artifacts alone).
#
#   scripts/check-cuda-build.sh            # attune-cli (the `attune` binary) with --features cuda
#   scripts/check-cuda-build.sh models     # attune-models only (faster)
#
# Environment:
#   CUDA_COMPUTE_CAP   the GPU generation to compile kernels for (default 80: Ampere, A100; 90 for
#                      H100/H200). Needed without a GPU: candle's kernel build otherwise asks
#                      nvidia-smi.
#   CARGO_TARGET_DIR   default target-cuda/ in the repository.
#   NICE               niceness of the build (default 19: the long nvcc compiles yield the CPU).
#
# Idempotent. Needs root (or sudo) only for the apt steps, and only when nvcc is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-cli}
case "$what" in
cli) pkg=attune-cli ;;
models) pkg=attune-models ;;
*)
  echo "usage: $0 [cli|models]" >&2
  exit 2
  ;;
esac

sudo_if_needed() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v nvcc >/dev/null 2>&1; then
  if ! grep -rqs "non-free" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "==> enabling Debian's contrib and non-free components (nvidia-cuda-toolkit lives there)"
    sudo_if_needed tee /etc/apt/sources.list.d/debian-nonfree.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  echo "==> installing nvidia-cuda-toolkit (a few GB)"
  sudo_if_needed apt-get update
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    nvidia-cuda-toolkit
fi
echo "==> $(nvcc --version | tail -1)"

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
echo "==> cargo build --release -p $pkg --features cuda (compute capability $CUDA_COMPUTE_CAP, into $CARGO_TARGET_DIR)"
start=$(date +%s)
nice -n "${NICE:-19}" cargo build --release -p "$pkg" --features cuda
echo "==> built in $(($(date +%s) - start)) s"
if [ "$pkg" = attune-cli ]; then
  bin="$CARGO_TARGET_DIR/release/attune"
  echo "==> $bin"
  # candle links CUDA's libraries dynamically (cudarc's `dynamic-linking`): the binary needs the
  # NVIDIA driver's libcuda.so.1 and the toolkit's cuBLAS/cuRAND/NVRTC to start at all.
  ldd "$bin" | grep -E "libcuda|libcublas|libcurand|libnvrtc" || true
  "$bin" --version
fi
