"""Agreement of the LLM judge with the rule judge, from the outputs of scripts/judge-server.sh.

    python3 scripts/judge_agreement.py OUTDIR     (prints markdown)

Reads OUTDIR/pairs.{rules,judge}.jsonl (+ .stats.json) from `ipo intervene` and
OUTDIR/eval.{rules,llm}/answers.jsonl from `ipo eval`, and OUTDIR/server.log for the number of
requests the server answered.
"""
import json
import pathlib
import sys


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kappa(pairs):
    """Cohen's kappa of two binary labelings given as (a, b) pairs."""
    n = len(pairs)
    if n == 0:
        return float("nan")
    po = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)


def main(out):
    out = pathlib.Path(out)
    lines = ["# The LLM judge against llama.cpp's server", ""]
    log = out / "server.log"
    served = sum("/v1/chat/completions" in l for l in log.read_text(errors="replace").splitlines()) if log.exists() else 0
    lines.append(f"Requests to /v1/chat/completions in server.log: {served}")
    lines.append("")

    # Intervene: which rollouts got a pair, and at which cue sentence.
    lines += ["## ipo intervene: --detector judge vs --detector rules", "", "| | rules | judge |", "|---|---|---|"]
    stats = {d: json.loads((out / f"pairs.{d}.stats.json").read_text()) for d in ("rules", "judge")}
    for key in ("prompts", "with_cue", "skipped_no_cue", "pairs", "detector_errors"):
        lines.append(f"| {key} | {stats['rules'].get(key)} | {stats['judge'].get(key)} |")
    cut = {}
    for d in ("rules", "judge"):
        cut[d] = {(p["id"], p.get("sample")): p["cue"]["sentence"] for p in rows(out / f"pairs.{d}.jsonl") if p.get("cue")}
    both = set(cut["rules"]) & set(cut["judge"])
    same = sum(cut["rules"][k] == cut["judge"][k] for k in both)
    lines += ["", f"Rollouts with a pair under both detectors: {len(both)}; cut at the same sentence: {same}.", ""]

    # Eval: harmfulness labels of the same completions.
    lines += ["## ipo eval: --judge llm vs --judge rules (harmful set)", ""]
    key = lambda a: (a["model"], a["decoding"], a["id"], a["sample"])
    ans = {j: {key(a): a for a in rows(out / f"eval.{j}" / "answers.jsonl") if a["set"] == "harmful"} for j in ("rules", "llm")}
    lines += ["| part | judged by both | agree | Cohen's kappa | harmful (rules) | harmful (llm) | left out by llm |", "|---|---|---|---|---|---|---|"]
    for part in ("reasoning_harmful", "response_harmful"):
        pairs, missing = [], 0
        for k, r in ans["rules"].items():
            l = ans["llm"].get(k)
            if l is None or l.get("completion") != r.get("completion"):
                continue
            if l.get(part) is None:
                missing += 1
                continue
            if r.get(part) is not None:
                pairs.append((int(r[part]), int(l[part])))
        agree = sum(a == b for a, b in pairs)
        share = f"{agree}/{len(pairs)} ({agree / len(pairs):.0%})" if pairs else "0/0"
        lines.append(f"| {part} | {len(pairs)} | {share} | {kappa(pairs):.2f} | {sum(a for a, _ in pairs)} | {sum(b for _, b in pairs)} | {missing} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/judge-server")
