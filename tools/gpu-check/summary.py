"""The issues' targets against one gpu-check run (run.sh calls this last; by hand:
`python3 tools/gpu-check/summary.py OUT_DIR`).

Reads what run.sh left in OUT_DIR and prints:
  - the failed checks (checks.json, or gpu-check.json), and the smoke test of Hopper's kernels
    (sm90-smoke.txt: which parts the run kept on);
  - the LoRA GEMM and NF4 targets gpu-check judged in the same run (issue 5);
  - flash attention against issue 6's targets: forward >= 300 and backward >= 250 TFLOP/s at
    D = 128, causal, T = 4096, and the forward >= 1.0x PyTorch's SDPA on every shape both timed
    (gpu-check.json beside torch-baseline.json);
  - the end-to-end step against PyTorch + PEFT (issue 8: >= 1.5x tokens/s, <= 0.7x peak memory;
    e2e-tuna-cuda.jsonl beside e2e-torch.json) with each tuna row's five most expensive kernels;
  - the CLI's results on CUDA beside the CPU's (cli-cuda.txt).
A missing file is named and its part skipped. Standard library only.
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"  ({os.path.basename(path)}: {e})")
        return None


def load_lines(path):
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        print(f"  ({os.path.basename(path)} line {n}: {e})")
    except OSError as e:
        print(f"  ({os.path.basename(path)}: {e})")
    return rows


def verdict(ok):
    return "met" if ok else "NOT met"


def checks(report):
    print("checks (checks.json, or gpu-check.json)")
    if report is None:
        return
    if "error" in report:
        print(f"  gpu-check stopped: {report['error']}")
    tests = report.get("tests", [])
    failed = [t for t in tests if not t.get("ok")]
    print(f"  {len(tests) - len(failed)} of {len(tests)} passed")
    for t in failed:
        print(f"  FAIL {t.get('name')}: {t.get('detail')}")


def gemm_targets(report):
    print("\nLoRA GEMM and NF4 targets (issue 5; judged by gpu-check in the same run)")
    rows = [b for b in (report or {}).get("benchmarks", []) if "target" in b]
    if not rows:
        print("  none recorded")
    for b in rows:
        print(f"  {b['target']:<44} M {b['m']:<5} N {b['n']:<6} {verdict(b['met'])}")
    # The big products beside cuBLAS: Hopper's wgmma path (the default on an H100) and, where
    # timed, the mma.sync kernels it replaces.
    timed = {(b["kernel"], b["m"], b["n"]): b for b in (report or {}).get("benchmarks", []) if "kernel" in b and "m" in b and "tflops" in b}
    pairs = [("tuna base gemm", "cublas base (peer)"), ("tuna base gemm (mma.sync)", "cublas base (peer)"),
             ("tuna lora fused", "cublas base (peer)"), ("tuna lora fused (mma.sync)", "cublas base (peer)"),
             ("tuna nf4 lora", "cublas base (peer)"), ("tuna nf4 lora (mma.sync)", "cublas base (peer)"),
             ("tuna dX", "cublas dX"), ("tuna dX (mma.sync)", "cublas dX"),
             ("tuna dW", "cublas dW"), ("tuna dW (mma.sync)", "cublas dW")]
    shown = False
    for (kernel, m, n), b in sorted(timed.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        for ours, peer in pairs:
            p = timed.get((peer, m, n))
            if kernel == ours and p and m >= 2048:
                if not shown:
                    print(f"  {'kernel':<28} {'M':>5} {'N':>6} {'TFLOP/s':>8} {'cuBLAS':>7} {'time vs cuBLAS':>15}")
                    shown = True
                print(f"  {ours:<28} {m:>5} {n:>6} {b['tflops']:>8.0f} {p['tflops']:>7.0f} {b['time_us'] / p['time_us']:>14.2f}x")


def sm90_smoke(out):
    print("\nHopper kernels' smoke test (sm90-smoke.txt; TUNA_SM90_OFF lists the parts turned off)")
    try:
        with open(os.path.join(out, "sm90-smoke.txt")) as f:
            lines = f.read().splitlines()
    except OSError as e:
        print(f"  ({e})")
        return
    for line in lines:
        if line.startswith("  FAIL") or line.startswith("sm90") or line.startswith("TUNA_SM90") or " off: " in line:
            print(f"  {line.strip()}")


def attention(report, torch):
    print("\nflash attention (issue 6; bf16, TFLOP/s in FlashAttention's count)")
    ours = [b for b in (report or {}).get("benchmarks", []) if str(b.get("kernel", "")).startswith("flash_attn")]
    if not ours:
        print("  no tuna rows")
        return
    key = lambda b: (b["d"], b["t"], b["causal"])
    sdpa = {(key(b), b["kernel"]): b for b in (torch or {}).get("benchmarks", []) if str(b.get("kernel", "")).startswith("sdpa")}
    for b in ours:
        if b["d"] == 128 and b["t"] == 4096 and b["causal"]:
            bwd = b["kernel"].startswith("flash_attn_bwd")
            floor = 250 if bwd else 300
            print(f"  {b['kernel']:<20} D128 T4096 causal: {b['tflops']:.0f} TFLOP/s (target {floor}) {verdict(b['tflops'] >= floor)}")
    print(f"  {'kernel':<20} {'D':>4} {'T':>5} {'causal':>6} {'tuna':>7} {'sdpa':>7} {'ratio':>6}")
    for b in ours:
        bwd = b["kernel"].startswith("flash_attn_bwd")
        peer = sdpa.get((key(b), "sdpa bwd" if bwd else "sdpa fwd"))
        if peer is None:
            continue
        ratio = b["tflops"] / peer["tflops"]
        mark = "" if bwd else ("  >= 1.0x met" if ratio >= 1.0 else "  >= 1.0x NOT met")
        print(f"  {b['kernel']:<20} {b['d']:>4} {b['t']:>5} {str(b['causal']):>6} {b['tflops']:>7.0f} {peer['tflops']:>7.0f} {ratio:>5.2f}x{mark}")


def decode(report):
    rows = [b for b in (report or {}).get("benchmarks", []) if str(b.get("kernel", "")).startswith("decode ")]
    if not rows:
        return
    print("\nattention for one query row over a KV cache (bf16, H 32 over G 8, D 128)")
    by = {(b["kernel"], b["kv_len"]): b for b in rows}
    print(f"  {'S':>6} {'split-kv us':>12} {'GB/s':>6} {'tiled us':>9} {'tiled / split':>14}")
    for s in sorted({b["kv_len"] for b in rows}):
        split, tiled = by.get(("decode split-kv", s)), by.get(("decode tiled (flash_attn_fwd)", s))
        if split and tiled:
            print(f"  {s:>6} {split['time_us']:>12.1f} {split['gbs']:>6.0f} {tiled['time_us']:>9.1f} {tiled['time_us'] / split['time_us']:>13.2f}x")


def end_to_end(tuna_rows, torch, model="Llama-3.2-1B"):
    print(f"\nend-to-end {model} step (issue 8: >= 1.5x PyTorch + PEFT tokens/s, <= 0.7x its peak memory)")
    peers = {(r.get("method"), r.get("batch"), r.get("seq")): r for r in (torch or {}).get("rows", [])}
    if not tuna_rows:
        print("  no tuna rows")
    for r in tuna_rows:
        label = f"{r.get('method')} {r.get('batch')}x{r.get('seq')}"
        if r.get("density") is not None:
            label += f" density {r['density']}"
        if r.get("attention_forward"):
            label += f" ({r['attention_forward']} attention)"
        tps = r.get("tokens_per_second")
        mem = (r.get("device_memory") or {}).get("peak_live_bytes")
        mem_gib = mem / 2**30 if mem else None
        line = f"  {label:<40} {tps:>9.0f} tokens/s" if tps else f"  {label:<40} no timing"
        if mem_gib:
            line += f", peak {mem_gib:.2f} GiB"
        peer = peers.get((r.get("method"), r.get("batch"), r.get("seq")))
        if peer and "tokens_per_s" in peer and tps:
            speed = tps / peer["tokens_per_s"]
            line += f"; torch {peer['tokens_per_s']:.0f} tokens/s: {speed:.2f}x ({verdict(speed >= 1.5)})"
            if mem_gib and peer.get("peak_mem_gib"):
                m = mem_gib / peer["peak_mem_gib"]
                line += f", memory {m:.2f}x ({verdict(m <= 0.7)})"
        elif peer and "error" in peer:
            line += f"; torch: {peer['error'][:60]}"
        print(line)
        kernels = ((r.get("kernel_profile") or {}).get("kernels") or [])[:5]
        total = (r.get("kernel_profile") or {}).get("total_ms")
        if kernels and total:
            print("    " + ", ".join(f"{k['name']} {k['ms']:.1f} ms" for k in kernels) + f" (of {total:.0f} ms)")


def cli(path):
    """`cli-cuda.txt`: each command's JSON result under `== cpu` and `== cuda`, side by side."""
    print("\nthe CLI on CUDA beside the CPU (cli-cuda.txt; the fixture model, bf16 on CUDA)")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        print(f"  ({os.path.basename(path)}: {e})")
        return
    results, dev = {}, None
    for line in lines:
        if line.startswith("== "):
            dev = line[3:].strip()
        elif line.startswith("{") and dev:
            try:
                results.setdefault(dev, []).append(json.loads(line))
            except ValueError:
                pass
        elif "failed" in line:
            print(f"  {line}")
    for c, g in zip(results.get("cpu", []), results.get("cuda", [])):
        for key in ("final_train_loss", "mean_loss"):
            if key in c and key in g:
                what = c.get("method", "perplexity") if key == "final_train_loss" else "perplexity"
                rel = abs(g[key] - c[key]) / max(abs(c[key]), 1e-12)
                print(f"  {what:<12} {key:<17} cpu {c[key]:.5f}  cuda {g[key]:.5f}  relative {rel:.1e}")
        if "new_tokens" in c and "new_tokens" in g:
            same = "the same" if c["new_tokens"] == g["new_tokens"] else "different (bf16 may change greedy picks)"
            print(f"  generate     tokens {same}: cpu {c['new_tokens']}, cuda {g['new_tokens']}")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "gpu-check-out"
    print(f"== summary of {out}")
    report = load(os.path.join(out, "gpu-check.json"))
    # run.sh runs the checks on their own (`--checks`, checks.json) after the benchmarks; a
    # plain `gpu-check OUT` run keeps them in gpu-check.json.
    checks_path = os.path.join(out, "checks.json")
    checks(load(checks_path) if os.path.exists(checks_path) else report)
    sm90_smoke(out)
    gemm_targets(report)
    torch = load(os.path.join(out, "torch-baseline.json")) if os.path.exists(os.path.join(out, "torch-baseline.json")) else None
    attention(report, torch)
    decode(report)
    for model, suffix in [("Llama-3.2-1B", ""), ("Qwen3-0.6B", "-qwen3")]:
        torch_path = os.path.join(out, f"e2e-torch{suffix}.json")
        tuna_path = os.path.join(out, f"e2e-tuna-cuda{suffix}.jsonl")
        if suffix and not os.path.exists(tuna_path):
            continue
        end_to_end(load_lines(tuna_path), load(torch_path) if os.path.exists(torch_path) else None, model)
    cli(os.path.join(out, "cli-cuda.txt"))


if __name__ == "__main__":
    main()
