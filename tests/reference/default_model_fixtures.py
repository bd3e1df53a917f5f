"""Golden fixtures for the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), written by
Hugging Face transformers loading the GGUF directly (its own dequantizer and tokenizer
conversion, independent of `ipo import-gguf`). Not run in CI; rerun by hand:

    .venv-ref/bin/python tests/reference/default_model_fixtures.py GGUF [IMPORTED_DIR]

Writes tests/fixtures/default_model/logprobs.json and greedy.json. With IMPORTED_DIR (the
output of `ipo import-gguf GGUF IMPORTED_DIR`) it also loads that folder with transformers
and prints max |logit difference| against the GGUF-loaded model (expected ~1e-5).
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "default_model")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."}],
    [{"role": "user", "content": "Compute 12345 + 678 and explain."},
     {"role": "assistant", "content": "12345 + 678 = 13023. Add the units, carry, and so on."}],
    [{"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I can't help with that, but a locksmith can open it for you."}],
]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
N_NEW = 40


def main():
    gguf = os.path.abspath(sys.argv[1])
    imported = sys.argv[2] if len(sys.argv) > 2 else None
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    records = []
    all_ids = []
    with torch.no_grad():
        for conv in CONVERSATIONS:
            text = tok.apply_chat_template(conv, tokenize=False)
            ids = tok(text, add_special_tokens=False).input_ids
            all_ids.append(ids)
            logits = model(torch.tensor([ids])).logits[0].float()  # [T, V] f32
            logp = torch.log_softmax(logits, dim=-1)
            tl = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [T-1]
            records.append({"text": text, "input_ids": ids, "token_logps": [float(x) for x in tl],
                            "sum_logp": float(tl.double().sum())})
    os.makedirs(OUT, exist_ok=True)
    meta = {"source": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf, torch_dtype=float32)",
            "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
    with open(os.path.join(OUT, "logprobs.json"), "w") as fh:
        json.dump({**meta, "note": "token_logps[t-1] = log p(input_ids[t] | input_ids[<t]) for t >= 1, float32 model",
                   "cases": records}, fh, indent=1)

    greedy = []
    with torch.no_grad():
        for conv in PROMPTS:
            ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
            new = out[0, len(ids):].tolist()
            greedy.append({"messages": conv, "prompt_ids": ids, "generated_ids": new,
                           "generated_text": tok.decode(new)})
    with open(os.path.join(OUT, "greedy.json"), "w") as fh:
        json.dump({**meta, "note": f"{N_NEW} greedy tokens (do_sample=False); generation does not stop at EOS, "
                   "so a generator that stops at eos_token_id should compare the prefix up to and including it",
                   "eos_token_id": tok.eos_token_id,
                   "cases": greedy}, fh, indent=1)
    print("wrote", OUT)

    if imported:
        mine = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
        my_tok = AutoTokenizer.from_pretrained(imported)
        worst = 0.0
        with torch.no_grad():
            for ids in all_ids:
                assert my_tok(tok.decode(ids), add_special_tokens=False).input_ids == ids, "tokenizer mismatch"
                a = model(torch.tensor([ids])).logits
                b = mine(torch.tensor([ids])).logits
                worst = max(worst, float((a - b).abs().max()))
        sd_a, sd_b = model.state_dict(), mine.state_dict()
        wmax = max(float((sd_a[k] - sd_b[k]).abs().max()) for k in sd_b if k in sd_a)
        print(f"imported folder vs GGUF: max |logit diff| = {worst:.3e}, max |weight diff| = {wmax:.3e}")


if __name__ == "__main__":
    main()
