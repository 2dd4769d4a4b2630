#!/usr/bin/env bash
# tuna vs PyTorch + transformers on greedy decoding (CPU, fp32): a random SmolLM-135M-shaped
# model (made once by torch_generate.py), a PROMPT-token prompt (default 32), NEW tokens with the
# KV cache, 2 threads. The two run alternately, ROUNDS times; the report gives each side's median
# tokens/s (new tokens over the whole call, prompt included), the ratio, and whether both decoded
# the same tokens. A long prompt and few new tokens (`3 8 512`) time mostly the prompt's pass.
#
#   tools/bench-vs-torch/generate.sh [ROUNDS] [NEW] [PROMPT]
#   NF4=1 tools/bench-vs-torch/generate.sh ...   # decoder linears in NF4 on both sides
#                                                # (bitsandbytes on PyTorch's: pip install bitsandbytes)
#   BF16=1 tools/bench-vs-torch/generate.sh ...  # matrices in bf16: tuna --bf16-weights (f32 math),
#                                                # PyTorch's model cast to bfloat16 (bf16 math)
#   GEMMA3=1 tools/bench-vs-torch/generate.sh ...  # a random Gemma-3-270M-shaped model instead
#
# Needs python3 with torch and transformers; builds tuna in release.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
new=${2:-256}
words=${3:-32}
export RAYON_NUM_THREADS=2
nf4=()
[ "${NF4:-0}" = 1 ] && nf4=(--nf4)
bf16=()
[ "${BF16:-0}" = 1 ] && bf16=(--bf16)
cargo build --release --quiet --bin tuna
py=${PYTHON:-python3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
gemma3=()
[ "${GEMMA3:-0}" = 1 ] && gemma3=(--gemma3)
$py tools/bench-vs-torch/torch_generate.py make "$dir/model" ${gemma3[@]+"${gemma3[@]}"} >/dev/null
prompt="w1$(for i in $(seq 10 $((words + 8))); do printf ' w%d' "$i"; done)"
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  $py tools/bench-vs-torch/torch_generate.py time "$dir/model" "$new" "$prompt" ${nf4[@]+"${nf4[@]}"} ${bf16[@]+"${bf16[@]}"} | sed 's/^/torch /' >>"$dir/out"
  ./target/release/tuna generate --model "$dir/model" --prompt "$prompt" --max-new-tokens "$new" \
    --temperature 0 --json ${nf4[@]+"${nf4[@]}"} ${bf16[@]+"${bf16[@]/--bf16/--bf16-weights}"} | sed 's/^/tuna /' >>"$dir/out"
done
$py - "$dir/out" <<'PY'
import json, statistics, sys
rows, tokens = {"torch": [], "tuna": []}, {}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    r = json.loads(js)
    rows[who].append(r["tokens_per_second"])
    tokens[who] = r["new_tokens"]
med = {k: statistics.median(v) for k, v in rows.items()}
for k in ("torch", "tuna"):
    print(f"{k:>6}: median {med[k]:6.1f} tokens/s  ({len(rows[k])} runs)")
print(f" ratio: tuna is {med['tuna']/med['torch']:.2f}x PyTorch's tokens/s")
same = sum(a == b for a, b in zip(tokens["torch"], tokens["tuna"]))
print(f"  same: {same} of {len(tokens['torch'])} greedy tokens agree")
PY
