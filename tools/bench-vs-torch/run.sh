#!/usr/bin/env bash
# tuna vs PyTorch + transformers + PEFT on one LoRA training step configuration (CPU, fp32):
# a ~34M Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8192), batch 4 x 128,
# rank 8 on every linear layer, 2 threads. The two run alternately, ROUNDS times, in the same
# session; the report gives each side's median step time, tokens/s and the ratio.
#
#   tools/bench-vs-torch/run.sh [ROUNDS] [STEPS_PER_ROUND]
#   FULL=1 tools/bench-vs-torch/run.sh ...   # full fine-tuning (every parameter) instead of LoRA
#   QLORA=1 tools/bench-vs-torch/run.sh ...  # QLoRA: the decoder linears in NF4 (bitsandbytes on
#                                            # PyTorch's side: pip install bitsandbytes)
#   QWEN3=1 tools/bench-vs-torch/run.sh ...  # the same shape as Qwen3 (q/k norms), either mode
#   GEMMA3=1 tools/bench-vs-torch/run.sh ... # the same sizes in Gemma 3's layout (heads of 256)
#
# Needs python3 with torch, transformers and peft (pip install torch transformers peft), and
# builds tuna in release.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
steps=${2:-5}
full=()
[ "${FULL:-0}" = 1 ] && full=(--full)
[ "${QLORA:-0}" = 1 ] && full=(--qlora)
torch_model=() tuna_model=()
[ "${QWEN3:-0}" = 1 ] && torch_model=(--qwen3) tuna_model=(--preset qwen3-small)
[ "${GEMMA3:-0}" = 1 ] && torch_model=(--gemma3) tuna_model=(--preset gemma3-small)
export RAYON_NUM_THREADS=2
cargo build --release --quiet --bin tuna
py=${PYTHON:-python3}
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  $py tools/bench-vs-torch/torch_step.py --steps "$steps" --threads 2 ${full[@]+"${full[@]}"} ${torch_model[@]+"${torch_model[@]}"} | sed 's/^/torch /' >>"$out"
  ./target/release/tuna bench-step --steps "$steps" ${full[@]+"${full[@]}"} ${tuna_model[@]+"${tuna_model[@]}"} | sed 's/^/tuna /' >>"$out"
done
$py - "$out" <<'PY'
import json, statistics, sys
rows = {"torch": [], "tuna": []}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    rows[who] += json.loads(js)["step_seconds"]
tokens = 4 * 128
med = {k: statistics.median(v) for k, v in rows.items()}
for k in ("torch", "tuna"):
    print(f"{k:>6}: median {med[k]*1e3:7.1f} ms/step  {tokens/med[k]:7.0f} tokens/s  ({len(rows[k])} steps)")
print(f" ratio: tuna is {med['torch']/med['tuna']:.2f}x PyTorch's tokens/s")
PY
