"""Shared by the scripts/bench_cpu helpers: the SmolLM2-135M shape as a Hugging Face config,
thread pinning, timing, and the one-line JSON result every helper prints last on stdout
(`RESULT {...}`), which scripts/bench_cpu/run.py collects."""
import json
import os
import statistics
import time

# SmolLM2-135M (the default model; ipo's `--shape smollm2`, benches/common/smollm2.rs).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)


def set_threads(n):
    """Pin torch to n threads (intra-op) and 1 inter-op thread; OMP_NUM_THREADS comes from the
    environment (scripts/bench-cpu.sh exports it before torch starts)."""
    import torch
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (only possible before the first parallel op)
    return torch.get_num_threads()


def smollm2_model(dtype="fp32", attn="sdpa", seed=0):
    """A random-weight LlamaForCausalLM of the SmolLM2-135M shape (float32, or bfloat16 weights
    when dtype == "bf16")."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2, attn_implementation=attn, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg).float()
    if dtype == "bf16":
        m = m.to(torch.bfloat16)
    return m


def timed(fn, iters, warmup=1):
    """Median wall seconds of `iters` calls of fn after `warmup` untimed ones; also all times."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def versions():
    """Versions of the libraries this process has imported (importing one here would add its
    memory to the process's peak RSS)."""
    import sys
    return {mod: sys.modules[mod].__version__ for mod in ("torch", "transformers", "llama_cpp") if mod in sys.modules}


def emit(result):
    """Print the helper's result as the last stdout line, `RESULT <json>`."""
    result = dict(result)
    result.setdefault("versions", versions())
    result.setdefault("env_threads", {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")})
    print("RESULT " + json.dumps(result), flush=True)
