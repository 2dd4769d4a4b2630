"""What PyTorch + transformers + PEFT keep for the backward of one decoder layer, counted on the
CPU: every tensor autograd saves during a LoRA forward (`torch.autograd.graph.saved_tensors_hooks`),
each storage once, parameters left out. Two models a layer apart give one layer's share as the
difference. The model is issue 8's end-to-end shape (Llama-3.2-1B: hidden 2048, intermediate
8192, 32 heads, 8 KV heads) with a small vocabulary, LoRA rank 16 (alpha 32, dropout 0) on
every linear, SDPA attention, bf16 — what `tools/gpu-check/e2e_torch.py` runs on a GPU. The
tuna side of the same measurement:

    tuna bench-step --device wgpu --f16 --preset llama1b --layers L --vocab 8192 --batch 1 --seq 256

(`device_memory`: peak_live_bytes - live_bytes_between_steps, for L = 1 and 2; f16 there, the
same two bytes as bf16.)

The count is what the backward holds, not an allocator's peak: transient buffers of the forward
and the backward (and CUDA's SDPA kernel, which keeps its own set) are not in it. Prints one
JSON line.

    python3 saved_activations.py [--seq 256] [--dtype bf16]
"""
import argparse
import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_bytes(layers, seq, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=seq,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return sum(seen.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    one, two = saved_bytes(1, a.seq, dtype), saved_bytes(2, a.seq, dtype)
    per_layer = two - one
    print(json.dumps({"seq": a.seq, "dtype": a.dtype, "saved_bytes_1_layer": one, "saved_bytes_2_layers": two,
                      "per_layer_bytes": per_layer, "per_layer_bytes_per_token": per_layer / a.seq,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
