"""A first run on one GPU, checked in one command of a few minutes: the quick start, then every
method on ViT-S/16 at 224 px with no step that waits for the GPU.

For each method, ``train.main`` trains a short run (the embedded images at 224 px, batch 64,
the card's precision: precision.py) whose budget is split into two stages, uncompressed and
``q:drop=0.5,patch=32;k:patch=32``. Every step after a stage's first (which builds that
stage's cached maps) runs under ``torch.cuda.set_sync_debug_mode("error")``: a step that
copies from the host or reads a value back raises there, and the method is reported FAILED
with the op. The steps between progress lines are those steps (a progress line reads the
loss; nothing else waits). Reported per method and stage: the step time (CUDA events after
each step, median over the timed steps), the share of it spent waiting for data, and the
scaled-dot-product-attention kernel that the step ran (the aten op SDPA dispatched to).

    python gpu_check.py                              # ≈ 3 minutes on an H100; exit 1 on a failure
    python gpu_check.py --methods moco --steps 12 --skip-quick-start --report check.json
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import compress
import train
from options import get_args
from run import build_run

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("simclr", "moco", "dino", "multiview")
FAST = "q:drop=0.5,patch=32;k:patch=32"
SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math")


class SdpaKernel(TorchDispatchMode):
    """The SDPA backends (aten ops) called inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.used = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_scaled_dot_product"):
            self.used.add(name.removeprefix("_scaled_dot_product_"))
        return func(*args, **(kwargs or {}))


def quick_start(out, timeout):
    """The README's first command, as a user runs it; → (ok, seconds, its k-NN lines)."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "train.py", "--method", "simclr", "--out", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.time() - t0, [f"did not finish in {timeout} s"]
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "k-NN" in ln or "error" in ln]
    return p.returncode == 0, time.time() - t0, lines[-3:]


def method_argv(method, out, budget, schedule):
    return ["--method", method, "--model", "small", "--img-size", "224", "--batch-size", "64",
            "--data-size", "512", "--workers", "8", "--eval-every", "0", "--log-every", "1",
            "--budget", str(budget), "--accel", schedule, "--out", out, "--device", "cuda"]


def check_method(method, tmp, steps):
    """One short run of ``method`` (module docstring) → its report (a dict)."""
    schedule = os.path.join(tmp, "schedule.json")
    with open(schedule, "w") as f:
        json.dump({"stages": [{"start": 0.0, "strategy": "none"},
                              {"start": 0.5, "strategy": FAST}]}, f)
    out = os.path.join(tmp, method)
    probe_args, _ = get_args(method_argv(method, out, 1, schedule))
    run = build_run(probe_args, torch.device("cuda"), train=False)      # its prices, no more
    units = probe_args.batch_size * run.price(compress.NONE)
    argv = method_argv(method, out, 2 * steps * units, schedule)        # `steps` uncompressed
    events, kernels, first = {0: [], 1: []}, SdpaKernel(), set()
    step_once = train.train_step

    def checked_step(run, state, batch):
        stage = run.accel.index(state.spent / run.args.budget)
        warm = stage not in first                      # builds the stage's maps: not checked
        first.add(stage)
        record = len(events[stage]) == 1               # the second step: which SDPA kernel
        torch.cuda.set_sync_debug_mode("default" if warm else "error")
        try:
            with kernels if record else contextlib.nullcontext():
                result = step_once(run, state, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events[stage].append(None if warm or record else event)
        return result

    report = dict(method=method, precision=run.precision)
    train.train_step = checked_step
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)
    except Exception as e:                             # a step that synchronised, or worse
        report["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        train.train_step = step_once
    torch.cuda.synchronize()
    for stage, evs in events.items():
        timed = [e for e in evs if e is not None]
        gaps = [a.elapsed_time(b) for a, b in zip(timed, timed[1:])]
        report[("none", FAST)[stage]] = dict(
            steps=len(evs), ms_per_step=round(statistics.median(gaps), 2) if gaps else None)
    report["sdpa"] = sorted(kernels.used)
    waits = [json.loads(ln).get("data_wait") for ln in open(os.path.join(out, "log.jsonl"))
             if '"data_wait"' in ln] if os.path.exists(os.path.join(out, "log.jsonl")) else []
    report["data_wait"] = round(statistics.median(waits), 3) if waits else None
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=16, help="uncompressed steps per method")
    ap.add_argument("--skip-quick-start", action="store_true")
    ap.add_argument("--report", help="also write the report to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: gpu_check.py needs a CUDA device; none is visible")
    t0, failed = time.time(), False
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"{name} (sm{capability[0]}{capability[1]}), torch {torch.__version__}", flush=True)
    report = dict(device=name, capability=capability, torch=torch.__version__, methods=[])
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quick_start:
            ok, seconds, lines = quick_start(os.path.join(tmp, "quick"), timeout=150)
            report["quick_start"] = dict(ok=ok, seconds=round(seconds, 1), lines=lines)
            failed |= not ok
            print(f"quick start: {'ok' if ok else 'FAILED'} in {seconds:.0f} s; "
                  + " | ".join(lines), flush=True)
        for method in args.methods:
            r = check_method(method, tmp, args.steps)
            report["methods"].append(r)
            failed |= "error" in r
            print(f"{method:9s} {r['precision']} | uncompressed {r['none']['ms_per_step']} ms/step "
                  f"| {FAST} {r[FAST]['ms_per_step']} ms/step | data wait {r['data_wait']} | "
                  f"SDPA {','.join(r['sdpa']) or '?'} | "
                  f"{'FAILED: ' + r['error'] if 'error' in r else 'no sync in a step'}",
                  flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    print(f"{'FAILED' if failed else 'ok'}: {report['seconds']:.0f} s", flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
