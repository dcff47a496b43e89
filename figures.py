"""The paper's experiments (§6), each one command, on any dataset train.py reads, on a CPU.

Concern: the experiments of the paper (Figs. 1, 3–8; Table 2) and the second paper's views
question, run with several seeds and reported as mean and range. Every number comes from
train.py / eval.py / probe.py / schedule.py runs started here, read back from their committed
records (figures_tables.py); nothing is computed any other way. Runs go two at a time, one thread each (``--jobs``), so that the runs compared share the machine
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
    python figures.py tables                        # every table and PNG again, from the records

Without ``--data`` the runs use the embedded dataset (minutes, a look at the machinery only).
How runs are named, reused and resumed: figures_runs.py; seeds, mean and range and the
speed-up factor of Fig. 1: figures_stats.py; how a table is made from the runs' records alone
(``tables``): figures_tables.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import figures_tables  # every table and PNG, from the runs' records
from figures_runs import ROOT, evaluate, run_all, spec

# The constant strategies compared with the baseline (p0 = 4 on 32-px images): token dropout
# on the query (the online / student view), and patch scaling 4 → 8 on both roles (64 → 16
# tokens). The offline probe's grid: 12 strategies.
DROP, PATCH = "q:drop=0.75", "qk:patch=8"
PROBE_GRID = "drop=0,0.5,0.75,0.9 patch=4,6,8"
PROBE_AT = (0, 25, 50, 75)


# ======================================================================== reporting
def write_figure(args, rows, order=None):
    """The figure's list of runs — ``rows`` {row name: [run folders]} over the rows of an
    earlier sitting not run now (their runs are re-read, not re-run), in ``order`` (a key
    function of the row name; default: as given, earlier rows after) — then its table, its
    results.json and its PNG from the runs' records (figures_tables.py)."""
    path, manifest = os.path.join(args.folder, "results.json"), {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        manifest = {k: dict(runs=v["runs"], lost=v.get("lost", [])) for k, v in
                    (old.items() if isinstance(old, dict) else []) if isinstance(v, dict)
                    and "runs" in v and k not in rows}
    manifest = {**{n: dict(runs=outs, lost=[]) for n, outs in rows.items()}, **manifest}
    if order is not None:
        manifest = {k: manifest[k] for k in sorted(manifest, key=order)}
    return figures_tables.render(args.folder, manifest)


# ========================================================================== figures
def fig_cost(args):
    """Fig. 3: one sample's cost over the query's drop × patch, relative to the uncompressed
    sample, for ``--method`` with its heads: the FLOP model next to timed forward passes.
    The measurement is the figure's record (results.json)."""
    import compress
    import methods
    import vit
    model, name = vit.build_vit(args.model), args.method
    patches, drops = compress.default_patch_grid(model.patch_size), compress.DROP_GRID
    heads = methods.build_method(name, model, **methods.head_sizes(name, model.dim)).cost_heads()
    models = {mode: compress.CostModel(model, mode, heads=heads, reps=args.reps)
              for mode in ("flops", "measured")}
    base = {mode: c.sample_units(name, compress.NONE.resolve(2)) for mode, c in models.items()}
    cells = []
    for p in patches:
        for d in drops:
            s = compress.Strategy(q=compress.ViewCompression(d, None if p == model.patch_size
                                                              else p), views=2)
            f, m = (models[k].sample_units(name, s) / base[k] for k in ("flops", "measured"))
            cells.append(dict(drop=d, patch=p, flops=f, measured=m))
    record = dict(method=name, model=args.model, img_size=model.img_size, p0=model.patch_size,
                  reps=args.reps, base_flops=base["flops"], base_measured=base["measured"],
                  cells=cells)
    figures_tables.render(args.folder, record)


def budget_order(names):
    """Rows "<name> <budget>" by budget in units, then as ``names``."""
    import options
    return lambda k: (options.parse_units(k.split()[-1]), names.index(k.split()[0])
                      if k.split()[0] in names else len(names))


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
    the first variant the reference (NN gain paired by seed); run, evaluated, then written
    with an earlier sitting's rows at other budgets (write_figure)."""
    groups = {f"{name} {b}": [spec_n(args, args.method, name, b, s, *extra) for s in seeds]
              for b in args.budgets.split(",") for name, extra in variants}
    run_all([r for g in groups.values() for r in g], args)
    evaluate([o for g in groups.values() for o, _ in g], args)
    write_figure(args, {k: [o for o, _ in g] for k, g in groups.items()},
                 budget_order([name for name, _ in variants]))


def fig_constant(args):
    """Fig. 7 / Table 2: baseline, constant dropout and constant patch scaling at several
    budgets (each budget its own run and learning-rate schedule); final NN and LP."""
    by_budget(args, [("baseline", []), ("drop", ["--accel", DROP]), ("patch", ["--accel", PATCH])],
              args.seed_list[:args.constant_seeds])


def probe_and_build(args, base_out):
    """Fig. 4 and the paper's offline schedule (§5): probe.py at the baseline's stage
    checkpoints (heatmaps per stage), then build = argmin CA-MSE per stage. Returns the
    schedule's path."""
    probes = []
    for pct in PROBE_AT:
        out = os.path.join(args.folder, f"probe_{pct}.json")
        if args.fresh or not os.path.isfile(out):
            subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "--ckpt",
                            os.path.join(base_out, f"ckpt_{pct}.pt"), "--grid", PROBE_GRID,
                            "--out", out], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        probes.append(out)
    sched = os.path.join(args.folder, "schedule.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "schedule.py"), "build", *probes,
                    "--out", sched, "--png", os.path.join(args.folder, "schedule.png")],
                   check=True, cwd=ROOT)
    return sched


def gain_over_pixels(args, out):
    """--min-gain's measure: the run's final NN (eval.py) minus raw pixels' k-NN on the same
    bank (eval.py --pixel-knn, written to the figure's pixel_knn.json, which its table
    quotes). Returns (gain, NN, pixels) in k-NN points."""
    nn = evaluate([out], args)[out][0]
    path = os.path.join(args.folder, figures_tables.PIXEL_KNN)
    if args.fresh or not os.path.isfile(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"),
                        os.path.join(out, "last.pt"), "--pixel-knn", "--out", path],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    pixels = figures_tables.pixel_knn(args.folder)
    return nn - pixels, nn, pixels


def fig_compare(args):
    """Figs. 4, 8 and 1 for one method at one budget: the baseline, constant dropout and
    patch scaling, the offline schedule (probes of seed 0's baseline) and ``--accel auto``
    (online probes charged to its budget); final accuracies, k-NN curves, speed-ups.
    ``--min-gain G``: seed 0's baseline runs first, and the rest only if it ends G k-NN points
    above raw pixels on its bank (a method that does not learn has nothing to accelerate)."""
    m, b, seeds = args.method, args.budget, args.seed_list
    consts = seeds[:args.constant_seeds]
    base = [spec_n(args, m, "baseline", b, s) for s in seeds]
    if args.min_gain is not None:
        run_all(base[:1], args)
        gain, nn, pixels = gain_over_pixels(args, base[0][0])
        if gain < args.min_gain:
            print(f"{m}'s baseline (seed {seeds[0]}) ends at {nn:.1f} % NN, {gain:+.1f} points "
                  f"from raw pixels' {pixels:.1f} % on its bank: below --min-gain "
                  f"{args.min_gain:g}. It does not learn at this budget, so there is nothing to "
                  "accelerate: the figure is this baseline alone")
            write_figure(args, {"baseline": [base[0][0]]})
            return
    drop = [spec_n(args, m, "drop", b, s, "--accel", DROP) for s in consts]
    run_all(base + drop, args)
    sched = probe_and_build(args, base[0][0])
    groups = dict(baseline=base, drop=drop,
                  patch=[spec_n(args, m, "patch", b, s, "--accel", PATCH) for s in consts],
                  schedule=[spec_n(args, m, "schedule", b, s, "--accel", sched) for s in seeds],
                  auto=[spec_n(args, m, "auto", b, s, "--accel", "auto") for s in seeds])
    run_all(groups["schedule"] + groups["auto"] + groups["patch"], args)
    evaluate([o for g in groups.values() for o, _ in g], args)
    rows = {n: [o for o, _ in g] for n, g in groups.items()}
    write_figure(args, rows, order=list(rows).index)


def fig_decay(args):
    """Figs. 5/6: cosine against polynomial decay 1 − t² of the learning rate for the
    baseline, at each budget of ``--budgets`` (the paper: the polynomial schedule wins under
    a tight budget)."""
    by_budget(args, [("baseline", []), ("poly", ["--lr-schedule", "poly"])], args.seed_list)


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
    evaluate([o for g in groups.values() for o, _ in g], args)
    rows = {n: [o for o, _ in g] for n, g in groups.items()}
    write_figure(args, rows, order=list(rows).index)


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
AUTO_ROWS = ["baseline", *[row for row, _, _ in AUTO_VARIANTS]]


def fig_auto(args):
    """§5 online: what each choice of --accel auto does at equal total compute (its probes
    charged to its budget): probe points, batches per probe, grid. Against the baseline of
    the same seed; the probes' cost beside each. A sitting that runs some of --variants keeps
    the others' rows of an earlier sitting (re-read from their records)."""
    m, b, seeds = args.method, args.budget, args.seed_list
    variants = [v for v in AUTO_VARIANTS if v[1] in args.variants]
    groups = {"baseline": [spec(args, m, "baseline", b, s) for s in seeds]}
    for row, name, extra in variants:
        groups[row] = [spec(args, m, name, b, s, "--accel", "auto", *extra) for s in seeds]
    run_all([r for g in groups.values() for r in g], args)
    evaluate([o for g in groups.values() for o, _ in g], args)
    write_figure(args, {n: [o for o, _ in g] for n, g in groups.items()},
                 order=lambda k: AUTO_ROWS.index(k) if k in AUTO_ROWS else len(AUTO_ROWS))


def fig_tables(args):
    """Every figure under --out (table.md, results.json, PNG) from the committed records
    alone: nothing trained, nothing evaluated."""
    folders = figures_tables.figure_folders(args.out)
    if not folders:
        raise SystemExit(f"error: no figure under --out {args.out} (figs/<dataset>/<figure>/"
                         "results.json)")
    for folder in folders:
        print(f"== {folder}")
        figures_tables.render(folder)
    for folder in figures_tables.figure_folders(args.out, known=False):
        print(f"note: {folder} is no figure figures_tables.py renders; left as it is")


FIGURES = {"cost": fig_cost, "constant": fig_constant, "compare": fig_compare,
           "decay": fig_decay, "views": fig_views, "auto": fig_auto, "tables": fig_tables}


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
    ap.add_argument("--min-gain", type=float, default=None,
                    help="compare: run seed 0's baseline first, and the rest only if its final "
                         "NN ends this many points above raw pixels' k-NN on its bank (default: "
                         "no such check; the many-epoch figures use 5)")
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
    if args.min_gain is not None and args.figure != "compare":
        ap.error(f"--min-gain is for compare, not {args.figure}")
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
    if args.figure != "tables":
        split = training_images(args) if args.subset else None
        if args.subset and args.subset >= split:
            raise SystemExit(f"error: --full-size {args.subset} must be below the {split} "
                             f"training images of --data {args.data}")
        args.folder = figure_folder(args)
        os.makedirs(args.folder, exist_ok=True)
    t0 = time.time()
    FIGURES[args.figure](args)
    print(f"{args.figure}: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
