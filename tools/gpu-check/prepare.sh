#!/usr/bin/env bash
# Prepares, on a build machine with Rust and nvcc, what a GPU machine without Rust needs for
# one timed run of tools/gpu-check/lease.sh:
#
#   tools/gpu-check/prepare.sh DIR
#
# DIR/bins.tgz: release builds of `gpu-check` and `tuna` with the kernels' PTX and machine code
#   embedded (nvcc and its ptxas must be found: $NVCC, $CUDA_HOME/bin, $PATH or a pip CUDA 13
#   toolchain, as build.rs looks);
# DIR/site/: bitsandbytes for Python 3.12 with its CUDA 13 library only, for e2e_torch.py's
#   QLoRA peer (PyTorch + PEFT + bitsandbytes), where pip can download it; skipped otherwise.
# Keep DIR out of git (.git/info/exclude) and copy it beside the repository on the GPU machine.
set -euo pipefail
dir=${1:?usage: tools/gpu-check/prepare.sh DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$dir"
# TUNA_SASS=1: ptxas's machine code for sm_80, sm_90 and sm_90a is embedded beside the PTX,
# so the GPU runs it without the driver compiling each module in each process (~25 s of ptxas
# here for all of them).
(cd "$root" && TUNA_SASS=1 CARGO_INCREMENTAL=0 cargo build --release --locked --bin gpu-check --bin tuna)
# Without nvcc the binaries would carry no PTX or machine code and compile every kernel with
# NVRTC at run time, and the Hopper kernels (sm_90a) would not be there to check. (With nvcc,
# build.rs fails when ptxas does, so PTX here means machine code too.)
if ! grep -q 'wgmma.mma_async' "$root/target/release/gpu-check"; then
  echo "prepare.sh: the build embedded no sm_90a PTX (nvcc not found?): set NVCC and run again" >&2
  exit 1
fi
tar czf "$dir/bins.tgz" -C "$root/target/release" gpu-check tuna
bnb=${TUNA_BNB_VERSION:-0.50.2}
tmp=$(mktemp -d)
if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
     -d "$tmp" "bitsandbytes==$bnb" 2>/dev/null; then
  rm -rf "$dir/site" && mkdir -p "$dir/site"
  (cd "$dir/site" && python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl .)
  # The wheel carries a library per CUDA, ROCm and XPU version (~130 MB); PyTorch on the GPU
  # machine is a CUDA 13.0 build, so the CUDA 13 ones and the CPU one stay.
  find "$dir/site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
else
  echo "prepare.sh: bitsandbytes $bnb not downloaded: no QLoRA row for PyTorch + PEFT"
fi
rm -rf "$tmp"
du -sh "$dir"
