"""The paper's experiments (§6), each one command, on any dataset train.py reads, on a CPU.

Concern: the experiments of the paper (Figs. 1, 3–8; Table 2) and the second paper's views
question, run with several seeds and reported as mean and range. Every number comes from
train.py / eval.py / probe.py / schedule.py runs started here; nothing is computed any other way. Runs
go two at a time, one thread each (``--jobs``), so that the runs compared share the machine
equally.

    D="--data folder --data-root data/cifar10"      # the README's figures (CIFAR-10 JPEGs)
    python figures.py cost --method moco            # Fig. 3: sample cost, FLOP model vs timed
    python figures.py constant --method moco $D     # Fig. 7 / Table 2: constants at 3 budgets
    python figures.py compare --method moco $D      # Figs. 4, 8, 1: probes, schedules, speed-up
    python figures.py decay --method simclr $D      # Figs. 5/6: cosine vs polynomial decay
    python figures.py views $D                      # second paper: views × data, × compression
    python figures.py views $D --full-size 4500     # the same where data is scarce (10 %)
    python figures.py compare $D --full-size 5000 --budget 800k   # many epochs: 26 of 5,000
    python figures.py auto --method simclr $D       # §5: --accel auto's probe points, batches, grid

Without ``--data`` the runs use the embedded dataset (minutes, a look at the machinery only).
How runs are named, reused and resumed: figures_runs.py; seeds, mean and range and the
speed-up factor of Fig. 1: figures_stats.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import plots  # the PNGs (matplotlib, optional)
from figures_runs import ROOT, evaluate, read_run, run_all, spec
from figures_stats import speedups, spread, summary, table

# The constant strategies compared with the baseline (p0 = 4 on 32-px images): token dropout
# on the query (the online / student view), and patch scaling 4 → 8 on both roles (64 → 16
# tokens). The offline probe's grid: 12 strategies.
DROP, PATCH = "q:drop=0.75", "qk:patch=8"
PROBE_GRID = "drop=0,0.5,0.75,0.9 patch=4,6,8"
PROBE_AT = (0, 25, 50, 75)


# ======================================================================== reporting
def report(folder, text, results):
    print(text)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def describe(args):
    subset = f" ({args.subset:,} images, also the k-NN bank)" if args.subset else ""
    return (f"{args.dataset}{subset}, CPU preset, seeds {','.join(map(str, args.seed_list))} "
            f"(constants: {','.join(map(str, args.seed_list[:args.constant_seeds]))})")


GROUP_HEADER = ["run", "seeds", "strategy (seed 0)", "steps", "NN %", "LP %", "train min",
                "speed-up (units)", "speed-up (wall)"]


def group_rows(args, groups, base_name="baseline"):
    """One table row per named group of runs ({name: [folders, seed by seed]}): strategy,
    steps, final NN and LP (eval.py), training minutes and the speed-up over the baseline of
    the same seed, each as mean (range). Returns (table text, results, {name: [read_run]})."""
    evals = evaluate([o for outs in groups.values() for o in outs], args)
    runs = {n: [read_run(o) for o in outs] for n, outs in groups.items()}
    rows, results = [], {}
    for n, outs in groups.items():
        rs = runs[n]
        pairs = [speedups(b, r) for b, r in zip(runs[base_name], rs)] if n != base_name else []
        nn, lp = [evals[o][0] for o in outs], [evals[o][1] for o in outs]
        minutes = [r["curve"][-1][1] / 60 for r in rs]
        rows.append((n, len(outs), " → ".join(rs[0]["strategies"]), rs[0]["steps"], spread(nn),
                     spread(lp), spread(minutes), spread([p[0] for p in pairs]) if pairs else "1",
                     spread([p[1] for p in pairs]) if pairs else "1"))
        results[n] = dict(row=rows[-1], runs=outs, nn=summary(nn), lp=summary(lp),
                          minutes=summary(minutes), speedup_units=summary([p[0] for p in pairs]),
                          speedup_wall=summary([p[1] for p in pairs]),
                          curves=[r["curve"] for r in rs], strategies=rs[0]["strategies"],
                          probe_units=[r["probe_units"] for r in rs])
    return table(GROUP_HEADER, rows), results, runs


# ========================================================================== figures
def fig_cost(args):
    """Fig. 3: one sample's cost over the query's drop × patch, relative to the uncompressed
    sample, for ``--method`` with its heads: the FLOP model next to timed forward passes."""
    import compress
    import methods
    import vit
    model, name = vit.build_vit(args.model), args.method
    patches, drops = compress.default_patch_grid(model.patch_size), compress.DROP_GRID
    heads = methods.build_method(name, model, **methods.head_sizes(name, model.dim)).cost_heads()
    models = {mode: compress.CostModel(model, mode, heads=heads, reps=args.reps)
              for mode in ("flops", "measured")}
    base = {mode: c.sample_units(name, compress.NONE.resolve(2)) for mode, c in models.items()}
    rows, results = [], []
    for p in patches:
        row = [p]
        for d in drops:
            s = compress.Strategy(q=compress.ViewCompression(d, None if p == model.patch_size
                                                              else p), views=2)
            f, m = (models[k].sample_units(name, s) / base[k] for k in ("flops", "measured"))
            results.append(dict(drop=d, patch=p, flops=f, measured=m))
            row.append(f"{f:.2f} ({m:.2f})")
        rows.append(row)
    ratios = [r["measured"] / r["flops"] for r in results]
    text = (f"Cost of one {name} training sample on ViT-{args.model} ({model.img_size} px, p0 = "
            f"{model.patch_size}), heads counted, the query compressed and the key not, relative "
            f"to the uncompressed sample ({base['flops']:.2f} units by the model, "
            f"{base['measured']:.2f} timed): FLOP model (timed forward passes of backbone + head, "
            f"median of {args.reps} batches of 32). measured / model: {min(ratios):.2f}–{max(ratios):.2f}"
            "\n\n" + table(["patch \\ drop", *[f"{d:g}" for d in drops]], rows))
    report(args.folder, text, results)
    plots.plot_cost(os.path.join(args.folder, "cost.png"), results, patches, drops)


def spec_n(args, method, name, budget, seed, *extra):
    """figures_runs.spec; with ``--full-size N`` (compare, constant, decay: the many-epoch
    regime) the run pretrains on N evenly spaced images of the split (train.py --data-size N),
    its k-NN bank too, and is named ``<name>_n<N>``, so that the whole split's runs are neither
    reused nor overwritten."""
    if not args.subset:
        return spec(args, method, name, budget, seed, *extra)
    return spec(args, method, f"{name}_n{args.subset}", budget, seed,
                "--data-size", str(args.subset), *extra)


def by_budget(args, variants, seeds):
    """Each (name, extra flags) of ``variants`` at each budget of --budgets, with ``seeds``,
    the first variant the reference; → (table rows, results) with final NN, LP and the NN
    gain over the reference of the same budget and seed. An earlier sitting's rows at budgets
    not run now (the figure's results.json) are kept, so budgets can be added one at a time."""
    groups = {(name, b): [spec_n(args, args.method, name, b, s, *extra) for s in seeds]
              for b in args.budgets.split(",") for name, extra in variants}
    run_all([r for g in groups.values() for r in g], args)
    evals = evaluate([o for g in groups.values() for o, _ in g], args)
    reference = variants[0][0]
    results = {}
    for (name, b), g in groups.items():
        nn, lp = [evals[o][0] for o, _ in g], [evals[o][1] for o, _ in g]
        delta = [x - evals[o][0] for x, (o, _) in zip(nn, groups[reference, b])]
        row = (b, name, len(g), read_run(g[0][0])["steps"], spread(nn), spread(lp),
               "" if name == reference else spread(delta))
        results[f"{name} {b}"] = dict(row=row, runs=[o for o, _ in g], nn=summary(nn),
                                      lp=summary(lp), nn_minus_reference=summary(delta))
    results = earlier_budgets(args, results, [name for name, _ in variants])
    return [r["row"] for r in results.values()], results


def earlier_budgets(args, results, names):
    """``results`` ({"<name> <budget>": ...}) with the figure's earlier entries of ``names`` at
    budgets not run now, ordered by budget in units, then as ``names``."""
    import options
    path, old = os.path.join(args.folder, "results.json"), {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    units = lambda key: options.parse_units(key.split()[-1])  # noqa: E731
    now = {options.parse_units(b) for b in args.budgets.split(",")}
    merged = {**{k: v for k, v in old.items() if units(k) not in now and "row" in v
                 and k.split()[0] in names}, **results}
    return {k: merged[k] for k in sorted(merged, key=lambda k: (units(k),
                                                                names.index(k.split()[0])))}


def fig_constant(args):
    """Fig. 7 / Table 2: baseline, constant dropout and constant patch scaling at several
    budgets (each budget its own run and learning-rate schedule); final NN and LP."""
    rows, results = by_budget(args, [("baseline", []), ("drop", ["--accel", DROP]),
                                     ("patch", ["--accel", PATCH])],
                              args.seed_list[:args.constant_seeds])
    text = (f"{args.method}: constant strategies ({DROP}, {PATCH}) against the baseline at "
            f"equal budgets ({describe(args)})\n\n"
            + table(["budget", "run", "seeds", "steps", "NN %", "LP %", "NN − baseline"], rows))
    report(args.folder, text, results)
    plot_budgets(args, results, f"{args.method}: constant strategies against the budget "
                                f"({args.dataset}, mean and range)")


def probe_and_build(args, base_out):
    """Fig. 4 and the paper's offline schedule (§5): probe.py at the baseline's stage
    checkpoints (heatmaps per stage), then build = argmin CA-MSE per stage. Returns the
    schedule's path and the probes' cost in units."""
    probes, units = [], 0.0
    for pct in PROBE_AT:
        out = os.path.join(args.folder, f"probe_{pct}.json")
        if args.fresh or not os.path.isfile(out):
            subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "--ckpt",
                            os.path.join(base_out, f"ckpt_{pct}.pt"), "--grid", PROBE_GRID,
                            "--out", out], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(out) as f:
            units += json.load(f)["units_spent"]
        probes.append(out)
    sched = os.path.join(args.folder, "schedule.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "schedule.py"), "build", *probes,
                    "--out", sched, "--png", os.path.join(args.folder, "schedule.png")],
                   check=True, cwd=ROOT)
    return sched, units


def fig_compare(args):
    """Figs. 4, 8 and 1 for one method at one budget: the baseline, constant dropout and
    patch scaling, the offline schedule (probes of seed 0's baseline) and ``--accel auto``
    (online probes charged to its budget); final accuracies, k-NN curves, speed-ups."""
    m, b, seeds = args.method, args.budget, args.seed_list
    consts = seeds[:args.constant_seeds]
    base = [spec_n(args, m, "baseline", b, s) for s in seeds]
    drop = [spec_n(args, m, "drop", b, s, "--accel", DROP) for s in consts]
    run_all(base + drop, args)
    sched, probe_units = probe_and_build(args, base[0][0])
    groups = dict(baseline=base, drop=drop,
                  patch=[spec_n(args, m, "patch", b, s, "--accel", PATCH) for s in consts],
                  schedule=[spec_n(args, m, "schedule", b, s, "--accel", sched) for s in seeds],
                  auto=[spec_n(args, m, "auto", b, s, "--accel", "auto") for s in seeds])
    run_all(groups["schedule"] + groups["auto"] + groups["patch"], args)
    text, results, runs = group_rows(args, {n: [o for o, _ in g] for n, g in groups.items()})
    auto_units = results["auto"]["probe_units"]
    budget = runs["baseline"][0]["budget"]
    text = (f"{m}, budget {b} units ({describe(args)}), {args.jobs} runs at a time. Speed-up: "
            "budget (or training time) at which a run first reaches the final k-NN of the "
            "baseline of its seed, divided into the baseline's; mean (range) over seeds.\n"
            f"Offline schedule: its probes of the baseline's checkpoints cost {probe_units:,.0f} "
            f"units ({probe_units / budget:.1%} of the budget, not charged to its run) after a "
            f"baseline run; auto's probes cost {spread(auto_units, 0)} units, charged to its "
            "budget.\n\n" + text)
    results["offline_probe_units"] = probe_units
    report(args.folder, text, results)
    plot_curves(args, results, f"{m}: k-NN vs budget and training time ({args.dataset}, "
                               "mean and range)")


def plot_budgets(args, results, title):
    """Fig. 7 / Fig. 5 from by_budget's results ({"<name> <budget>": nn, lp, ...}): final NN
    and LP against the budget, a bar over seeds: accuracy_vs_budget.png."""
    import options
    lines = {}
    for key, r in results.items():
        name, budget = key.split()
        lines.setdefault(name, []).append((options.parse_units(budget), r["nn"], r["lp"]))
    plots.plot_budgets(os.path.join(args.folder, "accuracy_vs_budget.png"), lines, title)


def plot_curves(args, results, title):
    """Fig. 1's k-NN curves of group_rows' results, a band over seeds: knn_vs_budget.png."""
    plots.plot_bands(os.path.join(args.folder, "knn_vs_budget.png"),
                     {n: r["curves"] for n, r in results.items() if isinstance(r, dict)}, title)


def fig_decay(args):
    """Figs. 5/6: cosine against polynomial decay 1 − t² of the learning rate for the
    baseline, at each budget of ``--budgets`` (the paper: the polynomial schedule wins under
    a tight budget)."""
    rows, results = by_budget(args, [("baseline", []), ("poly", ["--lr-schedule", "poly"])],
                              args.seed_list)
    text = (f"{args.method}: learning-rate decay after warm-up, cosine (baseline) against "
            f"polynomial (poly), at equal budgets ({describe(args)}; the same seed pairs each "
            "difference)\n\n"
            + table(["budget", "decay", "seeds", "steps", "NN %", "LP %", "NN − cosine"], rows))
    report(args.folder, text, results)
    plot_budgets(args, results, f"{args.method}: cosine (baseline) against polynomial decay "
                                f"(poly) ({args.dataset}, mean and range)")


def training_images(args):
    """The images of --data's training split (CIFAR-10's 45,000; 8,000 embedded)."""
    import data
    return len(data.build_dataset(args.data, args.data_root, "train", download=args.download))


def fig_views(args):
    """The second paper's claims at equal budget: M = 4 views on half the training images
    against M = 2 on all of them (more views, less data), and 4 views at drop 0.5 against 2
    full views (views × compression), with its multi-view loss. ``--full-size N``: "all" is N
    evenly spaced images of the split (the data-scarce regime), half N / 2; the runs' names
    and the figure's folder carry the N."""
    b, seeds, full, split = args.budget, args.seed_list, args.full_size, training_images(args)
    if full and full >= split:
        raise SystemExit(f"error: --full-size {full} must be below the {split} training images "
                         f"of --data {args.data}")
    half = str(args.half_size or (full or split) // 2)
    size, n = (["--data-size", str(full)], f"_n{full}") if full else ([], "")
    groups = {
        "2 views, all images": [spec(args, "multiview", "v2" + n, b, s, *size) for s in seeds],
        "4 views, half the images": [spec(args, "multiview", "v4half" + n, b, s, "--views", "4",
                                          "--data-size", half) for s in seeds],
        "2 views, half the images": [spec(args, "multiview", "v2half" + n, b, s, "--data-size",
                                          half) for s in seeds],
        "4 views at drop 0.5": [spec(args, "multiview", "v4drop" + n, b, s, *size, "--views",
                                     "4", "--accel", "qk:drop=0.5") for s in seeds]}
    run_all([r for g in groups.values() for r in g], args)
    text, results, _ = group_rows(args, {n: [o for o, _ in g] for n, g in groups.items()},
                                  base_name="2 views, all images")
    text = (f"multi-view loss, budget {b} units ({describe(args)}; all = "
            f"{full or 'the training split'}, half = {half} images): "
            "speed-up against 2 views on all images of the same seed\n\n" + text)
    report(args.folder, text, results)
    plot_curves(args, results, f"multi-view loss: k-NN vs budget and training time "
                               f"({args.dataset}, mean and range)")


# --accel auto's choices, each against the default (4 probe points, 4 batches per probe, the
# 6-strategy grid drop 0/0.5/0.75 × patch p0/2·p0): (row name, run name, train.py flags).
AUTO_VARIANTS = [
    ("auto (default)", "auto", []),
    ("auto, 8 batches a probe", "autob8", ["--auto-batches", "8"]),
    ("auto, the offline grid (12)", "autogrid12", ["--auto-grid", PROBE_GRID]),
    ("auto, probes at 0 and 50 %", "autoat2", ["--auto-at", "0,0.5"]),
    ("auto, probes at 0/10/25/50/75/90 %", "autoat6", ["--auto-at", "0,0.1,0.25,0.5,0.75,0.9"]),
    ("auto, cheapest within 1.5× of the least CA-MSE", "autotol15", ["--auto-tolerance", "1.5"]),
]
AUTO_NAMES = [name for _, name, _ in AUTO_VARIANTS]


def earlier_rows(args, results):
    """``results`` with the rows of an earlier sitting (the figure's results.json) that this one
    did not run, kept when measured against baseline runs of the same names, in AUTO_VARIANTS'
    order. Every entry keeps the baseline NN it was measured against (``baseline_nn``)."""
    path, old = os.path.join(args.folder, "results.json"), {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    base = results["baseline"]["nn"]["values"]
    for r in results.values():
        r["baseline_nn"] = base
    if old.get("baseline", {}).get("runs") != results["baseline"]["runs"]:
        return results
    merged = {}
    for n in ["baseline", *[row for row, _, _ in AUTO_VARIANTS]]:
        r = results.get(n) or old.get(n)
        if r is not None and "row" in r:
            merged[n] = dict(r, baseline_nn=r.get("baseline_nn", old["baseline"]["nn"]["values"]))
    return merged


def marked_rows(results):
    """The table's rows; a row measured against other baseline NN values than this table's
    (its baselines re-run since: the same seeds, a float-level difference grown over training)
    is marked †, and a note gives those values."""
    base, rows, notes = results["baseline"]["nn"]["values"], [], []
    for r in results.values():
        against = r.get("baseline_nn", base)
        rows.append(r["row"] if against == base else [f"{r['row'][0]} †", *r["row"][1:]])
        note = (f"\n† measured against an earlier sitting's baseline runs of the same seeds "
                f"(NN {spread(against)}), re-run since")
        if against != base and note not in notes:
            notes.append(note)
    return rows, "".join(notes)


def fig_auto(args):
    """§5 online: what each choice of --accel auto does at equal total compute (its probes
    charged to its budget): probe points, batches per probe, grid. Against the baseline of
    the same seed; the probes' cost beside each (default auto's runs are compare's). A sitting
    that runs some of --variants keeps the others' rows of an earlier sitting (results.json)."""
    m, b, seeds = args.method, args.budget, args.seed_list
    variants = [v for v in AUTO_VARIANTS if v[1] in args.variants]
    groups = {"baseline": [spec(args, m, "baseline", b, s) for s in seeds]}
    for row, name, extra in variants:
        groups[row] = [spec(args, m, name, b, s, "--accel", "auto", *extra) for s in seeds]
    run_all([r for g in groups.values() for r in g], args)
    _, results, runs = group_rows(args, {n: [o for o, _ in g] for n, g in groups.items()})
    results = earlier_rows(args, results)
    rows, note = marked_rows(results)
    budget = runs["baseline"][0]["budget"]
    costs = [f"* {row}: its probes spent "
             f"{spread([u / budget * 100 for u in r['probe_units']])} % of the budget"
             for row, r in results.items() if row != "baseline"]
    text = (f"{m}, budget {b} units ({describe(args)}): --accel auto's choices, probes charged "
            f"to the budget; speed-up against the baseline of the same seed\n\n"
            + table(GROUP_HEADER, rows) + note + "\n\n"
            + "\n".join(costs))
    report(args.folder, text, results)
    plot_curves(args, results, f"{m}: --accel auto's choices ({args.dataset}, mean and range)")


FIGURES = {"cost": fig_cost, "constant": fig_constant, "compare": fig_compare,
           "decay": fig_decay, "views": fig_views, "auto": fig_auto}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("figure", choices=list(FIGURES))
    ap.add_argument("--method", default="simclr", choices=["simclr", "moco", "dino", "multiview"])
    ap.add_argument("--data", default="embedded", help="train.py's --data (default embedded)")
    ap.add_argument("--data-root", default=None, help="train.py's --data-root")
    ap.add_argument("--download", action="store_true", help="train.py's --download")
    ap.add_argument("--knn-bank", type=int, default=10000,
                    help="training images the curves' k-NN compares against (train.py "
                         "--knn-bank; all of them on the embedded set)")
    ap.add_argument("--budget", default=None,
                    help="compare/views/auto: units per run (default 500k; 200k on the embedded "
                         "set); another budget's figure is written to <figure folder>_<budget>/")
    ap.add_argument("--budgets", default=None, help="constant/decay: the budgets compared "
                    "(default 125k,250k,500k; 50k,100k,200k on the embedded set)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of baselines, schedules and auto")
    ap.add_argument("--constant-seeds", type=int, default=1,
                    help="how many of --seeds the constant strategies run with")
    ap.add_argument("--full-size", type=int, default=None,
                    help="views: 'all the images' (default: the training split; fewer: the "
                         "data-scarce regime, written to <out>/<dataset>/views_n<N>[_<budget>]/"
                         "). compare, constant, decay: pretrain on N images of the split, also "
                         "the k-NN bank (many epochs in a budget; runs <name>_n<N>, figure "
                         "<figure>_<method>_n<N>[_<budget>]/)")
    ap.add_argument("--half-size", type=int, default=None,
                    help="views: 'half the images' (default: half of --full-size or the split)")
    ap.add_argument("--variants", default=",".join(AUTO_NAMES),
                    help="auto: which of --accel auto's choices run (default all: "
                         f"{', '.join(AUTO_NAMES)}); the table keeps the others' rows from an "
                         "earlier sitting against the same baseline runs")
    ap.add_argument("--model", default="cpu", help="cost: the ViT preset timed")
    ap.add_argument("--reps", type=int, default=5, help="cost: timed batches per setting (median)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (threads: cores / jobs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per run (default: the cores divided by --jobs)")
    ap.add_argument("--fresh", action="store_true", help="re-run finished runs too")
    ap.add_argument("--out", default="figs", help="parent folder of the figures and runs")
    ap.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. "
                    "'--data-size 512' for a quick look, with --knn-bank 1000 (the curves' bank "
                    "comes from the whole training split; the figures in README use none)")
    args = ap.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        ap.error(f"--jobs {args.jobs} and --threads {args.threads} must be ≥ 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r} must be integers separated by commas, e.g. 0,1,2")
    if not 1 <= args.constant_seeds <= len(args.seed_list):
        ap.error(f"--constant-seeds {args.constant_seeds} must be in [1, {len(args.seed_list)}] "
                 f"(the number of --seeds)")
    if args.full_size is not None and args.figure in ("cost", "auto"):
        ap.error(f"--full-size is for views, compare, constant and decay, not {args.figure}")
    if args.full_size is not None and args.full_size < 2:
        ap.error(f"--full-size {args.full_size} must be ≥ 2 images (half of it is a group)")
    if args.half_size is not None and not 1 <= args.half_size < (args.full_size or float("inf")):
        ap.error(f"--half-size {args.half_size} must be ≥ 1"
                 + (f" and below --full-size {args.full_size}" if args.full_size else ""))
    unknown = sorted(set(args.variants.split(",")) - set(AUTO_NAMES))
    if unknown:
        ap.error(f"--variants {args.variants!r}: unknown {', '.join(unknown)}; allowed: "
                 f"{', '.join(AUTO_NAMES)}")
    args.variants = args.variants.split(",")
    embedded = args.data == "embedded"
    args.subset = args.full_size if args.figure != "views" else None   # spec_n
    args.dataset = os.path.basename(os.path.normpath(args.data_root)) \
        if args.data == "folder" and args.data_root else args.data
    args.data_flags = ["--data", args.data, *(["--data-root", args.data_root] if args.data_root
                                               else []),
                       *(["--download"] if args.download else []),
                       # all 8,000 on the embedded set; a --full-size subset's bank is itself
                       *([] if args.subset else ["--knn-bank", str(args.knn_bank)])]
    args.all_train = args.figure == "views"
    args.default_budget = "200k" if embedded else "500k"
    args.budget = args.budget or args.default_budget
    args.budgets = args.budgets or ("50k,100k,200k" if embedded else "125k,250k,500k")
    return args


def figure_folder(args):
    """``<out>/<dataset>/<figure>_<method>/`` (views: ``views/``, ``views_n<N>/``); a figure of
    one budget (compare, views, auto) at a budget other than the default adds it
    (``auto_simclr_250k/``), so that it neither overwrites the default's table nor reuses its
    probes."""
    suffix = f"_{args.method}" if args.figure != "views" else \
        f"_n{args.full_size}" if args.full_size else ""
    if args.subset:
        suffix += f"_n{args.subset}"
    if args.figure in ("compare", "views", "auto") and args.budget != args.default_budget:
        suffix += f"_{args.budget}"
    return os.path.join(args.out, args.dataset, args.figure + suffix)


def main(argv=None):
    args = parse_args(argv)
    split = training_images(args) if args.subset else None
    if args.subset and args.subset >= split:
        raise SystemExit(f"error: --full-size {args.subset} must be below the {split} training "
                         f"images of --data {args.data}")
    args.folder = figure_folder(args)
    os.makedirs(args.folder, exist_ok=True)
    t0 = time.time()
    FIGURES[args.figure](args)
    print(f"{args.figure}: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
