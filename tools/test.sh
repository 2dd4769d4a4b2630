#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian/Ubuntu machine, then runs every test.
# This is the README's test command and what .ci/run calls.
#
#   bash tools/test.sh
#
# What it sets up (each step skipped when already there):
#   - g++ (nvcc needs a host compiler, even for --ptx);
#   - Mesa's lavapipe (software Vulkan), so the WGSL kernels run for real on the CPU;
#   - the CUDA 13.0 toolchain from PyPI in a venv ($TUNA_CUDA_VENV, default
#     ~/.cache/tuna/cuda13): nvcc for build.rs, libnvrtc for the NVRTC path, ptxas for the report.
#   - the CUDA emulator (tools/cuda-emu, built with g++): a libcuda.so that runs the CUDA
#     kernels on the CPU, so every CUDA test case runs here as it would on a GPU (the sm_90a
#     ones with the device reported as compute capability 9.0).
# Then: cargo test with TUNA_REQUIRE_WGPU/WGPU_F16/NVCC/NVRTC/CUDA=1 (a missing adapter, f16
# support, toolchain or CUDA device fails instead of skipping; the API docs' examples run
# on every device too), `cargo doc` with warnings as errors, gpu-check's CUDA test cases on
# the emulator, Hopper's cases and the CUDA tests once more on it as an H100, the no-GPU error test
# once more without the emulator, and `ptxas -v` for sm_90 on every kernel (registers,
# spills; a spill fails the run).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
for pkg in mesa-vulkan-drivers libvulkan1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

venv=${TUNA_CUDA_VENV:-$HOME/.cache/tuna/cuda13}
cu13() { "$venv/bin/python" -c 'import nvidia.cu13 as m; print(list(m.__path__)[0])' 2>/dev/null; }
if ! [ -x "$(cu13)/bin/nvcc" ]; then
  echo "== installing the CUDA 13.0 toolchain from PyPI into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*"
fi
cuda=$(cu13)
export NVCC="$cuda/bin/nvcc"
export LD_LIBRARY_PATH="$cuda/lib:${LD_LIBRARY_PATH:-}"
export WGPU_BACKEND=vulkan
export TUNA_REQUIRE_WGPU=1 TUNA_REQUIRE_WGPU_F16=1 TUNA_REQUIRE_NVCC=1 TUNA_REQUIRE_NVRTC=1
# A whole run gains nothing from incremental builds, and their cache took 1.7 GB of disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
echo "== $(df -h . | awk 'NR == 2 { print $4 }') of disk free (a clean run needs about 5 GB)"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
chmod 700 "$XDG_RUNTIME_DIR" 2>/dev/null || true

echo "== building the CUDA emulator"
emu=$(bash tools/cuda-emu/build.sh)
no_emu_path=$LD_LIBRARY_PATH
export LD_LIBRARY_PATH="$PWD/$(dirname "$emu"):$LD_LIBRARY_PATH" TUNA_REQUIRE_CUDA=1

echo "== cargo test (CUDA on the emulator)"
cargo test --locked 2>&1

echo "== cargo doc (a broken link in the API docs fails the run; the examples ran above)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps 2>&1 | tail -30

echo "== gpu-check's test cases on the emulator (what a GPU run checks first)"
cargo build --locked --profile test --bin gpu-check 2>&1 | tail -1
target/debug/gpu-check "$(mktemp -d)" --checks | grep -v "^  ok "

echo "== Hopper's sm_90a kernels on the emulator as an H100 (compute capability 9.0)"
# gpu-check's cases of the Hopper GEMM (forced onto every GEMM the TMA can read) and attention,
# then the test suite's CUDA cases again with every GEMM the TMA can read and the attention on
# the sm_90a kernels (the model, training, checkpoints, the CLI).
sm90=$(TUNA_CUDA_EMU_CC=90 target/debug/gpu-check "$(mktemp -d)" --sm90-smoke) || { echo "$sm90" | grep -v "^  ok "; exit 1; }
echo "$sm90" | grep -v "^  ok "
if echo "$sm90" | grep -q "not a compute capability 9.0"; then echo "the sm_90a cases did not run"; exit 1; fi
TUNA_CUDA_EMU_CC=90 TUNA_SM90=force TUNA_TEST_DEVICES=cuda cargo test --locked 2>&1

echo "== cargo test --test devices without a CUDA driver (the no-GPU errors)"
LD_LIBRARY_PATH=$no_emu_path TUNA_REQUIRE_CUDA=0 cargo test --locked --test devices 2>&1

echo "== ptxas -v for sm_90 and sm_90a (registers and spills per kernel)"
# The newest build output that holds PTX (a build without nvcc leaves source only, for NVRTC).
out=$(ls -td target/debug/build/tuna-*/out 2>/dev/null | while read -r d; do ls "$d"/*.sm_90.ptx >/dev/null 2>&1 && echo "$d" && break; done)
[ -n "$out" ] || { echo "no build output with PTX found"; exit 1; }
spilled=0
for ptx in "$out"/*.sm_90.ptx "$out"/*.sm_90a.ptx; do
  [ -e "$ptx" ] || continue
  arch=${ptx##*.sm_}; arch=sm_${arch%.ptx}  # sm_90, or sm_90a for a module tied to it
  report=$("$cuda/bin/ptxas" -v -arch="$arch" "$ptx" -o /dev/null 2>&1)
  echo "$report" | awk -v f="$(basename "$ptx")" '
    /Compiling entry function/ { gsub(/['\''`]/, "", $7); name = $7 }
    /spill stores/ { spills = $5 " stores, " $9 " loads" }
    /Used [0-9]+ registers/ { printf "  %-22s %-26s %3s regs  spills: %s\n", f, name, $5, spills }'
  if echo "$report" | grep -E '[1-9][0-9]* bytes spill (stores|loads)' >/dev/null; then spilled=1; fi
  # The mma.sync GEMM's 128-thread blocks keep 4 per SM (46 KiB of shared memory each) only
  # within 128 registers a thread.
  if [ "$(basename "$ptx")" = lora_gemm.sm_90.ptx ]; then
    over=$(echo "$report" | awk '/Compiling entry function/ { gsub(/['\''`]/, "", $7); name = $7 } /Used [0-9]+ registers/ && $5 > 128 { print name " (" $5 ")" }')
    if [ -n "$over" ]; then echo "lora_gemm kernels above 128 registers: $over"; spilled=1; fi
  fi
done
if [ "$spilled" = 1 ]; then echo "register spills (or the GEMM over its register budget) found for sm_90"; exit 1; fi
echo "== all tests passed"
