#!/usr/bin/env python3
"""Attune's benches and the PyTorch reference harness in one run, on this machine.

Run through scripts/bench-side-by-side.sh (it makes the harness's virtualenv first).
Interleaved, so a slow phase of the machine hits both sides alike:
  1. `cargo bench --workspace --bench inference` (`--workspace`: the features the app's
     build resolves, so the bench measures the build people run), then the harness's
     `--task generate` in float32 and under torch.autocast(cpu, bfloat16);
  2. per training method (lora, full, prompt): `cargo bench --workspace --bench train`
     for that method, then the harness's `--task <method>` in float32 and with
     `--amp bf16`.
Every figure is printed beside PyTorch's best mode on this machine (float32 or bfloat16,
whichever was faster here) as a ratio, with the date, the CPU and how busy the machine
was with other work while each side was measured. The full results go to
target/bench-side-by-side/<UTC timestamp>.json and the table to the same name .md.

Environment: ATTUNE_HARNESS_VENV (default ~/.cache/attune-harness/venv),
ATTUNE_HARNESS_MODEL (default ~/.cache/attune-harness/models/smollm2-135m-instruct-q4_1.gguf),
ATTUNE_SHARED (default <repo>/../shared), ATTUNE_BENCH_STEPS (timed training steps, 20).
"""
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ATTUNE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
HARNESS = os.path.join(SHARED, "reference", "harness", "bench_reference.py")
CORPUS = os.path.join(SHARED, "data", "pubmedqa", "corpus.txt")
VENV = os.path.expanduser(os.environ.get("ATTUNE_HARNESS_VENV", "~/.cache/attune-harness/venv"))
MODEL = os.path.expanduser(os.environ.get(
    "ATTUNE_HARNESS_MODEL", "~/.cache/attune-harness/models/smollm2-135m-instruct-q4_1.gguf"))
STEPS = int(os.environ.get("ATTUNE_BENCH_STEPS", "20"))
THREADS = 2
METHODS = ["lora", "full", "prompt"]

# The harness's generate task under torch.autocast(cpu, bfloat16): the task itself has no
# --amp option (only training has), so it is run from this wrapper with the same arguments.
BF16_GENERATE = r"""
import sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, __import__("os").path.dirname(sys.argv[0]))
import bench_reference as b
real = b.task_generate
def under_autocast(args, torch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return real(args, torch)
b.task_generate = under_autocast
b.main()
"""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(cmd, env=None):
    """Runs cmd; returns (stdout, wall s, share of the machine's CPU used by other work)."""
    env = dict(os.environ, **(env or {}))
    t0, b0, c0 = time.perf_counter(), cpu_stat(), children_cpu()
    log("$ " + " ".join(cmd))
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    busy, own = cpu_stat() - b0, children_cpu() - c0
    foreign = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    if p.returncode != 0:
        sys.exit(f"bench-side-by-side: `{' '.join(cmd)}` failed with exit code {p.returncode}")
    return p.stdout, wall, foreign


def attune_bench(name, extra_env, out_dir):
    path = os.path.join(out_dir, f"attune-{name}-{len(os.listdir(out_dir))}.json")
    cmd = ["cargo", "bench", "--quiet", "--workspace", "--bench", name]
    env = {"ATTUNE_BENCH_JSON": path, "RAYON_NUM_THREADS": str(THREADS), **extra_env}
    stdout, wall, foreign = measured(cmd, env)
    sys.stderr.write(stdout)
    with open(path) as f:
        res = json.load(f)
    res["foreign_cpu"] = foreign
    return res


def harness(task, amp, out_dir):
    path = os.path.join(out_dir, f"torch-{task}-{amp}.json")
    py = os.path.join(VENV, "bin", "python")
    args = ["--task", task, "--result", path, "--gguf", MODEL, "--data", CORPUS,
            "--threads", str(THREADS), "--steps", str(STEPS), "--warmup", "2",
            "--out-dir", out_dir, "--adapter-dir", "", "--tag", f"{task}-{amp}"]
    if task == "generate":
        cmd = [py, "-c", BF16_GENERATE, HARNESS] + args if amp == "bf16" else [py, HARNESS] + args
    else:
        cmd = [py, HARNESS] + args + ["--amp", "bf16" if amp == "bf16" else "none"]
    _, _, foreign = measured(cmd)
    with open(path) as f:
        res = json.load(f)
    res["foreign_cpu"] = foreign
    return res


def cpu_name():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    name = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    simd = [f for f in ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
            if f in flags]
    return f"{name}, {os.cpu_count()} vCPU ({' '.join(simd)})"


def main():
    for need in (HARNESS, CORPUS, MODEL, os.path.join(VENV, "bin", "python")):
        if not os.path.exists(need):
            sys.exit(f"bench-side-by-side: {need} is missing (run scripts/bench-side-by-side.sh, "
                     "which sets up the harness)")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out_root = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                            "bench-side-by-side")
    os.makedirs(out_root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="side-by-side-")
    log("building the benches")
    subprocess.run(["cargo", "bench", "--workspace", "--bench", "inference", "--bench", "train",
                    "--no-run"], cwd=ROOT, check=True)

    results = {"date": stamp.isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": THREADS,
               "steps": STEPS, "attune": {}, "torch": {}}
    results["attune"]["inference"] = attune_bench("inference", {}, work)
    for amp in ("f32", "bf16"):
        results["torch"][f"generate-{amp}"] = harness("generate", amp, work)
    for m in METHODS:
        results["attune"][m] = attune_bench("train", {"ATTUNE_BENCH_METHODS": m,
                                                      "ATTUNE_BENCH_STEPS": str(STEPS)}, work)
        for amp in ("f32", "bf16"):
            results["torch"][f"{m}-{amp}"] = harness(m, amp, work)

    table = render(results)
    base = os.path.join(out_root, stamp.strftime("%Y-%m-%dT%H%M%SZ"))
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table)
    print(table)
    log(f"results: {base}.json, table: {base}.md")


def render(r):
    a, t = r["attune"], r["torch"]
    inf = a["inference"]
    rows = []

    def row(work, ours, f32, bf16, fmt="{:.0f}", busy=None, lower_is_better=False):
        cand = [x for x in (f32, bf16) if x is not None]
        best = (min(cand) if lower_is_better else max(cand)) if cand else None
        mode = None if best is None else ("f32" if best == f32 else "bf16")
        show = lambda x: "-" if x is None else fmt.format(x)
        if best is None or ours is None:
            ratio = "-"
        else:
            speedup = best / ours if lower_is_better else ours / best
            ratio = f"**{speedup:.2f}x** (vs {mode})"
        load = "-" if busy is None else f"{busy[0]:.0%} / {busy[1]:.0%}"
        rows.append(f"| {work} | {show(ours)} | {show(f32)} | {show(bf16)} | {ratio} | {load} |")

    g32, g16 = t["generate-f32"], t["generate-bf16"]
    gb = (inf["foreign_cpu"], max(g32["foreign_cpu"], g16["foreign_cpu"]))
    for m, label in (("lora", "LoRA training, r=8, 7 projections"), ("full", "full fine-tuning"),
                     ("prompt", "soft-prompt training, 20 tokens")):
        ours = a[m]["methods"][m]
        tf, tb = t[f"{m}-f32"], t[f"{m}-bf16"]
        row(f"{label} (batch 4 x 256) tok/s", ours["tok_s"], tf["train_tok_s"], tb["train_tok_s"],
            busy=(a[m]["foreign_cpu"], max(tf["foreign_cpu"], tb["foreign_cpu"])))
    row(f"prompt processing, {inf['pp_short_tokens']} tokens (PyTorch: {g32['n_prompt_tokens']}) tok/s",
        inf["pp_short_tok_s"], g32["prefill_tok_s_median"], g16["prefill_tok_s_median"],
        busy=gb)
    row(f"prompt processing, {inf['pp_long_tokens']} tokens (PyTorch: {g32['long_prefill_tokens']}) tok/s",
        inf["pp_long_tok_s"], g32["long_prefill_tok_s_median"], g16["long_prefill_tok_s_median"],
        busy=gb)
    row("decode, 64 tokens, greedy, KV cache tok/s", inf["decode_64_tok_s"], g32["decode_tok_s_median"],
        g16["decode_tok_s_median"], fmt="{:.1f}", busy=gb)
    row("decode, 64 tokens, with the reference LoRA (r=8, 7 projections) tok/s",
        inf.get("decode_64_lora_tok_s"), None, None, fmt="{:.1f}")
    row("model load, s (lower is better; PyTorch: transformers' GGUF load)", inf["load_s"],
        g32["load"]["model_load_s"], None, fmt="{:.2f}", lower_is_better=True)
    mem = []
    for m in METHODS:
        ours = a[m]["methods"][m]
        tf, tb = t[f"{m}-f32"], t[f"{m}-bf16"]
        mem.append(f"| {m} | {ours['peak_rss_mb']:.0f} MB | {tf['maxrss_process_mb']:.0f} MB | "
                   f"{tb['maxrss_process_mb']:.0f} MB | {ours['loss_step1']:.4f} | {tf['loss_step1']:.4f} |")
    v = g32.get("versions", {})
    head = (f"Measured {r['date']} on {r['cpu']}, {r['threads']} threads each side; training: "
            f"{r['steps']} timed steps after 2 warm-up, PubMedQA corpus packed into 256-token blocks. "
            f"PyTorch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}. "
            "Higher is better except load time. The last column is the share of the machine's CPU that "
            "other work took while attune / PyTorch was measured.\n\n")
    body = ("| work | attune | PyTorch f32 | PyTorch bf16 | attune / PyTorch's best | other load |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "| training | attune peak RSS | PyTorch f32 peak RSS | PyTorch bf16 peak RSS | attune loss, step 1 "
            "| PyTorch loss, step 1 |\n|---|---|---|---|---|---|\n" + "\n".join(mem) + "\n")
    return head + body


if __name__ == "__main__":
    main()
