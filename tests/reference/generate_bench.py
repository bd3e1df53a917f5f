"""Hugging Face `generate` throughput on the default model, for docs/PERF.md beside
`cargo bench --bench decode` (same shapes: 64-token prompts, N new greedy tokens at batch
1/8/32; prefill of 8 x 128 tokens). CPU, float32, torch threads = all cores. Not run in CI.

Usage: .venv-ref/bin/python tests/reference/generate_bench.py GGUF_FILE [NEW_TOKENS]
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

gguf = sys.argv[1]
new = int(sys.argv[2]) if len(sys.argv) > 2 else 32
d, f = gguf.rsplit("/", 1)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
vocab = model.config.vocab_size
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
g = torch.Generator().manual_seed(0)


def ids(batch, length):
    return torch.randint(20, vocab, (batch, length), generator=g)


with torch.inference_mode():
    model.generate(ids(1, 16), max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    print("| phase | batch | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for batch in (1, 8, 32):
        x = ids(batch, 64)
        mask = torch.ones_like(x)
        # Decode time = generate(new) - generate(1) (the latter is the prefill + first token).
        t0 = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        t2 = time.perf_counter()
        td = (t2 - t1) - (t1 - t0)
        n = batch * (new - 1)
        print(f"| decode (64-token prompt, {new} new) | {batch} | {n} | {td:.2f} | {n / td:.1f} |")
    x = ids(8, 128)
    t0 = time.perf_counter()
    model(x)
    tp = time.perf_counter() - t0
    print(f"| prefill (8 x 128) | 8 | {8 * 128} | {tp:.2f} | {8 * 128 / tp:.1f} |")
