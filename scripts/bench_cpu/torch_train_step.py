"""PyTorch eager reference for row 3 of scripts/bench-cpu.sh and for benches/train.rs (this is
the script that docs/PERF.md "Training throughput vs PyTorch eager" used to carry inline).
The same random SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9/3 heads, ffn 1536, vocab
49152, tied), full fine-tuning, AdamW, segment-DPO on 4 pairs (context 192, segments 64) per
step as 2 micro-batches of 2 pairs, each pair as two padded sequences context+chosen /
context+rejected (the usual TRL layout: the context runs twice and the full
[batch, seq, vocab] logits are built), global-norm clipping at 1.0.
Throughput in ipo's unit: pair tokens (context + chosen + rejected) per second.

Usage: python scripts/bench_cpu/torch_train_step.py [--threads 2] [--steps 3]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, set_threads, smollm2_model, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median)")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    threads = set_threads(args.threads)
    m = smollm2_model("fp32", attn="sdpa").train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6, weight_decay=0.0)
    C, S, P, MB, beta = 192, 64, 4, 2, 0.1

    def seg_logp(ctx, seg):
        ids = torch.cat([ctx, seg], 1)
        logits = m(input_ids=ids).logits[:, C - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, seg[..., None])[..., 0].sum(-1)

    def step():
        opt.zero_grad()
        for _ in range(P // MB):
            ctx, ch, rj = (torch.randint(0, 49152, (MB, n)) for n in (C, S, S))
            z = (seg_logp(ctx, ch) + 300) - (seg_logp(ctx, rj) + 300)
            (F.softplus(-beta * z).sum() / P).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    med, ts = timed(step, args.steps)
    tok = P * (C + 2 * S)
    print(f"torch {torch.__version__} threads {threads}: step {med:.3f} s, {tok} pair tokens, {tok / med:.0f} pair tokens/s")
    emit({"side": "torch", "what": "train_step", "threads": threads, "seconds": med, "times": ts,
          "tokens": tok, "tokens_per_s": tok / med})


if __name__ == "__main__":
    main()
