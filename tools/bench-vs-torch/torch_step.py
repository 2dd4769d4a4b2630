"""One LoRA training step of a ~34M Llama in PyTorch + transformers + PEFT, timed.

Prints one JSON line: {"step_seconds": [...]} after `--warmup` untimed steps. The
configuration mirrors `tuna bench-step`: hidden 512, 8 layers, 8 heads, intermediate 1376,
vocab 8192, batch 4 x 128, LoRA rank 8 (alpha 16) on all linear layers, fp32, AdamW, eager
attention off (SDPA, transformers' default), 2 threads unless --threads says otherwise.
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="full fine-tuning (every parameter, AdamW) instead of LoRA")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
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
    print(json.dumps({"step_seconds": times, "torch": torch.__version__, "loss": loss.item()}))


if __name__ == "__main__":
    main()
