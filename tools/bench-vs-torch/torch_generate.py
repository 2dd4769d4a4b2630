"""Greedy decoding in PyTorch + transformers on a random SmolLM-135M-shaped model, timed.

  torch_generate.py make DIR [--gemma3]   # writes the model and a word-level tokenizer to DIR
  torch_generate.py time DIR NEW PROMPT [--nf4 | --bf16]
                                          # prints one JSON line: {"seconds", "new_tokens", ...}

The model (hidden 576, 30 layers, 9 heads over 3 key/value heads, intermediate 1536, vocab
49152, tied embeddings, fp32) has random weights from seed 0; its tokenizer maps `w<i>` to id i,
so a prompt of words is a prompt of known ids on both sides. `time` decodes exactly NEW tokens
(min_new_tokens) after an untimed warm-up, with the KV cache, on `--threads` threads (2).
With --nf4 the decoder linears are bitsandbytes' NF4 `Linear4bit` (as `tuna generate --nf4`;
the embeddings and the tied head stay f32). With --bf16 the whole model is cast to bfloat16, as
`torch_dtype=torch.bfloat16` loads a checkpoint: PyTorch then computes in bf16 too, where
`tuna generate --bf16-weights` keeps bf16 matrices and computes in f32. `make --gemma3` writes a
random Gemma-3-270M-shaped model instead (hidden 640, 18 layers, 4 heads of 256 over 1
key/value head, intermediate 2048, vocab 262144, windows of 512 keys with every sixth layer
global, tied embeddings; transformers' own initialization).
"""
import json
import sys
import time

import torch


def make(out, gemma3=False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if gemma3:
        vocab = 262144
        cfg = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=256, vocab_size=vocab, tie_word_embeddings=True,
                               query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                               bos_token_id=1, eos_token_id=0, pad_token_id=None)
        Gemma3ForCausalLM(cfg).save_pretrained(out)
    else:
        vocab = 49152
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=vocab, tie_word_embeddings=True,
                          max_position_embeddings=8192, bos_token_id=1, eos_token_id=0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(f"{out}/tokenizer.json")
    with open(f"{out}/tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "w1", "eos_token": "w0"}, f)


def timed(model_dir, new, prompt, nf4=False, bf16=False, threads=2):
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if nf4:
        from torch_step import quantize_nf4

        quantize_nf4(model)
    if bf16:
        model = model.to(torch.bfloat16)
    ids = torch.tensor([[int(w[1:]) for w in prompt.split()]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        secs = time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    print(json.dumps({"seconds": secs, "new_tokens": tokens, "tokens_per_second": len(tokens) / secs}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], gemma3="--gemma3" in sys.argv[3:])
    else:
        timed(sys.argv[2], int(sys.argv[3]), sys.argv[4], nf4="--nf4" in sys.argv[5:], bf16="--bf16" in sys.argv[5:])
