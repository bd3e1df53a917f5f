#!/usr/bin/env python3
"""Collects the parts of scripts/gpu-check.sh into OUT/gpu-check.json and OUT/gpu-check.md.
Usage: summarize.py WORK_DIR OUT_DIR SECONDS."""
import datetime, json, os, subprocess, sys

work, out, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])


def load(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except Exception:
        return None


parts = []
for line in open(os.path.join(work, "parts.tsv")):
    f = line.rstrip("\n").split("\t")
    parts.append({"part": f[0], "status": f[1], "seconds": int(f[2] or 0), "message": f[3] if len(f) > 3 else ""})
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    smi = f"nvidia-smi: {e!r}"
reports = {k: load(k + ".json") for k in ["ceiling", "anchor", "ops-smollm2", "ops-llama1b", "train-f32", "train-bf16", "decode", "run"]}
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": smi,
    "seconds": secs,
    "passed": sum(p["status"] == "pass" for p in parts),
    "parts": parts,
    "reports": reports,
}
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)

md = [f"# gpu-check {summary['date']}", "", f"GPU: {smi}; {secs} s in all; {summary['passed']} of {len(parts)} parts passed.", ""]
md += ["| part | status | s | message |", "|---|---|---|---|"]
for p in parts:
    md.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['message'].replace('|', '/')} |")
c, a = reports["ceiling"], reports["anchor"]
if c or a:
    md += ["", "## Ceiling (same GPU, same run)", "", "| | ipo (cuBLAS + own kernel) | PyTorch |", "|---|---|---|"]
    for k, unit in [("gemm_bf16_tflops", "TFLOP/s"), ("gemm_f32_tflops", "TFLOP/s"), ("stream_gbs", "GB/s")]:
        x = f"{c[k]:.1f} {unit}" if c and k in c else "-"
        y = f"{a[k]:.1f} {unit}" if a and k in a else "-"
        md.append(f"| {k} | {x} | {y} |")
for k in ["ops-smollm2", "ops-llama1b"]:
    r = reports[k]
    if not r:
        continue
    md += ["", f"## {k}: {r['workload']} ({r['precision']})", "", "| op | ms | TFLOP/s | GB/s | bound | of peak |", "|---|---|---|---|---|---|"]
    for o in r["rows"]:
        pk = "-" if o.get("of_peak") is None else f"{100 * o['of_peak']:.1f}%"
        md.append(f"| {o['op']} | {o['ms']:.4f} | {o['tflops']:.2f} | {o['gbs']:.0f} | {o['bound']} | {pk} |")
tr = [(k, reports[k]) for k in ["train-f32", "train-bf16"] if reports[k]]
if tr or (a and any(k.startswith("hf_train") for k in a)):
    md += ["", "## Training step (random-weight Llama-3.2-1B shape, 4 x 2048 tokens)", "",
           "| run | tokens/step | s/step | tokens/s | TFLOP/s | MFU (bf16 ceiling) |", "|---|---|---|---|---|---|"]
    for k, r in tr:
        s = sum(r["step_seconds"]) / len(r["step_seconds"])
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        md.append(f"| ipo {k} | {r['tokens']} | {s:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} |")
    for k in ["hf_train_fp32", "hf_train_bf16-autocast"]:
        if a and k in a:
            h = a[k]
            md.append(f"| PyTorch HF {k[9:]} ({h['attn']}) | {h['tokens']} | {h['s_per_step']:.3f} | {h['tokens_per_s']:.0f} | - | - |")
d = reports["decode"]
if d:
    md += ["", f"## Decode ({d['shape']}, {d['layers']} layers, f32 weights)", "",
           "| batch | decode tokens/s | prefill tokens/s | GB/step | GB/s | of bandwidth |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        bw = "-" if r.get("of_bandwidth") is None else f"{100 * r['of_bandwidth']:.1f}%"
        md.append(f"| {r['batch']} | {r['tokens_per_s']:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['gbytes_per_step']:.2f} | {r['gbs']:.0f} | {bw} |")
r = reports["run"]
if r:
    md += ["", "## ipo run: cuda vs cpu (random-weight 4-layer SmolLM2)", "", "| | cuda | cpu |", "|---|---|---|"]
    for k in ["rollouts", "pairs_stage1", "pairs_benign", "pairs_stage2", "train1_loss", "train2_loss", "seconds"]:
        md.append(f"| {k} | {r['runs'].get('cuda', {}).get(k)} | {r['runs'].get('cpu', {}).get(k)} |")
    md.append(f"\nCPU pairs re-scored on cuda: {r.get('scored_sums')} sums, max relative difference {r.get('max_rel_diff')} (pass below 1e-3).")
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
