#!/usr/bin/env python3
"""DPO fixtures from Hugging Face transformers + torch autograd for tests/dpo_golden.rs.

NOT run in CI; outputs committed. Rerun (after make_fixtures.py, whose tiny models it loads):

    .venv-ref/bin/python tests/reference/make_dpo_fixtures.py

For each tiny model tests/fixtures/tiny/{llama,qwen2,qwen3}/ it writes
tests/fixtures/dpo/<name>.safetensors with the masked-segment DPO loss of IPO
(IPO_METHOD.md "Loss") on 4 random pairs, computed the plain way (each branch a separate
sequence context + segment, batch 1, no packing), in exact float64 (the same patches of HF's
RMSNorm / softmax / RoPE float32 islands as make_fixtures.py):

    z_i  = (c_i - rc_i) - (r_i - rr_i)      c_i, r_i = sum of segment log-probs under the model
    loss = mean_i softplus(-beta z_i) + sft_coef * sum_i(-c_i) / sum_i |chosen_i|

Tensors (ids int64, scalars/logps float64, full-model gradients float32 to keep files small):
  context_ids, chosen_ids, rejected_ids   int64, the pairs concatenated
  context_lens, chosen_lens, rejected_lens int64 [P]
  ref_chosen, ref_rejected                float64 [P] (chosen so margins have both signs)
  policy_chosen, policy_rejected          float64 [P] segment sums under the model
  beta, sft_coef, loss, dpo_loss, sft_nll, reward_chosen, reward_rejected, reward_margin,
  reward_accuracy                         float64 [] (metrics as TRL: means over pairs)
  grad.<param>                            float32, d loss / d param (full fine-tuning)
  lora.rank, lora.alpha                   float64 []
  lora.<peft name>.lora_A.weight / lora_B.weight   float64, fixed nonzero adapters on
                                          q,k,v,o,gate,up,down of every layer
  lora.loss                               float64 [] loss with the adapters merged in
  lora_grad.<peft name>.lora_{A,B}.weight float64, d lora.loss / d adapter
"""

import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import MODEL_CLASSES, TINY_DIR, exact_f64  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "dpo")
SEEDS = {"llama": 2001, "qwen2": 2002, "qwen3": 2003}
CTX, CHO, REJ = [5, 9, 3, 7], [4, 6, 3, 2], [5, 3, 4, 6]
BETA, SFT = 0.5, 0.2
RANK, ALPHA = 2, 6.0
TARGETS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


def seg_logp(model, params, ctx, seg):
    ids = torch.cat([ctx, seg])[None]
    pos = torch.arange(ids.shape[1])[None]
    logits = torch.func.functional_call(model, params, (), {"input_ids": ids, "position_ids": pos, "use_cache": False}).logits[0]
    lp = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1).gather(-1, seg[:, None])[:, 0]
    return lp.sum()


def dpo(model, params, pairs, rc, rr):
    cs = torch.stack([seg_logp(model, params, c, ch) for c, ch, _ in pairs])
    rs = torch.stack([seg_logp(model, params, c, rj) for c, _, rj in pairs])
    z = (cs - rc) - (rs - rr)
    dpo_loss = F.softplus(-BETA * z).mean()
    ntok = sum(len(ch) for _, ch, _ in pairs)
    sft = -cs.sum() / ntok
    return dpo_loss + SFT * sft, dpo_loss, sft, cs, rs, z


def make(name):
    gen = torch.Generator().manual_seed(SEEDS[name])
    d = os.path.join(TINY_DIR, name)
    model = MODEL_CLASSES[name].from_pretrained(d, attn_implementation="eager").double().eval()
    V = model.config.vocab_size
    pairs = [tuple(torch.randint(0, V, (n,), generator=gen) for n in lens) for lens in zip(CTX, CHO, REJ)]
    base = {k: v.detach() for k, v in model.named_parameters()}
    with exact_f64(model), torch.no_grad():
        _, _, _, cs, rs, _ = dpo(model, base, pairs, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    # reference sums: policy + offsets whose difference gives margins of both signs
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    off = 0.5 + torch.rand(4, generator=gen, dtype=torch.float64) * 2.0
    rc = cs - signs * off * 0.5 - 0.3
    rr = rs + signs * off * 0.5 - 0.3
    assert (rc < 0).all() and (rr < 0).all()

    # full fine-tuning: gradient w.r.t. every parameter
    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    with exact_f64(model):
        loss, dpo_loss, sft, cs2, rs2, z = dpo(model, params, pairs, rc, rr)
        loss.backward()
    acc = (z > 0).double().mean()
    assert 0 < acc < 1, acc
    t = {
        "context_ids": torch.cat([p[0] for p in pairs]), "chosen_ids": torch.cat([p[1] for p in pairs]),
        "rejected_ids": torch.cat([p[2] for p in pairs]),
        "context_lens": torch.tensor(CTX), "chosen_lens": torch.tensor(CHO), "rejected_lens": torch.tensor(REJ),
        "ref_chosen": rc, "ref_rejected": rr, "policy_chosen": cs2.detach(), "policy_rejected": rs2.detach(),
        "beta": torch.tensor(BETA, dtype=torch.float64), "sft_coef": torch.tensor(SFT, dtype=torch.float64),
        "loss": loss.detach(), "dpo_loss": dpo_loss.detach(), "sft_nll": sft.detach(),
        "reward_chosen": (BETA * (cs2 - rc)).mean().detach(), "reward_rejected": (BETA * (rs2 - rr)).mean().detach(),
        "reward_margin": (BETA * z).mean().detach(), "reward_accuracy": acc,
    }
    for k, p in params.items():
        assert p.grad.abs().max() > 0, (name, k)
        t["grad." + k] = p.grad.float()

    # LoRA: fixed nonzero A [r, in], B [out, r]; W = W0 + (alpha / r) B A
    s = ALPHA / RANK
    lora, merged = {}, dict(base)
    for i in range(model.config.num_hidden_layers):
        for blk, proj in TARGETS:
            key = f"model.layers.{i}.{blk}.{proj}.weight"
            out_f, in_f = base[key].shape
            A = (torch.rand(RANK, in_f, generator=gen, dtype=torch.float64) * 2 - 1) / in_f ** 0.5
            B = torch.randn(out_f, RANK, generator=gen, dtype=torch.float64) * 0.05
            peft = f"base_model.model.model.layers.{i}.{blk}.{proj}"
            lora[peft] = (A.requires_grad_(True), B.requires_grad_(True), key)
    for peft, (A, B, key) in lora.items():
        merged[key] = base[key] + s * B @ A
    with exact_f64(model):
        lloss = dpo(model, merged, pairs, rc, rr)[0]
        lloss.backward()
    t["lora.rank"] = torch.tensor(float(RANK), dtype=torch.float64)
    t["lora.alpha"] = torch.tensor(ALPHA, dtype=torch.float64)
    t["lora.loss"] = lloss.detach()
    for peft, (A, B, _) in lora.items():
        assert A.grad.abs().max() > 0 and B.grad.abs().max() > 0, peft
        t[f"lora.{peft}.lora_A.weight"] = A.detach()
        t[f"lora.{peft}.lora_B.weight"] = B.detach()
        t[f"lora_grad.{peft}.lora_A.weight"] = A.grad
        t[f"lora_grad.{peft}.lora_B.weight"] = B.grad
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in t.items()}, path)
    print(f"[{name}] loss={loss.item():.10f} dpo={dpo_loss.item():.6f} sft={sft.item():.6f} "
          f"acc={acc.item():.2f} margin={t['reward_margin'].item():.4f} lora.loss={lloss.item():.10f} -> {path}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in ["llama", "qwen2", "qwen3"]:
        make(name)


if __name__ == "__main__":
    main()
