#!/usr/bin/env python3
"""PyTorch anchor for scripts/gpu-check.sh, on the same GPU in the same run: the bf16 and fp32
GEMM rate and the streaming bandwidth measured exactly as `ipo bench ceiling` does (n^3 GEMM,
best of 10 after a warm-up; x += y over 2 GiB operands, counting 2 reads + 1 write), and one
Hugging Face Llama training step (forward + backward + AdamW) at the shape of `ipo bench train`
(random-weight Llama-3.2-1B shape, 4 sequences of 2048 tokens), fp32 and bf16 autocast.
Writes JSON to argv[1]. Seeded random data throughout."""
import json, sys, time

out = {"ok": False}
try:
    import torch
    torch.manual_seed(0)
    dev = torch.device("cuda")
    out["torch"] = torch.__version__
    out["device"] = torch.cuda.get_device_name(0)

    def best_ms(f, reps=10):
        f(); torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); f(); b.record(); b.synchronize()
            best = min(best, a.elapsed_time(b))
        return best

    n = 8192
    for dt, key in [(torch.bfloat16, "gemm_bf16_tflops"), (torch.float32, "gemm_f32_tflops")]:
        x, y = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        torch.backends.cuda.matmul.allow_tf32 = False
        out[key] = 2 * n**3 / best_ms(lambda: x @ y.T) / 1e9
        del x, y
    elems = 2048 * 1024 * 1024 // 4
    x, y = torch.randn(elems, device=dev) * 1e-3, torch.randn(elems, device=dev) * 1e-3
    out["stream_gbs"] = 12 * elems / best_ms(lambda: x.add_(y)) / 1e6
    del x, y
    torch.cuda.empty_cache()
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                          tie_word_embeddings=True, max_position_embeddings=16384)
        for mode in ["fp32", "bf16-autocast"]:
            with torch.device(dev):  # initialise on the GPU: seconds, not a minute on the CPU
                model = LlamaForCausalLM(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            ids = torch.randint(0, cfg.vocab_size, (4, 2048), device=dev)
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(mode != "fp32")):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            step(); torch.cuda.synchronize()
            ts = []
            for _ in range(2):
                t = time.time(); step(); torch.cuda.synchronize(); ts.append(time.time() - t)
            s = sum(ts) / len(ts)
            out[f"hf_train_{mode}"] = {"tokens": ids.numel(), "s_per_step": s, "tokens_per_s": ids.numel() / s,
                                       "attn": model.config._attn_implementation}
            del model, opt
            torch.cuda.empty_cache()
    except Exception as e:  # transformers missing or out of memory: keep the GEMM numbers
        out["hf_train_error"] = repr(e)
    out["ok"] = True
except Exception as e:
    out["error"] = repr(e)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
