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
#
# Order: Hopper's smoke test, the kernel benchmarks and their PyTorch peers, the end-to-end
# rows the issues judge (tuna's LoRA and QLoRA at 4 x 2048, PyTorch + PEFT's), then the
# correctness checks (`gpu-check --checks`, CPU-heavy: their f64 references), the CLI on CUDA,
# and last the other end-to-end rows (8 x 512, sparse, the pipelined attention forward) and
# wgpu's. So a lease that ends early loses what the CPU emulator also runs, or side rows, not
# the timings only a GPU gives. TUNA_DEADLINE (seconds since the epoch) caps every part's time limit, so the whole
# script ends by then; a part with under 10 s left is skipped and says so.
set -u
deadline=${TUNA_DEADLINE:-0}
# lim N: N seconds, or what is left before the deadline if less (0: skip the part).
lim() {
  local n=$1
  if [ "$deadline" != 0 ]; then
    local left=$((deadline - $(date +%s)))
    [ $left -lt $n ] && n=$left
    [ $n -lt 10 ] && n=0
  fi
  echo $n
}
# part NAME LIMIT CMD...: runs CMD under `timeout`, or says it was skipped.
part() {
  local name=$1 t
  t=$(lim "$2")
  shift 2
  if [ "$t" = 0 ]; then
    echo "$name: skipped (TUNA_DEADLINE reached)"
    return 124
  fi
  timeout "$t" "$@"
  local rc=$?
  [ $rc = 124 ] && echo "$name: timed out after $t s"
  return $rc
}
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
    for p in attention attention-bwd gemm; do
      limit=60; [ "$p" = gemm ] && limit=90
      TUNA_SM90_OFF="$off" part "sm90 smoke $p" $limit "$bin" "$out" --sm90-smoke "$p" >> "$out/sm90-smoke.txt" 2>&1
      rc=$?
      if [ $rc != 0 ]; then
        echo "$p off: its smoke test exited with $rc (124: timed out or skipped)" >> "$out/sm90-smoke.txt"
        off="${off:+$off,}$p"
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
# can run as a second command into the same OUT_DIR (the whole script is estimated at 8-11
# minutes on an H100 with every part on).
# Each program runs under a time limit, so a hang costs its own part of the run, not the rest
# (gpu-check rewrites its report after each group of benchmarks, and prints each check as it
# ends).
status=0
have_torch=0
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && have_torch=1
if [ "${TUNA_CHECKS:-1}" != 0 ]; then
  echo
  part "gpu-check --benches" "${TUNA_BENCH_LIMIT:-180}" "$bin" "$out" --benches || status=1
  if [ $have_torch = 1 ]; then
    echo
    part "torch baseline" 120 python3 "$here/torch_baseline.py" "$out/torch-baseline.json" || echo "torch baseline failed"
  else
    echo "PyTorch with CUDA not found: no side-by-side baseline"
  fi
fi
# tuna's side of the end-to-end case (TUNA_BIN = a release `tuna` binary): on CUDA in bf16
# (LoRA r16 on every linear, the same shapes as e2e_torch.py; each row adds a step with every
# kernel timed, `kernel_profile`), then on wgpu (Vulkan, f32) where a Vulkan loader with the
# GPU's driver is present.
# PRESET (default llama1b) and ROWS (default e2e-tuna-cuda.jsonl) name the model and the file.
tuna_rows() {
  local preset=${PRESET:-llama1b} rows=${ROWS:-e2e-tuna-cuda.jsonl}
  for row in "$@"; do
    set -- $row
    local b=$1 s=$2
    shift 2
    echo "tuna bench-step --device cuda --preset $preset --batch $b --seq $s $*"
    part "tuna e2e $preset $b x $s $*" 150 "$TUNA_BIN" bench-step --device cuda --preset "$preset" --batch "$b" --seq "$s" --steps 3 --warmup 1 --profile "$@" \
      > "$out/row.tmp" || echo "tuna e2e on cuda failed for $preset $b x $s $*"
    cat "$out/row.tmp" | tee -a "$out/$rows"
    rm -f "$out/row.tmp"
  done
}
if [ -n "${TUNA_BIN:-}" ]; then
  echo
  tuna_rows "4 2048" "4 2048 --qlora"
fi
# Issue 8's end-to-end peer: PyTorch + transformers + PEFT fine-tuning a Llama-3.2-1B shape
# (about two minutes on an H100; TUNA_E2E=0 skips it).
if [ $have_torch = 1 ] && [ "${TUNA_E2E:-1}" != 0 ] && python3 -c 'import transformers, peft' 2>/dev/null; then
  echo
  part "PyTorch + PEFT end to end" 180 python3 "$here/e2e_torch.py" "$out/e2e-torch.json" || echo "end-to-end torch baseline failed"
fi
# The correctness checks: every CUDA case against the f64 CPU reference (checks.json).
if [ "${TUNA_CHECKS:-1}" != 0 ]; then
  echo
  part "gpu-check --checks" "${TUNA_CHECK_LIMIT:-360}" "$bin" "$out" --checks > "$out/checks.txt" 2>&1 || status=1
  grep -v '^  ok ' "$out/checks.txt"
fi
if [ -n "${TUNA_BIN:-}" ]; then
  # The CLI on CUDA beside the CPU (glue the library checks do not reach: loading, data,
  # saving adapters and deltas from device tensors): generate, perplexity, and three-step LoRA,
  # QLoRA and sparse fine-tuning runs of the test fixture; the outputs land in cli-cuda.txt.
  echo
  fx="$here/../fixtures/llama-gqa"
  data="$out/cli-data.jsonl"
  for i in $(seq 0 15); do echo "{\"prompt\": \"Count $i\", \"completion\": \" $((i + 1)) $((i + 2))\"}"; done > "$data"
  for dev in cpu cuda; do
    echo "== $dev"
    part "generate $dev" 60 "$TUNA_BIN" generate --model "$fx" --prompt "The capital" --max-new-tokens 6 --json --device $dev || echo "generate on $dev failed"
    part "perplexity $dev" 60 "$TUNA_BIN" perplexity --model "$fx" --data "$data" --json --device $dev || echo "perplexity on $dev failed"
    for method in lora qlora sparse; do
      extra=""
      [ $method = sparse ] && extra="--optimizer sm3 --density 0.05 --reselect-every 2"
      part "finetune $method $dev" 60 "$TUNA_BIN" finetune --model "$fx" --data "$data" --out "$out/ft-$method-$dev" --method $method $extra \
        --max-steps 3 --lr 1e-2 --eval-every 0 --checkpoint-every 0 --json --device $dev | tail -1 || echo "finetune $method on $dev failed"
    done
  done 2>&1 | tee "$out/cli-cuda.txt"
fi
if [ -n "${TUNA_BIN:-}" ]; then
  echo
  # The other rows: 8 x 512, and sparse fine-tuning of 1% of every decoder linear (SM3; no
  # PyTorch peer) at 4 x 2048.
  tuna_rows "8 512" "8 512 --qlora" "4 2048 --sparse 0.01"
  # The LoRA row again with the pipelined mma.sync attention forward (the model's default is
  # Hopper's on an H100/H200, else the first).
  echo "TUNA_FA_FORWARD=pipelined tuna bench-step --device cuda --preset llama1b --batch 4 --seq 2048"
  TUNA_FA_FORWARD=pipelined part "tuna e2e, pipelined attention" 150 "$TUNA_BIN" bench-step --device cuda --preset llama1b --batch 4 --seq 2048 --steps 3 --warmup 1 \
    | sed 's/^{/{"attention_forward":"pipelined",/' | tee -a "$out/e2e-tuna-cuda.jsonl" || echo "tuna e2e (pipelined attention) failed"
fi
if [ -n "${TUNA_BIN:-}" ]; then
  if [ "${TUNA_E2E_WGPU:-1}" != 0 ] && "$TUNA_BIN" devices 2>/dev/null | grep -q '^wgpu'; then
    echo
    for shape in "4 2048" "8 512"; do
      set -- $shape
      echo "tuna bench-step --device wgpu --preset llama1b --batch $1 --seq $2"
      part "tuna e2e on wgpu $1 x $2" 150 "$TUNA_BIN" bench-step --device wgpu --preset llama1b --batch "$1" --seq "$2" --steps 3 --warmup 1 \
        | tee -a "$out/e2e-tuna-wgpu.jsonl" || echo "tuna e2e on wgpu failed for $1 x $2"
    done
  else
    echo "TUNA_BIN set but no wgpu adapter (a Vulkan loader and the GPU's ICD are needed), or TUNA_E2E_WGPU=0: no tuna e2e row on wgpu"
  fi
fi
# Qwen3-0.6B (q/k norms, head_dim 128 over hidden 1024), LoRA at 4 x 2048, tuna then PyTorch +
# PEFT: the model family most fine-tuned now, last so that it never crowds out the issues' rows.
if [ -n "${TUNA_BIN:-}" ] && [ "${TUNA_E2E_QWEN3:-1}" != 0 ]; then
  echo
  PRESET=qwen3-0.6b ROWS=e2e-tuna-cuda-qwen3.jsonl tuna_rows "4 2048"
  if [ $have_torch = 1 ] && python3 -c 'import transformers, peft' 2>/dev/null; then
    part "PyTorch + PEFT end to end, Qwen3" 120 python3 "$here/e2e_torch.py" "$out/e2e-torch-qwen3.json" --model qwen3-0.6b --cases 4x2048 --methods lora \
      || echo "end-to-end torch baseline (Qwen3) failed"
  fi
fi
# The issues' targets against this run, in one place (summary.txt).
echo
python3 "$here/summary.py" "$out" | tee "$out/summary.txt" || echo "summary failed"
exit $status
