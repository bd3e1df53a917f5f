"""PyTorch eager baseline for benches/forward_backward.rs: one forward + backward over
2 x 256 tokens of the SmolLM2-135M configuration (random weights, float32, CPU), objective =
sum of next-token log-probs, on the same threads. Prints the median wall time and tokens/s.

Usage: .venv-ref/bin/python scripts/bench_torch_fwd_bwd.py [--threads 2] [--iters 10]
(needs torch + transformers; see tests/reference/README.md for the environment)."""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    model.train()
    ids = torch.tensor([[(i * 7919 + b * 104729) % 49152 for i in range(256)] for b in range(2)])

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).sum()
        logp.backward()

    def fwd():
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
            torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).sum()

    for name, fn in [("forward_backward_2x256", step), ("forward_2x256", fwd)]:
        fn()  # warm-up
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"torch {torch.__version__} threads={args.threads} {name}: median {med*1e3:.0f} ms, {512/med:.0f} tokens/s")


if __name__ == "__main__":
    main()
