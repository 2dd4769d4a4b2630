"""End-to-end fine-tuning baseline for issue 8: PyTorch + transformers + PEFT on the same GPU.

A Llama-3.2-1B-shaped model with random weights built on the spot (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 128256), bf16, SDPA attention, LoRA rank 16
(alpha 32) on every linear layer of the decoder (q, k, v, o, gate, up, down), AdamW on the
adapters. Cases: batch 4 x sequence 2048 and 8 x 512; QLoRA (the base in bitsandbytes NF4 with
double quantization, bf16 compute) where bitsandbytes imports. Each case reports tokens per
second (median of the timed steps, CUDA events) and peak device memory (max allocated). tuna's
side is `tuna bench-step --device cuda --preset llama1b` (run.sh runs both).

`--model qwen3-0.6b` builds a Qwen3-0.6B shape instead (hidden 1024, 28 layers, 16 heads of 128
over 8 KV heads, q/k norms, intermediate 3072, vocab 151936): tuna's `--preset qwen3-0.6b`.
`--cases 4x2048` and `--methods lora` narrow what runs.

    python3 e2e_torch.py OUT.json            # on the GPU machine
    python3 e2e_torch.py OUT.json --tiny     # a small model on the CPU, to check the script

Writes one JSON file with a row per case and prints a table.
"""
import argparse
import json
import os
import statistics
import time

import torch

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                rope_theta=500000.0, tie_word_embeddings=True)
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
MODELS = {"llama1b": LLAMA_1B, "qwen3-0.6b": QWEN3_06B}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape, device, qlora):
    from peft import LoraConfig, get_peft_model
    import transformers

    # head_dim set apart from hidden / heads: Qwen3 (its q/k norms come with the class).
    arch = "Qwen3" if "head_dim" in shape else "Llama"
    config = getattr(transformers, f"{arch}Config")(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = getattr(transformers, f"{arch}ForCausalLM")(config).to(dtype)
    if qlora:
        model = quantize_nf4(model, dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    return model


def quantize_nf4(model, dtype):
    """Swaps each decoder linear for bitsandbytes' NF4 Linear4bit (double quantization)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(parent, name, q.to(lin.weight.device))
    return model


def run_case(shape, device, qlora, batch, seq, warmup, steps):
    model = build(shape, device, qlora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"method": "qlora" if qlora else "lora", "batch": batch, "seq": seq, "step_s": sec,
            "tokens_per_s": batch * seq / sec, "peak_mem_gib": peak, "loss": float(loss.detach())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama1b")
    ap.add_argument("--cases", help="BxT[,BxT...] (default 4x2048,8x512; --tiny 2x64,4x32)")
    ap.add_argument("--methods", choices=["lora", "all"], default="all", help="lora: no QLoRA rows")
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    shape = MODELS[a.model]
    if a.tiny:
        shape = dict(TINY, head_dim=16) if "head_dim" in shape else TINY
    cases = [(2, 64), (4, 32)] if a.tiny else [(4, 2048), (8, 512)]
    if a.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")]
    try:
        import bitsandbytes  # noqa: F401
        methods = [False, True] if device == "cuda" and a.methods == "all" else [False]
    except ImportError:
        methods = [False]
        print("bitsandbytes not importable: QLoRA baseline skipped")
    rows = []
    print(f"{'torch + peft':<22} {'tokens/s':>10} {'peak GiB':>9} {'step s':>8}")
    for qlora in methods:
        for batch, seq in cases:
            try:
                r = run_case(shape, device, qlora, batch, seq, a.warmup, a.steps)
            except torch.cuda.OutOfMemoryError as e:
                r = {"method": "qlora" if qlora else "lora", "batch": batch, "seq": seq, "error": f"out of memory: {e}"}
            except Exception as e:  # noqa: BLE001 (one case's failure, e.g. bitsandbytes's, keeps the others)
                r = {"method": "qlora" if qlora else "lora", "batch": batch, "seq": seq, "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            label = f"{r['method']} {batch}x{seq}"
            if "error" in r:
                print(f"{label:<22} {r['error']}")
            else:
                peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
                print(f"{label:<22} {r['tokens_per_s']:>10.0f} {peak:>9} {r['step_s']:>8.3f}")
            if device == "cuda":
                torch.cuda.empty_cache()
            # Rewritten after each case, so a run cut short by its time limit keeps the rows done.
            write(a.out, shape, device, rows)


def write(path, shape, device, rows):
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "shape": shape, "transformers": __import__("transformers").__version__, "lora": {"r": 16, "alpha": 32, "targets": TARGETS}}
    try:
        import bitsandbytes
        meta["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
