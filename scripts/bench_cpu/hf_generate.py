"""Hugging Face side of rows 4-5 of scripts/bench-cpu.sh: transformers `generate` (greedy,
exactly NEW new tokens: min_new_tokens = max_new_tokens, so no EOS stop) on a random-weight
LlamaForCausalLM of the SmolLM2-135M shape (the shape of `ipo bench decode --shape smollm2`;
throughput does not depend on the weights' values), fp32 or bf16 weights, SDPA attention.

decode:  per batch size, one generate(NEW); a logits processor stamps the time after every
         forward, so decode time = last stamp - first stamp (the NEW - 1 decode forwards with
         their token selection, the prefill excluded) and decode tokens = batch x (NEW - 1):
         the same split and count as ipo's and llama.cpp's.
prefill: one forward (with the KV cache built, as generate's prefill does) over BATCH x LEN
         random prompt tokens; median of --iters.
Prints a line per measurement, then a RESULT line (scripts/bench_cpu/common.py)."""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, set_threads, smollm2_model, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--batch", default="1,8,32", help="decode: comma-separated batch sizes; prefill: one")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="prefill: timed forwards (median)")
    args = ap.parse_args()
    import torch
    threads = set_threads(args.threads)
    model = smollm2_model(args.dtype).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def ids(batch, length):
        return torch.randint(20, vocab, (batch, length), generator=g)

    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        """Called once per generated token, right after that step's forward."""
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def gen(x, n, clock=None):
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([clock]) if clock else None)

    rows = []
    with torch.inference_mode():
        gen(ids(1, 8), 2)  # warm-up
        if args.mode == "decode":
            for batch in [int(b) for b in args.batch.split(",")]:
                x = ids(batch, args.prompt)
                clock = Clock()
                t0 = time.perf_counter()
                out = gen(x, args.new_tokens, clock)
                assert out.shape == (batch, args.prompt + args.new_tokens), out.shape
                assert len(clock.stamps) == args.new_tokens, len(clock.stamps)
                tp, td = clock.stamps[0] - t0, clock.stamps[-1] - clock.stamps[0]
                n = batch * (args.new_tokens - 1)
                print(f"HF generate {args.dtype} batch {batch}: {n} decode tokens in {td:.2f} s = {n / td:.1f} tokens/s "
                      f"(prefill {batch} x {args.prompt}: {tp:.2f} s)")
                rows.append({"batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "decode_tokens": n,
                             "decode_seconds": td, "tokens_per_s": n / td, "prefill_tokens_per_s": batch * args.prompt / tp})
        else:
            batch = int(args.batch.split(",")[0])
            x = ids(batch, args.prompt)
            med, ts = timed(lambda: model(input_ids=x, use_cache=True), args.iters)
            n = batch * args.prompt
            print(f"HF prefill {args.dtype} {batch} x {args.prompt}: median {med:.3f} s = {n / med:.1f} tokens/s")
            rows.append({"batch": batch, "prompt": args.prompt, "tokens": n, "seconds": med, "times": ts,
                         "prefill_tokens_per_s": n / med})
    emit({"side": "hf", "mode": args.mode, "dtype": args.dtype, "threads": threads, "rows": rows})


if __name__ == "__main__":
    main()
