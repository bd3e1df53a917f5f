"""The orchestrator of scripts/bench-cpu.sh (run it through that script, which builds ipo, the
criterion bench and the Python venv first). Runs every measurement as its own process under
/usr/bin/time -v (peak RSS; os.wait4's ru_maxrss where GNU time is missing), collects each
one's result (criterion's estimates.json, `ipo bench --json`, or the helpers' RESULT line),
then prints one markdown table of comparisons plus the list of measurements with their exact
commands, and writes OUT/bench-cpu.md and OUT/bench-cpu.json.

A measurement the binary cannot do yet (a criterion bench that does not exist, a --precision
value the binary rejects) is n/a, not a failure; a failed one is reported and makes the exit
status 1 after the table is written."""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GROUPS = ["fwd-bwd", "train", "decode", "prefill"]
GROUP = "smollm2_135m_cpu"  # the criterion group of benches/forward_backward.rs
THREAD_ENV = ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def short(p):
    p = str(p)
    home = os.path.expanduser("~")
    if p.startswith(ROOT + "/"):
        return os.path.relpath(p, ROOT)
    return "~" + p[len(home):] if p.startswith(home + "/") else p


def shown_arg(c):
    """An argument as a shell would need it, with $HOME shortened to a ~ the shell expands."""
    c = short(c)
    return "~/" + shlex.quote(c[2:]) if c.startswith("~/") else shlex.quote(c)


def display(cmd, env=None):
    """The command line as printed: the thread variables, then the arguments."""
    full_env = dict(os.environ, **(env or {}))
    shown = " ".join(f"{k}={full_env[k]}" for k in THREAD_ENV + ("OMP_WAIT_POLICY",) if k in full_env)
    return shown + " " + " ".join(shown_arg(c) for c in cmd)


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------
# running one measurement

class Bench:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        shutil.rmtree(self.logs, ignore_errors=True)  # this run's logs only
        os.makedirs(self.logs)
        self.time_v = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
        self.m = {}  # key -> measurement record

    def na(self, key, label, reason, cmd=None):
        self.m[key] = {"key": key, "label": label, "status": "n/a", "reason": reason,
                       "cmd": display(cmd) if cmd else None}
        print(f"bench-cpu: {key}: n/a ({reason})", file=sys.stderr, flush=True)

    def run(self, key, label, cmd, parse, env=None, timeout=3600):
        """Runs cmd as its own process, logs its output to logs/KEY.log, returns the record
        (parse(log text) fills in the result; an exception there fails the measurement)."""
        log_path = os.path.join(self.logs, key + ".log")
        rss_path = os.path.join(self.logs, key + ".time")
        full_env = dict(os.environ, **(env or {}))
        shown = display(cmd, env)
        print(f"bench-cpu: {key}: {shown}", file=sys.stderr, flush=True)
        argv = ([self.time_v, "-v", "-o", rss_path] if self.time_v else []) + list(cmd)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        with open(log_path, "w") as logf:
            p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
            deadline = t0 + timeout
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() > deadline:
                    p.kill()
                    pid, status, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.2)
        wall = time.time() - t0
        rc = os.waitstatus_to_exitcode(status)
        text = open(log_path, errors="replace").read()
        rss_kib = None
        if self.time_v and os.path.exists(rss_path):
            got = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(rss_path).read())
            rss_kib = int(got.group(1)) if got else None
        if rss_kib is None:
            rss_kib = ru.ru_maxrss  # KiB on Linux; with GNU time present this is time's own
        rec = {"key": key, "label": label, "cmd": shown, "wall_s": round(wall, 2), "peak_rss_kib": rss_kib,
               "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "rc": rc,
               "log": short(log_path)}
        if rc != 0:
            rec.update(status="failed", reason=f"exit {rc}" + (" (timeout)" if wall >= timeout else ""),
                       tail=text.strip().splitlines()[-15:])
            print(f"bench-cpu: {key}: FAILED (exit {rc}); last lines of {short(log_path)}:\n  " +
                  "\n  ".join(rec["tail"]), file=sys.stderr, flush=True)
        else:
            try:
                rec.update(parse(text))
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 -- a parse failure is that row's failure
                rec.update(status="failed", reason=f"could not read its result: {e!r}",
                           tail=text.strip().splitlines()[-15:])
                print(f"bench-cpu: {key}: FAILED to parse: {e!r}", file=sys.stderr, flush=True)
        self.m[key] = rec
        return rec


def result_line(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise ValueError("no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


def rejected(text):
    """True when clap refused an argument (the flag or the value does not exist in this build)."""
    return bool(re.search(r"unexpected argument|invalid value|unrecognized|isn't a valid value|possible values", text))


# ---------------------------------------------------------------------------------------------
# the row groups

def fwd_bwd(b, a):
    if not a.fb_bench:
        sys.exit("bench-cpu: rows 1-2 need --fb-bench (the forward_backward criterion executable)")
    listed = sh([a.fb_bench, "--bench", "--list"], cwd=ROOT).stdout
    crit_home = os.path.join(b.out, "criterion")
    shutil.rmtree(crit_home, ignore_errors=True)
    crit_opts = ["--warm-up-time", "1", "--measurement-time", "1"] if a.quick else []
    for name, key, label in [("forward_backward_2x256", "ipo.fb.f32", "ipo f32 fwd+bwd"),
                             ("forward_2x256", "ipo.fwd.f32", "ipo f32 forward"),
                             ("forward_backward_2x256_bf16", "ipo.fb.bf16", "ipo bf16 fwd+bwd")]:
        cmd = [a.fb_bench, "--bench", f"^{GROUP}/{name}$", "--sample-size", "10"] + crit_opts
        if f"{GROUP}/{name}:" not in listed:
            b.na(key, label, f"no criterion bench {GROUP}/{name} in benches/forward_backward.rs yet", cmd)
            continue

        def parse(_text, name=name):
            est = json.load(open(os.path.join(crit_home, GROUP, name, "new", "estimates.json")))
            sec = est["median"]["point_estimate"] / 1e9
            return {"seconds": sec, "tokens": 512, "tokens_per_s": 512 / sec, "stat": "criterion median"}
        b.run(key, label, cmd, parse, env={"CRITERION_HOME": crit_home})
    iters = "3" if a.quick else "10"
    py = sys.executable
    for what, dtype, key, label in [("fwd_bwd", "fp32", "torch.fb.fp32", "PyTorch eager fp32 fwd+bwd"),
                                    ("fwd", "fp32", "torch.fwd.fp32", "PyTorch eager fp32 forward"),
                                    ("fwd_bwd", "bf16", "torch.fb.bf16", "PyTorch eager bf16 weights fwd+bwd"),
                                    ("fwd_bwd", "autocast", "torch.fb.autocast", "PyTorch eager fp32 + autocast bf16 fwd+bwd")]:
        cmd = [py, os.path.join(HERE, "torch_fwd_bwd.py"), "--threads", str(a.threads), "--iters", iters,
               "--dtype", dtype, "--what", what]
        b.run(key, label, cmd, lambda t: {**pick(result_line(t), "seconds", "tokens", "tokens_per_s", "times"),
                                          "stat": f"median of {iters}"})


def pick(d, *keys):
    return {k: d[k] for k in keys if k in d}


def ipo_supports_precision(a, sub):
    return "--precision" in sh([a.ipo, "bench", sub, "--help"]).stdout


def train(b, a):
    steps = "1" if a.quick else "3"
    for prec in ["f32", "bf16"]:
        key, label = f"ipo.train.{prec}", f"ipo {prec} train step"
        json_path = os.path.join(b.logs, key + ".json")
        cmd = [a.ipo, "bench", "train", "--device", "cpu", "--shape", "smollm2", "--pairs", "4", "--context", "192",
               "--segment", "64", "--micro-batch", "2", "--steps", steps, "--json", json_path]
        if ipo_supports_precision(a, "train"):
            cmd += ["--precision", prec]
        elif prec != "f32":
            b.na(key, label, "`ipo bench train` has no --precision flag in this build", cmd + ["--precision", prec])
            continue

        def parse(_t, json_path=json_path):
            r = json.load(open(json_path))
            sec = statistics.median(r["step_seconds"])
            return {"seconds": sec, "tokens": r["tokens"], "tokens_per_s": r["tokens"] / sec, "times": r["step_seconds"],
                    "stat": f"median of {len(r['step_seconds'])} steps", "losses": r.get("losses")}
        rec = b.run(key, label, cmd, parse)
        if rec["status"] == "failed" and prec != "f32" and rejected("\n".join(rec.get("tail", []))):
            b.na(key, label, f"this build rejects --precision {prec} for bench train", cmd)
    cmd = [sys.executable, os.path.join(HERE, "torch_train_step.py"), "--threads", str(a.threads), "--steps", steps]
    b.run("torch.train.fp32", "PyTorch eager fp32 TRL-layout train step", cmd,
          lambda t: {**pick(result_line(t), "seconds", "tokens", "tokens_per_s", "times"), "stat": f"median of {steps} steps"})


def ipo_decode_like(b, a, mode, batches, prompt, new):
    """ipo bench decode at each precision: decode rows, or the prefill of the first batch size
    (ipo bench decode --batch 8,8,8 --prompt 128 --new-tokens 2 times three prefills)."""
    has_flag = ipo_supports_precision(a, "decode")
    for prec in ["f32", "bf16", "q8", "q4"]:
        key, label = f"ipo.{mode}.{prec}", f"ipo {prec} {mode}"
        json_path = os.path.join(b.logs, key + ".json")
        cmd = [a.ipo, "bench", "decode", "--device", "cpu", "--shape", "smollm2", "--batch", batches,
               "--prompt", str(prompt), "--new-tokens", str(new), "--json", json_path]
        if has_flag:
            cmd += ["--precision", prec]
        elif prec != "f32":
            b.na(key, label, "`ipo bench decode` has no --precision flag in this build", cmd + ["--precision", prec])
            continue

        def parse(_t, json_path=json_path):
            rows = json.load(open(json_path))["rows"]
            if mode == "decode":
                return {"rows": [pick(r, "batch", "prompt", "new_tokens", "decode_tokens", "decode_seconds", "tokens_per_s",
                                      "prefill_tokens_per_s") for r in rows]}
            tps = [r["prefill_tokens_per_s"] for r in rows]
            return {"prefill_tokens_per_s": statistics.median(tps), "all": tps, "stat": f"median of {len(tps)} prefills",
                    "batch": rows[0]["batch"], "prompt": rows[0]["prompt"]}
        rec = b.run(key, label, cmd, parse)
        if rec["status"] == "failed" and prec != "f32" and rejected("\n".join(rec.get("tail", []))):
            b.na(key, label, f"this build rejects --precision {prec}", cmd)


def q8_gguf(b, a):
    """The Q8_0 GGUF for llama.cpp, written once into the cache (not a timed measurement)."""
    dst = os.path.join(a.gguf_cache, os.path.basename(a.gguf).replace("Q4_1", "Q8_0-requant"))
    if not os.path.exists(dst):
        cmd = [sys.executable, os.path.join(HERE, "llama_cpp_bench.py"), "--mode", "quantize", "--quantize", a.gguf,
               "--gguf", dst, "--threads", str(a.threads)]
        b.run("setup.q8_0", "llama.cpp Q8_0 requantised from the Q4_1 GGUF", cmd, lambda t: {})
    return dst


def llama_runs(b, a, mode, batches, prompt, new, iters):
    for label_q, gguf in [("Q4_1", a.gguf), ("Q8_0", q8_gguf(b, a))]:
        key, label = f"llama.{mode}.{label_q.lower()}", f"llama.cpp {label_q} {mode}"
        if not os.path.exists(gguf):
            b.na(key, label, f"missing {short(gguf)}")
            continue
        cmd = [sys.executable, os.path.join(HERE, "llama_cpp_bench.py"), "--gguf", gguf, "--label", label_q,
               "--threads", str(a.threads), "--mode", mode, "--batch", batches, "--prompt", str(prompt),
               "--new-tokens", str(new), "--iters", str(iters)]
        b.run(key, label, cmd, lambda t: llama_or_hf(result_line(t), mode))


def llama_or_hf(r, mode):
    if mode == "decode":
        return {"rows": r["rows"]}
    row = r["rows"][0]
    return {"prefill_tokens_per_s": row["prefill_tokens_per_s"], "seconds": row["seconds"], "all": row.get("times"),
            "stat": f"median of {len(row.get('times') or [1])}", "batch": row["batch"], "prompt": row["prompt"]}


def hf_runs(b, a, mode, batches, prompt, new, iters):
    for dtype in ["fp32", "bf16"]:
        cmd = [sys.executable, os.path.join(HERE, "hf_generate.py"), "--threads", str(a.threads), "--dtype", dtype,
               "--mode", mode, "--batch", batches, "--prompt", str(prompt), "--new-tokens", str(new), "--iters", str(iters)]
        b.run(f"hf.{mode}.{dtype}", f"HF {'generate' if mode == 'decode' else 'forward'} {dtype} {mode}", cmd, lambda t: llama_or_hf(result_line(t), mode))


def decode(b, a):
    args = (a.batches, a.prompt, a.new_tokens)
    ipo_decode_like(b, a, "decode", *args)
    hf_runs(b, a, "decode", *args, 1)
    llama_runs(b, a, "decode", *args, 1)


def prefill(b, a):
    n = 3
    ipo_decode_like(b, a, "prefill", ",".join([str(a.prefill_batch)] * n), a.prefill_len, 2)
    hf_runs(b, a, "prefill", str(a.prefill_batch), a.prefill_len, 2, n)
    llama_runs(b, a, "prefill", str(a.prefill_batch), a.prefill_len, 2, n)


# ---------------------------------------------------------------------------------------------
# the report

def fmt_rss(rec):
    k = rec.get("peak_rss_kib") if rec else None
    return f"{k / 2**20:.2f} GiB" if k else "n/a"


def cell(rec, value, unit=""):
    """'LABEL: VALUE' or 'LABEL: n/a (why)'."""
    if rec is None:
        return "not run"
    if rec["status"] == "n/a":
        return f"{rec['label']}: n/a"
    if rec["status"] != "ok" or value is None:
        return f"{rec['label']}: **failed** ({rec.get('reason', '')})"
    return f"{rec['label']}: {value}{unit}"


def rows_by_batch(rec):
    if not rec or rec.get("status") != "ok":
        return {}
    return {r["batch"]: r["tokens_per_s"] for r in rec["rows"]}


def ratio(x, y):
    return f"{x / y:.2f}x" if x and y else "n/a"


def comparisons(b, a):
    m = b.m.get
    out = []  # (row, workload, ipo cell, anchor cell, ratio, rss)

    def timed_pair(row, workload, ik, ak, unit="tokens/s"):
        i, an = m(ik), m(ak)
        if i is None and an is None:
            return
        f = lambda r: (f"{r['seconds']:.3g} s, {r['tokens_per_s']:.0f} {unit}"  # noqa: E731
                       if r and r.get("status") == "ok" else None)
        ok = lambda r: r and r.get("status") == "ok"  # noqa: E731
        rt = ratio(i["tokens_per_s"], an["tokens_per_s"]) if ok(i) and ok(an) else "n/a"
        out.append((row, workload, cell(i, f(i)), cell(an, f(an)), rt, f"{fmt_rss(i)} / {fmt_rss(an)}"))

    timed_pair(1, "forward + backward, 2 x 256, fp32", "ipo.fb.f32", "torch.fb.fp32")
    timed_pair(1, "forward only, 2 x 256, fp32", "ipo.fwd.f32", "torch.fwd.fp32")
    timed_pair(2, "forward + backward, 2 x 256, bf16 weights", "ipo.fb.bf16", "torch.fb.bf16")
    timed_pair(2, "forward + backward, 2 x 256, bf16 vs autocast", "ipo.fb.bf16", "torch.fb.autocast")
    timed_pair(2, "forward + backward, 2 x 256, ipo bf16 vs PyTorch fp32", "ipo.fb.bf16", "torch.fb.fp32")
    timed_pair(2, "forward + backward, 2 x 256, ipo f32 vs PyTorch bf16 weights", "ipo.fb.f32", "torch.fb.bf16")
    timed_pair(3, "segment-DPO step, 4 pairs x (192 + 2 x 64), AdamW", "ipo.train.f32", "torch.train.fp32", "pair tokens/s")
    timed_pair(3, "the same, ipo bf16 vs PyTorch fp32", "ipo.train.bf16", "torch.train.fp32", "pair tokens/s")

    batches = [int(x) for x in a.batches.split(",")]
    for ik, ak in [("f32", "hf.decode.fp32"), ("bf16", "hf.decode.bf16"), ("q8", "llama.decode.q8_0"),
                   ("q4", "llama.decode.q4_1"), ("q8", "llama.decode.q4_1"), ("f32", "llama.decode.q8_0")]:
        i, an = m(f"ipo.decode.{ik}"), m(ak)
        if i is None and an is None:
            continue
        ir, ar = rows_by_batch(i), rows_by_batch(an)
        seq = lambda d: " / ".join(f"{d[x]:.1f}" if x in d else "-" for x in batches)  # noqa: E731
        out.append((4, f"decode tokens/s, batch {' / '.join(map(str, batches))}",
                    cell(i, seq(ir) if ir else None), cell(an, seq(ar) if ar else None),
                    " / ".join(ratio(ir.get(x), ar.get(x)) for x in batches), f"{fmt_rss(i)} / {fmt_rss(an)}"))
    for ik, ak in [("f32", "hf.prefill.fp32"), ("bf16", "hf.prefill.bf16"), ("q8", "llama.prefill.q8_0"),
                   ("q4", "llama.prefill.q4_1"), ("q8", "llama.prefill.q4_1"), ("f32", "llama.prefill.q8_0")]:
        i, an = m(f"ipo.prefill.{ik}"), m(ak)
        if i is None and an is None:
            continue
        v = lambda r: r["prefill_tokens_per_s"] if r and r.get("status") == "ok" else None  # noqa: E731
        s = lambda r: f"{v(r):.0f} tokens/s" if v(r) else None  # noqa: E731
        out.append((5, f"prefill tokens/s, {a.prefill_batch} x {a.prefill_len} in one forward", cell(i, s(i)), cell(an, s(an)),
                    ratio(v(i), v(an)), f"{fmt_rss(i)} / {fmt_rss(an)}"))
    return out


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(), "nproc": os.cpu_count()}
    lscpu = sh(["lscpu"]).stdout if shutil.which("lscpu") else ""
    for k in ["Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache"]:
        got = re.search(rf"^{re.escape(k)}:\s*(.+)$", lscpu, re.M)
        if got:
            info[k] = got.group(1).strip()
    flags = re.search(r"^Flags:\s*(.+)$", lscpu, re.M)
    fl = set(flags.group(1).split()) if flags else set()
    info["isa"] = " ".join(f for f in ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"] if f in fl)
    mem = re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()) if os.path.exists("/proc/meminfo") else None
    if mem:
        info["memory"] = f"{int(mem.group(1)) / 2**20:.1f} GiB"
    info["rustc"] = sh(["rustc", "-V"]).stdout.strip() if shutil.which("rustc") else None
    head = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT).stdout.strip()
    info["ipo commit"] = head + (" (uncommitted changes)" if dirty else "")
    return info


def report(b, a, mach, load_before, load_after, started, versions):
    L = []
    L.append(f"# ipo vs PyTorch / Hugging Face / llama.cpp on this CPU ({started})")
    L.append("")
    L.append(f"Machine: {mach.get('Model name', '?')}, {mach['nproc']} logical CPUs ({mach.get('Core(s) per socket', '?')} "
             f"cores/socket, {mach.get('Thread(s) per core', '?')} threads/core), {mach.get('memory', '?')}, ISA: {mach['isa']}; "
             f"{mach['platform']}.")
    L.append(f"Threads: {a.threads} on every side (RAYON_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS, "
             f"torch.set_num_threads, llama.cpp n_threads = n_threads_batch). "
             f"Load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
             f"after: {' '.join(f'{x:.2f}' for x in load_after)}.")
    L.append(f"Versions: ipo {mach['ipo commit']} ({mach.get('rustc')}), " +
             ", ".join(f"{k} {v}" for k, v in versions.items()) + f", Python {mach['python']}."
             + (" **--quick**: fewer iterations, numbers are a smoke check." if a.quick else ""))
    omp = os.environ.get("OMP_WAIT_POLICY")
    L.append(f"OpenMP wait policy (PyTorch, llama.cpp): {omp + ' (--omp-passive)' if omp else 'the libraries default (spinning)'}.")
    busy = max([load_before[0], load_after[0]] + [r[k] for r in b.m.values() for k in ("load_before", "load_after") if k in r])
    if busy > 0.5 * (mach["nproc"] or 1):
        L.append(f"**The machine was busy (load average up to {busy:.1f} on {mach['nproc']} CPUs): the numbers are noisy, "
                 "and OpenMP's spinning barriers (PyTorch, llama.cpp) lose far more than rayon (ipo) under "
                 "oversubscription" + ("" if omp else "; rerun on an idle machine, or with --omp-passive") + ".**")
    L.append("")
    L.append("Ratio = ipo throughput / anchor throughput (above 1: ipo is faster). Peak RSS: each side's own process.")
    L.append("")
    L.append("| row | workload | ipo | anchor | ipo / anchor | peak RSS ipo / anchor |")
    L.append("|---|---|---|---|---|---|")
    for row in comparisons(b, a):
        L.append("| " + " | ".join(str(c) for c in row) + " |")
    L.append("")
    L.append("Notes:")
    L.append("- Rows 1-3: SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads x 64, FFN 1536, vocab 49152, tied), "
             "random weights; ipo fwd+bwd = criterion median (benches/forward_backward.rs), PyTorch = HF LlamaForCausalLM, "
             "SDPA, median. \"bf16 weights\" = model.to(torch.bfloat16); \"autocast\" = fp32 weights under "
             "torch.autocast(\"cpu\", bfloat16).")
    L.append("- Row 3: ipo bench train (the step of benches/train.rs: pairs packed as [context | chosen | rejected], "
             "lm head on segment positions only) vs scripts/bench_cpu/torch_train_step.py (TRL layout: each pair as two "
             "sequences, full logits); same pair tokens (1280/step), same optimizer and clipping.")
    L.append(f"- Row 4: {a.prompt}-token random prompts, exactly {a.new_tokens} new tokens per sequence, greedy. "
             f"Row 5: {a.prefill_batch} prompts x {a.prefill_len} tokens in one forward, median of 3.")
    L.append("- Rows 4-5: ipo bench decode (random weights, smollm2 shape), HF generate (random weights, same shape, "
             "min_new_tokens = max_new_tokens, decode time = from the first to the last step's logits), llama.cpp via llama-cpp-python's "
             "C API (the default model's GGUF, batched: one context with n_seq_max = batch, argmax per sequence); "
             "no side stops at EOS. decode tokens = batch x (new - 1) on every side.")
    L.append("- llama.cpp Q8_0 is requantised from the shipped Q4_1 GGUF (llama_model_quantize, allow_requantize): "
             "no f16/bf16 source of the default model is reachable offline. Same format and speed as a Q8_0 "
             "converted from bf16; its values carry Q4_1's rounding (irrelevant for throughput).")
    imp = b.m.get("python.import")
    if imp and imp.get("peak_rss_kib"):
        L.append(f"- The PyTorch / HF sides' peak RSS includes {fmt_rss(imp)} of interpreter + torch + transformers before "
                 "any model (measurement python.import; torch's PyPI wheel is the CUDA build, whose libraries load on CPU "
                 "too). The llama.cpp helper imports neither.")
    L.append("- ipo q8 is 8-bit per-block weights (compare with Q8_0); ipo q4 is 4-bit blocks of 32 with an f16 scale "
             "and minimum, llama.cpp's Q4_1 blocks (compare with Q4_1: 0.625 bytes per weight on both sides; ipo q4's "
             "decode lm head, the tied embedding, stays 8-bit, as the shipped GGUF keeps it in Q8_0).")
    nas = [r for r in b.m.values() if r["status"] == "n/a"]
    if nas:
        L.append("- n/a: " + "; ".join(f"{r['label']} ({r['reason']})" for r in nas) + ".")
    L.append("")
    L.append("## Measurements (one process each)")
    L.append("")
    L.append("| key | status | result | peak RSS | wall s | load before/after | command |")
    L.append("|---|---|---|---|---|---|---|")
    for r in b.m.values():
        if r["status"] == "ok":
            if "rows" in r:
                res = ", ".join(f"b{x['batch']}: {x['tokens_per_s']:.1f} tok/s" for x in r["rows"])
            elif "tokens_per_s" in r:
                res = f"{r['seconds']:.3f} s ({r.get('stat', '')})"
            elif "prefill_tokens_per_s" in r:
                res = f"{r['prefill_tokens_per_s']:.0f} tok/s ({r.get('stat', '')})"
            else:
                res = "done"
        else:
            res = f"{r['status']}: {r.get('reason', '')}"
        lb = f"{r['load_before']}/{r['load_after']}" if "load_before" in r else ""
        L.append(f"| {r['key']} | {r['status']} | {res} | {fmt_rss(r) if 'peak_rss_kib' in r else ''} | "
                 f"{r.get('wall_s', '')} | {lb} | `{r.get('cmd') or ''}` |")
    L.append("")
    L.append(f"Logs: {short(b.logs)}/KEY.log. Reproduce: `scripts/bench-cpu.sh {' '.join(a.passthrough)}`.")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ipo", required=True)
    ap.add_argument("--fb-bench", default="", help="the forward_backward criterion executable (rows 1-2)")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--gguf-cache", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=GROUPS, action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-passive", action="store_true", help="recorded only: scripts/bench-cpu.sh sets OMP_WAIT_POLICY")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-cpu"))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=128)
    a = ap.parse_args()
    a.passthrough = [x for x in sys.argv[1:] if x not in ("--ipo", "--fb-bench", "--gguf", "--gguf-cache")
                     and x not in (a.ipo, a.fb_bench, a.gguf, a.gguf_cache)]
    for k in THREAD_ENV:
        if os.environ.get(k) != str(a.threads):
            sys.exit(f"bench-cpu: {k}={os.environ.get(k)} but --threads {a.threads}: run through scripts/bench-cpu.sh")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mach = machine()
    import llama_cpp
    import torch
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "llama-cpp-python": llama_cpp.__version__}
    b = Bench(a)
    load_before = os.getloadavg()
    groups = a.only or GROUPS
    # What the Python sides' peak RSS holds before any model: torch's CUDA-build libraries and
    # transformers, imported and linked (not a row; read the anchors' RSS against it).
    b.run("python.import", "import torch + transformers (no model)",
          [sys.executable, "-c", "import torch, transformers; from transformers import LlamaForCausalLM"],
          lambda t: {})
    for g in GROUPS:
        if g in groups:
            {"fwd-bwd": fwd_bwd, "train": train, "decode": decode, "prefill": prefill}[g](b, a)
    load_after = os.getloadavg()
    md = report(b, a, mach, load_before, load_after, started, versions)
    os.makedirs(b.out, exist_ok=True)
    open(os.path.join(b.out, "bench-cpu.md"), "w").write(md)
    comp = [dict(zip(["row", "workload", "ipo", "anchor", "ratio", "peak_rss"], c)) for c in comparisons(b, a)]
    json.dump({"started": started, "machine": mach, "versions": versions, "threads": a.threads, "quick": a.quick,
               "groups": groups, "load_before": load_before, "load_after": load_after,
               "measurements": b.m, "table": comp}, open(os.path.join(b.out, "bench-cpu.json"), "w"), indent=1)
    print(md)
    print(f"bench-cpu: wrote {short(os.path.join(b.out, 'bench-cpu.md'))} and bench-cpu.json", file=sys.stderr)
    failed = [k for k, r in b.m.items() if r["status"] == "failed"]
    if failed:
        print(f"bench-cpu: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
