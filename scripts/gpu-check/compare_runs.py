#!/usr/bin/env python3
"""Part (e) of scripts/gpu-check.sh: compares `ipo run` on the GPU with the same run on the CPU.
Sampling on two devices diverges once float sums differ, so the runs are compared by their
shape (every stage finished, pairs found, losses finite) and, exactly, by scoring: the CPU run's
pairs re-scored on the GPU (`ipo score --device cuda`) must give the same reference log-probs
(relative error below 1e-3 on each sum). Usage: compare_runs.py WORK_DIR OUT_JSON."""
import json, math, sys

work, out_path = sys.argv[1], sys.argv[2]
res = {"pass": False}
runs = {}
for dev in ["cpu", "cuda"]:
    try:
        r = json.load(open(f"{work}/run-{dev}/report.json"))
        runs[dev] = {k: r.get(k) for k in ["rollouts", "pairs_stage1", "pairs_benign", "pairs_stage2"]}
        runs[dev]["train1_loss"] = (r.get("train1_last") or {}).get("loss")
        runs[dev]["train2_loss"] = (r.get("train2_last") or {}).get("loss")
        runs[dev]["seconds"] = r.get("this_invocation_seconds")
        runs[dev]["refusal"] = r.get("refusal")
    except Exception as e:
        runs[dev] = {"error": repr(e)}
res["runs"] = runs
worst, n = 0.0, 0
try:
    cpu = {json.loads(l)["id"] + "/" + str(i): json.loads(l) for i, l in enumerate(open(f"{work}/run-cpu/pairs.ref.jsonl"))}
    gpu = {json.loads(l)["id"] + "/" + str(i): json.loads(l) for i, l in enumerate(open(f"{work}/score-cuda.jsonl"))}
    for k, c in cpu.items():
        g = gpu[k]
        for f in ["ref_chosen_logp", "ref_rejected_logp"]:
            a, b = c[f], g[f]
            worst = max(worst, abs(a - b) / max(abs(a), 1e-6))
            n += 1
    res["scored_sums"] = n
    res["max_rel_diff"] = worst
except Exception as e:
    res["score_error"] = repr(e)
ok_runs = all("error" not in r and r.get("pairs_stage1") and r["train1_loss"] is not None and math.isfinite(r["train1_loss"]) for r in runs.values())
res["pass"] = bool(ok_runs and n > 0 and worst < 1e-3)
json.dump(res, open(out_path, "w"), indent=1)
print(json.dumps(res, indent=1))
sys.exit(0 if res["pass"] else 1)
