#!/usr/bin/env bash
# One whole gpu-check run on a GPU machine lent for a limited time, from the repository root:
#
#   tools/gpu-check/lease.sh DIR RESULTS [SECONDS]
#
# DIR is what prepare.sh made (bins.tgz, and site/ when bitsandbytes was downloaded). Runs
# run.sh with every part on (Hopper's smoke test, the benchmarks and their PyTorch peers, the
# end-to-end rows of tuna and PyTorch + PEFT, the checks, the CLI on CUDA) under a deadline
# SECONDS (default 530) from now, so the command ends in time to pack its results even when a
# part hangs: RESULTS/gpu-check-out.tgz (every report) and RESULTS/run.log. Prints the end of
# the log (summary.py's table).
set -u
t0=$(date +%s)
dir=${1:?usage: tools/gpu-check/lease.sh DIR RESULTS [SECONDS]}
results=${2:?usage: tools/gpu-check/lease.sh DIR RESULTS [SECONDS]}
seconds=${3:-530}
here=$(cd "$(dirname "$0")" && pwd)
bins=$(mktemp -d)
tar xzf "$dir/bins.tgz" -C "$bins" || { echo "lease.sh: cannot unpack $dir/bins.tgz"; exit 1; }
export TUNA_DEADLINE=$((t0 + seconds)) TUNA_BIN="$bins/tuna" TUNA_E2E_WGPU=${TUNA_E2E_WGPU:-0}
export TUNA_CHECK_LIMIT=${TUNA_CHECK_LIMIT:-200} PYTHONUNBUFFERED=1
[ -d "$dir/site" ] && export PYTHONPATH="$(cd "$dir/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
out=$(mktemp -d)
mkdir -p "$results"
timeout $((seconds + 20)) bash "$here/run.sh" "$out" "$bins/gpu-check" > "$out/run.log" 2>&1
echo "run.sh exit $? after $(($(date +%s) - t0)) s" >> "$out/run.log"
tar czf "$results/gpu-check-out.tgz" -C "$out" --exclude=./lib .
cp "$out/run.log" "$results/"
tail -c 11000 "$out/run.log"
