"""One LoRA training step of a ~34M Llama in PyTorch + transformers + PEFT, timed.

Prints one JSON line: {"step_seconds": [...]} after `--warmup` untimed steps. The
configuration mirrors `tuna bench-step`: hidden 512, 8 layers, 8 heads, intermediate 1376,
vocab 8192, batch 4 x 128, LoRA rank 8 (alpha 16) on all linear layers, fp32, AdamW, eager
attention off (SDPA, transformers' default), 2 threads unless --threads says otherwise.
With --qwen3, the same shape as Qwen3 (per-head q/k norms, rope theta 1e6: tuna's
`--preset qwen3-small`). With --gemma3, the hidden size, layers, MLP and vocabulary in Gemma 3's
layout (4 heads of 256 over 1 KV head, GeGLU, sandwich norms, tied head, windowed layers of
512 with the sixth global: tuna's `--preset gemma3-small`). With --qlora, each decoder linear is first swapped for bitsandbytes' NF4 `Linear4bit` (double
quantization, f32 compute: QLoRA as PEFT + bitsandbytes run it on the CPU).
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_nf4(model):
    """Swaps each decoder linear for bitsandbytes' NF4 Linear4bit (double quantization)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, TARGETS[:4]), (layer.mlp, TARGETS[4:])):
            for name in names:
                lin = getattr(parent, name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(parent, name, q.to("cpu"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="full fine-tuning (every parameter, AdamW) instead of LoRA")
    ap.add_argument("--qlora", action="store_true", help="the decoder linears in NF4 (bitsandbytes), LoRA on top")
    ap.add_argument("--qwen3", action="store_true", help="the same shape as Qwen3 (q/k norms, rope theta 1e6)")
    ap.add_argument("--gemma3", action="store_true", help="the same sizes in Gemma 3's layout")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    if a.gemma3:
        g = dict(shape, num_attention_heads=4, num_key_value_heads=1)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**g, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                                   sliding_window_pattern=6, rms_norm_eps=1e-6, tie_word_embeddings=True))
    elif a.qwen3:
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    if a.qlora:
        quantize_nf4(model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=TARGETS)
    if not a.full:
        model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 8192, (4, 128))
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_seconds": times, "torch": torch.__version__, "loss": loss.item()}
    if a.qlora:
        import bitsandbytes as bnb

        out["bitsandbytes"] = bnb.__version__
        assert type(model.base_model.model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
