"""The paper's figures in miniature: each one command, on the embedded dataset, on a CPU.

Concern: the experiments of the paper (§6, Figs. 1, 3, 4, 7, 8; Table 3) re-run at a size
that finishes in minutes on a laptop, and the second paper's views × compression question.
Every number comes from train.py / eval.py / schedule.py runs started here; nothing is
computed any other way. Runs go two at a time, one thread each (``--jobs``), so that the
runs being compared share the machine equally.

    python figures.py cost                      # (a) Fig. 3: sample cost, model vs measured
    python figures.py constant                  # (b) Fig. 7 / Table 3: constant strategies
    python figures.py compare --method moco     # (c) Fig. 8 + (d) Fig. 1: schedule, speed-up
    python figures.py views                     # views × compression at equal budget

Each writes ``figs/<figure>/``: one folder per run (train.py's outputs plus eval.json),
``results.json``, ``table.md`` (the table it prints) and a PNG when matplotlib is installed
(drawn by plots.py).
A finished run is reused when the figure is made again with the same settings (``--fresh``
re-runs everything), so a figure can be re-plotted for free.

**Speed-up factor (Fig. 1).** The baseline spends budget B and ends at k-NN accuracy a*.
The accelerated run is evaluated every 10 % of the same budget; the budget at which its
k-NN curve (linear between evaluations) first reaches a* is b, and the speed-up is B / b,
counted in units (forward passes; compress.py) and, from the same curves in training
seconds (evaluation time excluded), in wall-clock time.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import plots  # the PNGs (matplotlib, optional)

ROOT = os.path.dirname(os.path.abspath(__file__))
# The strategies compared with the baseline (32-px images, p0 = 4): token dropout on the
# query (the online / student view), and patch scaling 4 → 8 on both roles (64 → 16 tokens).
DROP, PATCH = "q:drop=0.75", "qk:patch=8"
PROBE_GRID = "drop=0,0.5,0.75,0.9 patch=4,6,8"
BUDGETS = {"simclr": "200k", "moco": "200k", "dino": "200k", "multiview": "200k"}


# ===================================================================== running things
def run_train(out, args, threads, fresh):
    """train.py into ``out`` (reused if it finished before with the same arguments)."""
    argv = [*args, "--out", out]
    done = os.path.join(out, "DONE.json")
    if not fresh and os.path.isfile(done):
        with open(done) as f:
            if json.load(f)["argv"] == argv:
                return None
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_all(runs, jobs, fresh):
    """runs: {out_dir: train.py args}; at most ``jobs`` at once, each on cores // jobs threads."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    pending, active = list(runs.items()), {}
    while pending or active:
        while pending and len(active) < jobs:
            out, args = pending.pop(0)
            p = run_train(out, args, threads, fresh)
            if p is not None:
                print(f"  started {out}", flush=True)
                active[out] = (p, args, time.time())
        for out, (p, args, t0) in list(active.items()):
            if p.poll() is None:
                continue
            del active[out]
            if p.returncode != 0:
                with open(os.path.join(out, "stdout.txt")) as f:
                    tail = f.read()[-2000:]
                raise SystemExit(f"error: train.py {' '.join(args)} failed "
                                 f"(exit {p.returncode}):\n{tail}")
            with open(os.path.join(out, "DONE.json"), "w") as f:
                json.dump(dict(argv=[*args, "--out", out], seconds=time.time() - t0), f)
            print(f"  finished {out} in {(time.time() - t0) / 60:.1f} min", flush=True)
        time.sleep(0.5)


def evaluate(outs, jobs, fresh):
    """eval.py --knn --linear on each run's last.pt → <run>/eval.json (NN and LP)."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    todo = [o for o in outs if fresh or not os.path.isfile(os.path.join(o, "eval.json"))]
    while todo:
        batch, todo = todo[:jobs], todo[jobs:]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        ps = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"),
                                os.path.join(o, "last.pt"), "--knn", "--linear",
                                "--out", os.path.join(o, "eval.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               cwd=ROOT, text=True) for o in batch]
        for o, p in zip(batch, ps):
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"error: eval.py on {o} failed:\n{err[-2000:]}")
    results = {}
    for o in outs:
        with open(os.path.join(o, "eval.json")) as f:
            results[o] = json.load(f)
    return results


def read_run(out):
    """k-NN curve (units, train seconds, accuracy), steps, images and strategies of a run."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    curve = [(r.get("units", 0.0), r.get("train_wall", 0.0), r["knn"]) for r in records if "knn" in r]
    steps = [r for r in records if "loss" in r]
    probes = [r for r in records if "auto" in r]
    return dict(curve=curve, budget=args["budget"], steps=steps[-1]["step"] if steps else 0,
                images=(steps[-1]["step"] * args["batch_size"]) if steps else 0,
                strategies=[r["strategy"] for i, r in enumerate(steps)        # stage by stage
                            if i == 0 or r["strategy"] != steps[i - 1]["strategy"]],
                probe_units=sum(r["probe_units"] for r in probes))


def first_reach(points, target):
    """The smallest x where the piecewise-linear curve through (x, acc) points reaches target."""
    for (x0, a0), (x1, a1) in zip(points, points[1:]):
        if a0 >= target:
            return x0
        if a1 >= target:
            return x0 + (x1 - x0) * (target - a0) / (a1 - a0)
    return points[-1][0] if points and points[-1][1] >= target else None


def speedups(base, run):
    """(units, wall-clock) speed-up of ``run`` over ``base`` (module docstring); None = not reached."""
    target = base["curve"][-1][2]
    b_units, b_wall = base["curve"][-1][0], base["curve"][-1][1]
    u = first_reach([(c[0], c[2]) for c in run["curve"]], target)
    w = first_reach([(c[1], c[2]) for c in run["curve"]], target)
    return (b_units / u if u else None), (b_wall / w if w else None)


# ======================================================================== reporting
def table(header, rows):
    """A Markdown table (printed and written to table.md)."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(folder, text, results):
    print(text)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


# ========================================================================== figures
def common(args, method, budget):
    """train.py flags shared by every run of a figure: the quick start's settings, one seed."""
    return ["--method", method, "--budget", budget, "--seed", str(args.seed), "--log-every", "30",
            *shlex.split(args.train_args)]


def fig_cost(args):
    """(a) Fig. 3: the cost of one compressed view's forward pass over drop × patch, relative
    to the uncompressed view (its units): the FLOP model next to timed forward passes."""
    import compress
    import vit
    model = vit.build_vit(args.model)
    flops, measured = compress.CostModel(model, "flops"), compress.CostModel(model, "measured")
    patches, drops = compress.default_patch_grid(model.patch_size), compress.DROP_GRID
    rows, results = [], []
    for p in patches:
        row, pp = [p], None if p == model.patch_size else p    # None: the base, timed once
        for d in drops:
            f = flops.forward_cost(patch_size=pp, drop=d) / flops.base
            m = measured.forward_cost(patch_size=pp, drop=d) / measured.base
            results.append(dict(drop=d, patch=p, flops=f, measured=m))
            row.append(f"{f:.2f} ({m:.2f})")
        rows.append(row)
    ratios = [r["measured"] / r["flops"] for r in results]
    text = (f"Cost of one view's forward pass on ViT-{args.model} ({model.img_size} px, p0 = "
            f"{model.patch_size}) relative to the uncompressed view: FLOP model (measured, "
            f"median of 5 timed batches of 32). measured / model: {min(ratios):.2f}–"
            f"{max(ratios):.2f}\n\n"
            + table(["patch \\ drop", *[f"{d:g}" for d in drops]], rows))
    report(args.folder, text, results)
    plots.plot_cost(os.path.join(args.folder, "cost.png"), results, patches, compress.DROP_GRID)


def fig_constant(args):
    """(b) Fig. 7 / Table 3: baseline, constant dropout, constant patch scaling; NN and LP at
    several budgets (each budget a separate run with its own LR schedule)."""
    budgets = args.budgets.split(",")
    runs = {}
    for b in budgets:
        for name, accel in (("baseline", "none"), ("drop", DROP), ("patch", PATCH)):
            runs[os.path.join(args.folder, f"{name}_{b}")] = [*common(args, args.method, b),
                                                              "--accel", accel, "--eval-every", "0"]
    run_all(runs, args.jobs, args.fresh)
    evals = evaluate(list(runs), args.jobs, args.fresh)
    rows, results = [], []
    for out in runs:
        name, b = os.path.basename(out).split("_")
        r = read_run(out)
        e = evals[out]
        nn, lp = e["knn"]["top1"], e["linear"]["top1"]
        rows.append((b, name, r["strategies"][0], r["steps"], nn, lp))
        results.append(dict(budget=b, run=name, steps=r["steps"], nn=nn, lp=lp))
    text = (f"{args.method}: constant strategies vs the baseline at equal budgets "
            f"(embedded data, CPU preset, seed {args.seed})\n\n"
            + table(["budget", "run", "strategy", "steps", "NN %", "LP %"], rows))
    report(args.folder, text, results)


def probe_and_build(args, base_out):
    """schedule.py probe at the baseline's stage checkpoints, then build (paper §5)."""
    probes = []
    for pct in (0, 25, 50, 75):
        out = os.path.join(args.folder, f"probe_{pct}.json")
        if args.fresh or not os.path.isfile(out):
            subprocess.run([sys.executable, os.path.join(ROOT, "schedule.py"), "probe", "--ckpt",
                            os.path.join(base_out, f"ckpt_{pct}.pt"), "--grid", PROBE_GRID,
                            "--out", out], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        probes.append(out)
    sched = os.path.join(args.folder, "schedule.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "schedule.py"), "build", *probes,
                    "--out", sched], check=True, cwd=ROOT)
    return sched


def fig_compare(args):
    """(c) Fig. 8 and (d) Fig. 1 for one method: baseline, constant dropout, constant patch
    scaling and the probe-built schedule at equal budget; k-NN curves and speed-up factors."""
    budget = args.budget or BUDGETS[args.method]
    f = lambda name: os.path.join(args.folder, name)                          # noqa: E731
    every = ["--eval-every", "0.1"]
    # 1. the baseline (whose stage checkpoints the probe reads) beside constant dropout
    run_all({f("baseline"): [*common(args, args.method, budget), *every],
             f("drop"): [*common(args, args.method, budget), *every, "--accel", DROP]},
            args.jobs, args.fresh)
    # 2. the schedule: argmin CA-MSE at 0/25/50/75 % of the baseline (offline, as the paper)
    sched = probe_and_build(args, f("baseline"))
    # 3. constant patch scaling beside the schedule
    run_all({f("patch"): [*common(args, args.method, budget), *every, "--accel", PATCH],
             f("schedule"): [*common(args, args.method, budget), *every, "--accel", sched]},
            args.jobs, args.fresh)
    names = ["baseline", "drop", "patch", "schedule"]
    evals = evaluate([f(n) for n in names], args.jobs, args.fresh)
    runs = {n: read_run(f(n)) for n in names}
    rows, results = [], {}
    for n in names:
        r, e = runs[n], evals[f(n)]
        su, sw = speedups(runs["baseline"], r) if n != "baseline" else (1.0, 1.0)
        rows.append((n, " → ".join(r["strategies"]), r["steps"], r["images"], e["knn"]["top1"],
                     e["linear"]["top1"], r["curve"][-1][1] / 60, su, sw))
        results[n] = dict(run=r, nn=e["knn"]["top1"], lp=e["linear"]["top1"], speedup_units=su,
                          speedup_wall=sw)
    text = (f"{args.method}, budget {budget} units, embedded data, CPU preset, seed {args.seed}, "
            f"{args.jobs} runs at a time. Speed-up: budget (or training time) at which the run "
            f"first reaches the baseline's final k-NN ({runs['baseline']['curve'][-1][2]:.1f} %), "
            "divided into the baseline's\n\n"
            + table(["run", "strategy", "steps", "images", "NN %", "LP %", "train min",
                     "speed-up (units)", "speed-up (wall)"], rows))
    report(args.folder, text, results)
    plots.plot_curves(os.path.join(args.folder, "knn_vs_budget.png"), runs, names,
                      f"{args.method}: k-NN vs budget and time (embedded, CPU preset)")


def fig_views(args):
    """Views × compression at equal budget (second paper): 2 full views, or 4 cheaper ones?"""
    budget = args.budget or BUDGETS["simclr"]
    settings = [("simclr", 2, "none"), ("simclr", 4, "qk:drop=0.5"), ("simclr", 4, "none"),
                ("multiview", 2, "none"), ("multiview", 4, "qk:drop=0.5")]
    runs = {os.path.join(args.folder, f"{m}_v{v}_{a.replace(':', '').replace('=', '')}"):
            [*common(args, m, budget), "--views", str(v), "--accel", a, "--eval-every", "0"]
            for m, v, a in settings}
    run_all(runs, args.jobs, args.fresh)
    evals = evaluate(list(runs), args.jobs, args.fresh)
    rows, results = [], []
    for (m, v, a), out in zip(settings, runs):
        r, e = read_run(out), evals[out]
        nn, lp = e["knn"]["top1"], e["linear"]["top1"]
        rows.append((m, v, a, r["steps"], r["images"], nn, lp, r["curve"][-1][1] / 60))
        results.append(dict(method=m, views=v, accel=a, steps=r["steps"], nn=nn, lp=lp))
    text = (f"views × compression at equal budget {budget} units (embedded data, CPU preset, "
            f"seed {args.seed})\n\n"
            + table(["method", "views", "accel", "steps", "images", "NN %", "LP %", "train min"], rows))
    report(args.folder, text, results)


FIGURES = {"cost": fig_cost, "constant": fig_constant, "compare": fig_compare, "views": fig_views}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("figure", choices=list(FIGURES))
    ap.add_argument("--method", default="simclr", choices=["simclr", "moco", "dino", "multiview"])
    ap.add_argument("--budget", default=None, help="compare/views: units per run (default 200k)")
    ap.add_argument("--budgets", default="50k,100k", help="constant: the budgets compared")
    ap.add_argument("--model", default="tiny", help="cost: the ViT preset timed (224 px for tiny)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (threads: cores / jobs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="re-run finished runs too")
    ap.add_argument("--out", default="figs", help="parent folder of the figures' folders")
    ap.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. "
                    "'--data-size 512' for a quick look (the figures in README use none)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs} must be ≥ 1")
    suffix = "" if args.figure in ("cost", "views") else f"_{args.method}"
    args.folder = os.path.join(args.out, args.figure + suffix)
    os.makedirs(args.folder, exist_ok=True)
    t0 = time.time()
    FIGURES[args.figure](args)
    print(f"{args.figure}: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
