"""PyTorch baselines for tools/gpu-check: the same kernel shapes, timed with CUDA events.

Writes one JSON file (path in argv[1]) and prints a table. The peer for RMSNorm is
torch.nn.functional.rms_norm (forward, and forward+backward through autograd); for flash
attention, torch.nn.functional.scaled_dot_product_attention in bf16 on gpu-check's shapes
(B·T = 16k tokens, H·D = 2048), forward and forward+backward, in FlashAttention's FLOP count.
"""
import json
import sys

import torch


def time_us(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    rows = []
    print(f"{'torch kernel':<38} {'time µs':>10} {'GB/s':>10}")
    for m, n in [(4096, 4096), (16384, 2048), (8192, 8192)]:
        for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            x = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.rand(n, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(m, n, device="cuda", dtype=dtype)
            esize = x.element_size()
            with torch.no_grad():
                fwd = time_us(lambda: torch.nn.functional.rms_norm(x, (n,), w, 1e-5))
            y = torch.nn.functional.rms_norm(x, (n,), w, 1e-5)
            bwd = time_us(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True))
            for kernel, us, nbytes in [("rms_norm fwd", fwd, 2 * m * n * esize), ("rms_norm bwd", bwd, 5 * m * n * esize)]:
                label = f"{kernel} {name} [{m}, {n}]"
                print(f"{label:<38} {us:>10.1} {nbytes / us / 1e3:>10.0}")
                rows.append({"kernel": kernel, "dtype": name, "m": m, "n": n, "time_us": us})
    print(f"{'torch sdpa':<44} {'time µs':>10} {'TFLOP/s':>10}")
    for d in (64, 128):
        heads = 2048 // d
        for t in (512, 1024, 2048, 4096, 8192):
            batch = 16384 // t
            q, k, v = (torch.randn(batch, heads, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            for causal in (False, True):
                sdpa = torch.nn.functional.scaled_dot_product_attention
                with torch.no_grad():
                    fwd = time_us(lambda: sdpa(q, k, v, is_causal=causal))
                o = sdpa(q, k, v, is_causal=causal)
                do = torch.randn_like(o)
                bwd = time_us(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                flops = 4 * batch * t * t * d * heads / (2 if causal else 1)
                for kernel, us, f in (("sdpa fwd", fwd, flops), ("sdpa bwd", bwd, 2.5 * flops)):
                    label = f"{kernel} bf16 D{d} T{t} B{batch} H{heads}{' causal' if causal else ''}"
                    print(f"{label:<44} {us:>10.1} {f / us / 1e6:>10.1}")
                    rows.append({"kernel": kernel, "dtype": "bf16", "d": d, "t": t, "batch": batch, "heads": heads,
                                 "causal": causal, "time_us": us, "tflops": f / us / 1e6})
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "benchmarks": rows}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
