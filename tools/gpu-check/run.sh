#!/usr/bin/env bash
# Runs tuna's GPU checks on a machine with an NVIDIA GPU and no Rust toolchain.
#
#   tools/gpu-check/run.sh [OUT_DIR] [PATH_TO_GPU_CHECK_BINARY]
#
# Finds libnvrtc (CUDA_HOME, a pip CUDA 13 wheel, or the system) so the NVRTC cases run, runs
# the prepared gpu-check binary (built elsewhere with `cargo build --release --bin gpu-check`),
# then, where PyTorch with CUDA is present, the same benchmark shapes in PyTorch for the
# side-by-side figures, PyTorch + PEFT's end-to-end fine-tuning step (e2e_torch.py), and with
# TUNA_BIN=path/to/tuna tuna's own end-to-end step on wgpu.
# Reports land in OUT_DIR (default ./gpu-check-out); summary.py prints the issues' targets
# against them at the end (summary.txt).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-gpu-check-out}
bin=${2:-$here/../../target/release/gpu-check}
mkdir -p "$out"
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" \
         "$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0])' 2>/dev/null)/lib" \
         "$(python3 -c 'import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0])' 2>/dev/null)/lib"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# cuBLAS for the GEMM peers: cudarc loads `libcublas.so`; pip wheels ship only versioned
# names (libcublas.so.12 / .so.13), so link the first one found under that name.
mkdir -p "$out/lib"
for d in ${LD_LIBRARY_PATH//:/ } \
         "$(python3 -c 'import nvidia.cublas as m; print(list(m.__path__)[0])' 2>/dev/null)/lib" \
         "$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib"; do
  lib=$(ls "$d"/libcublas.so.1[0-9]* 2>/dev/null | grep -v Lt | head -1)
  if [ -n "$lib" ]; then
    ln -sf "$lib" "$out/lib/libcublas.so"
    export LD_LIBRARY_PATH="$out/lib:$(dirname "$lib"):$LD_LIBRARY_PATH"
    break
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$out/nvidia-smi.txt"
# Hopper's kernels first, each part on its own and under a time limit: the attention forward
# and backward (flash_attention_sm90.cu), then the wgmma + TMA GEMM path (gemm_sm90.cu). A part whose case
# fails or whose kernel hangs is listed in TUNA_SM90_OFF, so the rest of the run (the checks,
# the benchmarks, the end-to-end rows) keeps the other part and runs that one on the mma.sync
# kernels; sm90-smoke.txt says why. A second command into the same OUT_DIR reuses the verdict.
if [ -z "${TUNA_SM90:-}" ]; then
  if [ ! -f "$out/sm90-smoke.txt" ] && [ -x "$bin" ]; then
    off=""
    for part in attention attention-bwd gemm; do
      limit=75; [ "$part" = gemm ] && limit=100
      TUNA_SM90_OFF="$off" timeout $limit "$bin" "$out" --sm90-smoke "$part" >> "$out/sm90-smoke.txt" 2>&1
      rc=$?
      if [ $rc != 0 ]; then
        echo "$part off: its smoke test exited with $rc (124: timed out)" >> "$out/sm90-smoke.txt"
        off="${off:+$off,}$part"
      fi
    done
    echo "TUNA_SM90_OFF=$off" >> "$out/sm90-smoke.txt"
  fi
  if [ -f "$out/sm90-smoke.txt" ]; then
    export TUNA_SM90_OFF="$(grep '^TUNA_SM90_OFF=' "$out/sm90-smoke.txt" | tail -1 | cut -d= -f2)"
    export TUNA_SM90_CHECKED=1  # gpu-check's own run need not repeat those cases
  fi
  tail -4 "$out/sm90-smoke.txt" 2>/dev/null
fi
# TUNA_CHECKS=0 skips the gpu-check binary and the kernel baselines, so the end-to-end part
# can run as a second command into the same OUT_DIR (each command has a time limit; the
# whole script is estimated at 8-11 minutes on an H100 with every part on).
# Each program runs under a time limit, so a hang costs its own part of the run, not the rest
# (gpu-check rewrites its report after the tests and after each group of benchmarks).
status=0
if [ "${TUNA_CHECKS:-1}" != 0 ]; then
  timeout "${TUNA_CHECK_LIMIT:-360}" "$bin" "$out"
  status=$?
  [ $status = 124 ] && echo "gpu-check timed out after ${TUNA_CHECK_LIMIT:-360} s (its report holds what it finished)"
fi
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo
  if [ "${TUNA_CHECKS:-1}" != 0 ]; then
    python3 "$here/torch_baseline.py" "$out/torch-baseline.json" || echo "torch baseline failed"
  fi
  # Issue 8's end-to-end peer: PyTorch + transformers + PEFT fine-tuning a Llama-3.2-1B shape
  # (about two minutes on an H100; TUNA_E2E=0 skips it).
  if [ "${TUNA_E2E:-1}" != 0 ] && python3 -c 'import transformers, peft' 2>/dev/null; then
    echo
    python3 "$here/e2e_torch.py" "$out/e2e-torch.json" || echo "end-to-end torch baseline failed"
  fi
else
  echo "PyTorch with CUDA not found: no side-by-side baseline"
fi
# tuna's side of the end-to-end case (TUNA_BIN = a release `tuna` binary): on CUDA in bf16
# (LoRA r16 on every linear, the same shapes as e2e_torch.py; each row adds a step with every
# kernel timed, `kernel_profile`), then on wgpu (Vulkan, f32) where a Vulkan loader with the
# GPU's driver is present.
if [ -n "${TUNA_BIN:-}" ]; then
  echo
  # LoRA and QLoRA at both shapes; sparse fine-tuning of 1% of every decoder linear (SM3; no
  # PyTorch peer) at 4 x 2048 only.
  for row in "4 2048" "8 512" "4 2048 --qlora" "8 512 --qlora" "4 2048 --sparse 0.01"; do
    set -- $row
    b=$1 s=$2
    shift 2
    echo "tuna bench-step --device cuda --preset llama1b --batch $b --seq $s $*"
    timeout 150 "$TUNA_BIN" bench-step --device cuda --preset llama1b --batch "$b" --seq "$s" --steps 3 --warmup 1 --profile "$@" \
      | tee -a "$out/e2e-tuna-cuda.jsonl" || echo "tuna e2e on cuda failed for $b x $s $*"
  done
  # The CLI on CUDA beside the CPU (glue the library checks do not reach: loading, data,
  # saving adapters and deltas from device tensors): generate, perplexity, and three-step LoRA,
  # QLoRA and sparse fine-tuning runs of the test fixture; the outputs land in cli-cuda.txt.
  echo
  fx="$here/../fixtures/llama-gqa"
  data="$out/cli-data.jsonl"
  for i in $(seq 0 15); do echo "{\"prompt\": \"Count $i\", \"completion\": \" $((i + 1)) $((i + 2))\"}"; done > "$data"
  for dev in cpu cuda; do
    echo "== $dev"
    "$TUNA_BIN" generate --model "$fx" --prompt "The capital" --max-new-tokens 6 --json --device $dev || echo "generate on $dev failed"
    "$TUNA_BIN" perplexity --model "$fx" --data "$data" --json --device $dev || echo "perplexity on $dev failed"
    for method in lora qlora sparse; do
      extra=""
      [ $method = sparse ] && extra="--optimizer sm3 --density 0.05 --reselect-every 2"
      "$TUNA_BIN" finetune --model "$fx" --data "$data" --out "$out/ft-$method-$dev" --method $method $extra \
        --max-steps 3 --lr 1e-2 --eval-every 0 --checkpoint-every 0 --json --device $dev | tail -1 || echo "finetune $method on $dev failed"
    done
  done 2>&1 | tee "$out/cli-cuda.txt"
  # The LoRA row again with the pipelined mma.sync attention forward (the model's default is
  # Hopper's on an H100/H200, else the first).
  echo "TUNA_FA_FORWARD=pipelined tuna bench-step --device cuda --preset llama1b --batch 4 --seq 2048"
  TUNA_FA_FORWARD=pipelined timeout 150 "$TUNA_BIN" bench-step --device cuda --preset llama1b --batch 4 --seq 2048 --steps 3 --warmup 1 \
    | sed 's/^{/{"attention_forward":"pipelined",/' | tee -a "$out/e2e-tuna-cuda.jsonl" || echo "tuna e2e (pipelined attention) failed"
  if [ "${TUNA_E2E_WGPU:-1}" != 0 ] && "$TUNA_BIN" devices 2>/dev/null | grep -q '^wgpu'; then
    echo
    for shape in "4 2048" "8 512"; do
      set -- $shape
      echo "tuna bench-step --device wgpu --preset llama1b --batch $1 --seq $2"
      timeout 150 "$TUNA_BIN" bench-step --device wgpu --preset llama1b --batch "$1" --seq "$2" --steps 3 --warmup 1 \
        | tee -a "$out/e2e-tuna-wgpu.jsonl" || echo "tuna e2e on wgpu failed for $1 x $2"
    done
  else
    echo "TUNA_BIN set but no wgpu adapter (a Vulkan loader and the GPU's ICD are needed): no tuna e2e row"
  fi
fi
# The issues' targets against this run, in one place (summary.txt).
echo
python3 "$here/summary.py" "$out" | tee "$out/summary.txt" || echo "summary failed"
exit $status
