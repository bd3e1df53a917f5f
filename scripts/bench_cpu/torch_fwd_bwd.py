"""PyTorch eager side of rows 1-2 of scripts/bench-cpu.sh: one forward + backward (or forward
only) over 2 x 256 tokens of the SmolLM2-135M shape, random weights, objective = sum of
next-token log-probs (log_softmax over the full logits, in fp32) -- the workload of
benches/forward_backward.rs and scripts/bench_torch_fwd_bwd.py, with a precision switch:
  fp32      float32 weights and math;
  bf16      model.to(torch.bfloat16): bf16 weights, activations and matmuls (the logits are
            cast to fp32 for the log-softmax);
  autocast  float32 weights under torch.autocast("cpu", bfloat16): bf16 matmuls, fp32 master
            weights and gradients (mixed-precision training as usually run).
Prints the median seconds and tokens/s, then a RESULT line (scripts/bench_cpu/common.py)."""
import argparse
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, set_threads, smollm2_model, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default="fp32")
    ap.add_argument("--what", choices=["fwd_bwd", "fwd"], default="fwd_bwd")
    args = ap.parse_args()
    import torch
    threads = set_threads(args.threads)
    model = smollm2_model("bf16" if args.dtype == "bf16" else "fp32", attn="sdpa")
    model.train()
    ids = torch.tensor([[(i * 7919 + b * 104729) % 49152 for i in range(256)] for b in range(2)])
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "autocast" else nullcontext

    def objective():
        with ctx():
            logits = model(input_ids=ids).logits[:, :-1]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).sum()

    def step():
        model.zero_grad(set_to_none=True)
        objective().backward()

    def fwd():
        with torch.no_grad():
            objective()

    med, ts = timed(step if args.what == "fwd_bwd" else fwd, args.iters)
    tokens = 2 * 256
    print(f"torch {torch.__version__} threads={threads} {args.what} {args.dtype}: median {med * 1e3:.0f} ms, {tokens / med:.0f} tokens/s")
    emit({"side": "torch", "what": args.what, "dtype": args.dtype, "threads": threads, "seconds": med,
          "times": ts, "tokens": tokens, "tokens_per_s": tokens / med})


if __name__ == "__main__":
    main()
