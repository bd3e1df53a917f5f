"""llama.cpp side of rows 4-5 of scripts/bench-cpu.sh, through llama-cpp-python's low-level API
(the C API as ctypes): greedy decode of exactly NEW tokens per sequence (argmax of the logits,
no EOS stop, no sampler chain) and prefill, on a GGUF of the default model.

Batching: B sequences share one context (n_seq_max = B, unified KV cache); the prefill is one
llama_decode over all B x PROMPT tokens (logits of each sequence's last token), then each decode
step is one llama_decode of B tokens, one per sequence -- the same work as ipo's and HF's
batched greedy decode. decode tokens/s = B x (NEW - 1) / decode time (the first new token comes
from the prefill's logits, as on the other sides).

--quantize SRC: first write --gguf as Q8_0 from SRC with llama_model_quantize (allow_requantize:
SRC may itself be quantized; then the Q8_0 carries SRC's rounding, same format and speed as a
Q8_0 made from f16), unless --gguf exists already; --mode quantize stops there.
Prints a line per measurement, then a RESULT line (scripts/bench_cpu/common.py)."""
import argparse
import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

import llama_cpp as L  # noqa: E402
import numpy as np  # noqa: E402


@L.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp's own logging off (it goes to stderr otherwise)
    pass


def quantize_q8_0(src, dst, threads):
    p = L.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0
    p.allow_requantize = True
    tmp = dst + ".part"
    rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llama_model_quantize {src} -> {tmp} failed: {rc}")
    os.replace(tmp, dst)


class Runner:
    def __init__(self, path, threads):
        self.threads = threads
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            sys.exit(f"could not load {path}")
        self.vocab_n = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, buf, 256)
        self.desc = buf.value.decode()
        self.size = L.llama_model_size(self.model)

    def context(self, seqs, tokens_per_seq, batch_tokens):
        cp = L.llama_context_default_params()
        cp.n_ctx = ((seqs * tokens_per_seq + 255) // 256) * 256
        cp.n_batch = cp.n_ubatch = max(512, batch_tokens)
        cp.n_seq_max = seqs
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            sys.exit(f"llama_init_from_model failed (n_ctx {cp.n_ctx}, n_seq_max {seqs})")
        return ctx

    def run(self, batch, prompt, new, rng):
        """Prefill `batch` random prompts of `prompt` tokens, then `new - 1` greedy decode steps.
        Returns (prefill seconds, decode seconds)."""
        ctx = self.context(batch, prompt + new, batch * prompt)
        lb = L.llama_batch_init(max(batch * prompt, batch), 0, batch)
        try:
            def fill(items):  # items: (token, pos, seq, wants logits)
                for i, (tok, pos, seq, out) in enumerate(items):
                    lb.token[i] = int(tok)
                    lb.pos[i] = pos
                    lb.n_seq_id[i] = 1
                    lb.seq_id[i][0] = seq
                    lb.logits[i] = out
                lb.n_tokens = len(items)

            def decode():
                rc = L.llama_decode(ctx, lb)
                if rc != 0:
                    sys.exit(f"llama_decode failed: {rc}")
                logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(batch, self.vocab_n))
                return logits.argmax(axis=1)

            prompts = rng.integers(20, self.vocab_n, size=(batch, prompt))
            fill([(prompts[s, p], p, s, p == prompt - 1) for s in range(batch) for p in range(prompt)])
            t0 = time.perf_counter()
            nxt = decode()
            t1 = time.perf_counter()
            for step in range(new - 1):
                fill([(nxt[s], prompt + step, s, True) for s in range(batch)])
                nxt = decode()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1
        finally:
            L.llama_batch_free(lb)
            L.llama_free(ctx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--quantize", metavar="SRC", help="write --gguf as Q8_0 from SRC first (if missing)")
    ap.add_argument("--label", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["decode", "prefill", "quantize"], default="decode")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="prefill: timed prefills (median)")
    args = ap.parse_args()
    L.llama_log_set(_quiet, None)
    L.llama_backend_init()
    if args.quantize and not os.path.exists(args.gguf):
        os.makedirs(os.path.dirname(os.path.abspath(args.gguf)), exist_ok=True)
        print(f"quantizing {args.quantize} -> {args.gguf} (Q8_0, allow_requantize)")
        quantize_q8_0(args.quantize, args.gguf, args.threads)
    if args.mode == "quantize":
        return
    r = Runner(args.gguf, args.threads)
    print(f"llama.cpp (llama-cpp-python {L.__version__}): {r.desc}, {r.size / 2**20:.0f} MiB, threads {args.threads}")
    rng = np.random.default_rng(0)
    r.run(1, 8, 2, rng)  # warm-up
    rows = []
    if args.mode == "decode":
        for batch in [int(b) for b in args.batch.split(",")]:
            tp, td = r.run(batch, args.prompt, args.new_tokens, rng)
            n = batch * (args.new_tokens - 1)
            print(f"llama.cpp {args.label} batch {batch}: {n} decode tokens in {td:.2f} s = {n / td:.1f} tokens/s "
                  f"(prefill {batch} x {args.prompt}: {tp:.2f} s)")
            rows.append({"batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "decode_tokens": n,
                         "decode_seconds": td, "tokens_per_s": n / td, "prefill_tokens_per_s": batch * args.prompt / tp})
    else:
        batch = int(args.batch.split(",")[0])
        ts = sorted(r.run(batch, args.prompt, 1, rng)[0] for _ in range(args.iters))
        med = ts[len(ts) // 2]
        n = batch * args.prompt
        print(f"llama.cpp {args.label} prefill {batch} x {args.prompt}: median {med:.3f} s = {n / med:.1f} tokens/s")
        rows.append({"batch": batch, "prompt": args.prompt, "tokens": n, "seconds": med, "times": ts,
                     "prefill_tokens_per_s": n / med})
    emit({"side": "llama.cpp", "mode": args.mode, "gguf": args.gguf, "model": r.desc, "model_bytes": r.size,
          "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
