"""Every committed table and plot of figs/, from the committed run records alone.

Concern: turning a figure's list of runs and the runs' records into its table.md, its
results.json and its PNG — nothing trained, nothing evaluated. figures.py runs what a figure
needs, writes the list and calls ``render``; ``python figures.py tables`` re-derives every
figure of a clone the same way.

**A figure's list of runs** is its results.json: each row (a group of seeds) names its run
folders in ``runs``; a run the figure once counted whose record was lost (never committed, or
overwritten by a re-run before run folders were kept apart) is listed in ``lost``, not
counted, and named under the table. **A run's record** is its folder's ``args.json``,
``log.jsonl`` (the k-NN curve) and ``eval.json`` (final NN / LP), plus ``DONE.json`` (the
command line) for runs figures.py started; the commit that made it is the commit that added
it (``git log -- <folder>``). The cost figure (Fig. 3) is a measurement of its own: its
results.json is its record.

    python figures.py tables                       # every figure under figs/
    python figures.py tables --out figs            # the same, named
"""
import glob
import json
import os
import re

import plots
from figures_runs import ROOT, read_eval, read_run
from figures_stats import (factor_spread, factor_summary, levels, median, per_seed, speedups,
                           spread, summary, table)

GROUP_KINDS = ("compare", "auto", "views")         # rows of runs at one budget, with curves
BUDGET_KINDS = ("constant", "decay")               # rows of runs at several budgets
SHARED = ("wall-clock: training seconds only (evaluation excluded), two runs at a time, one "
          "thread each, on a 2-core machine shared with other work — indicative only")


def kind_of(folder):
    """The figure a folder holds, from its name: compare_moco/ → compare."""
    name = os.path.basename(os.path.normpath(folder))
    for kind in (*GROUP_KINDS, *BUDGET_KINDS, "cost"):
        if name == kind or name.startswith(kind + "_"):
            return kind
    raise ValueError(f"{folder}: not a figure folder (its name must start with one of "
                     f"{', '.join((*GROUP_KINDS, *BUDGET_KINDS, 'cost'))})")


def data_label(folder):
    """The data a figure ran on, from its folder: figs/cifar10/constant_simclr_n5000 →
    "cifar10, 5,000 images, also the k-NN bank" (figures.py --full-size: the many-epoch
    regime); the views figure's _n<N> is its own "all images" and says so in its rows."""
    name, dataset = os.path.basename(os.path.normpath(folder)), \
        os.path.basename(os.path.dirname(os.path.normpath(folder)))
    n = re.search(r"_n(\d+)(_|$)", name)
    if n and kind_of(folder) != "views":
        return f"{dataset}, {int(n.group(1)):,} images, also the k-NN bank"
    return dataset


def at(out):
    """A run folder as a figure lists it (relative to the repository's root) on disk."""
    return os.path.join(ROOT, out)


def has_record(out):
    return all(os.path.isfile(os.path.join(at(out), f)) for f in ("args.json", "log.jsonl",
                                                                   "eval.json"))


def split_lost(row):
    """(runs with a record, runs lost) of a row {"runs": [...], "lost": [...]}; a listed run
    whose record is missing is moved to lost."""
    runs = [o for o in row.get("runs", []) if has_record(o)]
    lost = [*row.get("lost", []), *[o for o in row.get("runs", []) if not has_record(o)]]
    return runs, lost


def lost_note(lost):
    """Lines naming the runs a figure lists as lost, row by row."""
    lines = [f"* {name}: {', '.join(os.path.basename(o) for o in outs)}"
             for name, outs in lost.items() if outs]
    return ("\n\nRuns this figure counted whose records are lost (not counted above; "
            "docs/figures.md):\n" + "\n".join(lines)) if lines else ""


# ============================================================ one budget, with curves
def group_results(manifest):
    """{row: {"runs", "lost"}} (first row the reference) → {row: results} with each run's
    record: final NN / LP, curve, and the speed-up against the reference of the same seed
    (the reference against itself: the noise floor)."""
    names = [n for n, r in manifest.items() if isinstance(r, dict) and "runs" in r]
    split = {n: split_lost(manifest[n]) for n in names}
    reads = {o: read_run(at(o)) for runs, _ in split.values() for o in runs}
    reference = {reads[o]["seed"]: reads[o] for o in split[names[0]][0]}
    ref_nn = {reads[o]["seed"]: read_eval(at(o))[0] for o in split[names[0]][0]}
    unpaired = [o for runs, _ in split.values() for o in runs if reads[o]["seed"] not in reference]
    if unpaired and reference:
        raise SystemExit(f"error: {', '.join(unpaired)}: no '{names[0]}' run of the same seed "
                         "on record to compare with; list the run as lost or add that seed")
    results = {}
    for n in names:
        runs, lost = split[n]
        rs = [reads[o] for o in runs]
        evals = [read_eval(at(o)) for o in runs]
        pairs = [speedups(reference[r["seed"]], r) for r in rs]
        results[n] = dict(runs=runs, lost=lost, seeds=[r["seed"] for r in rs],
                          nn=summary([e[0] for e in evals]), lp=summary([e[1] for e in evals]),
                          nn_minus_reference=summary([e[0] - ref_nn[r["seed"]]
                                                      for e, r in zip(evals, rs)]),
                          minutes=summary([r["curve"][-1][1] / 60 for r in rs]),
                          speedup_units=factor_summary([p[0] for p in pairs]),
                          speedup_wall=factor_summary([p[1] for p in pairs]),
                          steps=[r["steps"] for r in rs], strategies=[r["strategies"] for r in rs],
                          probe_units=[r["probe_units"] for r in rs],
                          budget=rs[0]["budget"] if rs else None,
                          method=rs[0]["method"] if rs else None,
                          curves=[r["curve"] for r in rs])
    return results


GROUP_HEADER = ["run", "seeds", "strategy (first seed)", "steps", "NN %", "LP %",
                "NN − reference", "train min", "speed-up, units", "per seed", "speed-up, wall ‡"]


def group_table(results, reference):
    """The Markdown table of group_results' rows with a record (the reference first)."""
    rows = []
    for n, r in results.items():
        if not r["runs"]:
            continue
        rows.append((n, ",".join(map(str, r["seeds"])), " → ".join(r["strategies"][0]),
                     r["steps"][0], spread(r["nn"]["values"]), spread(r["lp"]["values"]),
                     "" if n == reference else spread(r["nn_minus_reference"]["values"]),
                     spread(r["minutes"]["values"]),
                     factor_spread(r["speedup_units"]["values"]),
                     per_seed(r["speedup_units"]["values"]),
                     factor_spread(r["speedup_wall"]["values"])))
    return table(GROUP_HEADER, rows)


def render_group(folder, manifest):
    """compare / auto / views: the table of rows at one budget, the k-NN curves' PNG."""
    results = group_results(manifest)
    names = list(results)
    base = results[names[0]]
    budget = base["budget"]
    png = os.path.join(folder, "knn_vs_budget.png")
    if budget is None:
        return unrecorded(png, results), results
    text = (f"{base['method']}, {budget:,.0f} units a run, "
            f"{data_label(folder)}. "
            f"Speed-up against '{names[0]}' of the same seed (figures_stats.py): the budget "
            "from which a run's k-NN level (a 3-evaluation mean) stays at the reference's end "
            "level, divided into the reference's budget; median (range) over seeds, n.r. = "
            f"not reached (counted in, as the lowest). The '{names[0]}' row is the reference "
            "against itself: the noise floor, below which a factor means nothing.\n"
            f"‡ {SHARED}.")
    if kind_of(folder) == "compare" and glob.glob(os.path.join(folder, "probe_*.json")):
        results["offline_probe_units"] = probe_units(folder)
        text += (f"\nOffline schedule: its probes of the baseline's checkpoints cost "
                 f"{results['offline_probe_units']:,.0f} units "
                 f"({results['offline_probe_units'] / budget:.1%} of the budget, not charged "
                 "to its runs).")
    pixels = pixel_knn(folder)
    if pixels is not None:
        results["pixel_knn"] = pixels
        text += (f"\nRaw pixels' k-NN on the same bank (pixel_knn.json, eval.py --pixel-knn): "
                 f"{pixels:.1f} %; '{names[0]}' minus raw pixels: "
                 f"{spread([v - pixels for v in base['nn']['values']])} points.")
    costs = [f"* {n}: its probes spent "
             f"{spread([u / budget * 100 for u in r['probe_units']])} % of the budget, "
             "charged to it" for n, r in results.items()
             if isinstance(r, dict) and any(r.get("probe_units", []))]
    text += "\n\n" + group_table({n: results[n] for n in names}, names[0])
    text += probe_table(folder)
    best, pairs = paired_with_best_constant({n: results[n] for n in names})
    if pairs:
        results["paired_with_best_constant"] = dict(best=best, pairs=pairs)
        text += "\n\n" + paired_table(best, pairs)
    text += ("\n\n" + "\n".join(costs) if costs else "")
    text += lost_note({n: results[n]["lost"] for n in names})
    if "patch" in results and results["patch"]["runs"]:
        fig1(folder, results, names[0], "patch")
    plots.plot_bands(png,
                     {f"{n} (seeds {','.join(map(str, results[n]['seeds']))})":
                      results[n]["curves"] for n in names if results[n]["runs"]},
                     f"{base['method']}: k-NN against budget and training time (mean, range "
                     "over seeds)")
    return text, results


CONSTANTS, ADAPTIVE = ("drop", "patch"), ("schedule", "auto")


def paired_with_best_constant(results):
    """Fig. 8's question, paired by seed: each adaptive row's (schedule, auto) final NN and LP
    minus those of the best constant (the constant row of higher mean NN) on the same seed.
    Returns (best constant, {row: [(seed, ΔNN, ΔLP)]}), or (None, {}) without both kinds."""
    consts = [n for n in CONSTANTS if n in results and results[n]["runs"]]
    if not consts:
        return None, {}
    best = max(consts, key=lambda n: results[n]["nn"]["mean"])
    b = results[best]
    ref = {s: (nn, lp) for s, nn, lp in zip(b["seeds"], b["nn"]["values"], b["lp"]["values"])}
    pairs = {}
    for n in ADAPTIVE:
        r = results.get(n)
        if r and r["runs"]:
            pairs[n] = [(s, nn - ref[s][0], lp - ref[s][1]) for s, nn, lp in
                        zip(r["seeds"], r["nn"]["values"], r["lp"]["values"]) if s in ref]
    return best, {n: p for n, p in pairs.items() if p}


def paired_table(best, pairs):
    """The Markdown of paired_with_best_constant: one row per adaptive strategy."""
    rows = [(f"{n} − {best}", ",".join(str(s) for s, _, _ in p),
             " / ".join(f"{d:+.1f}" for _, d, _ in p), spread([d for _, d, _ in p]),
             " / ".join(f"{d:+.1f}" for _, _, d in p), spread([d for _, _, d in p]))
            for n, p in pairs.items()]
    return (f"Fig. 8, paired by seed against the best constant ('{best}', the higher mean NN):"
            "\n\n" + table(["difference", "seeds", "NN per seed", "NN mean (range)",
                             "LP per seed", "LP mean (range)"], rows))


def unrecorded(png, results):
    """The text of a figure whose reference rows' records are all lost; its PNG, drawn from
    runs no longer on record, removed."""
    if os.path.isfile(png):
        os.remove(png)
    return ("No run of this figure has a record: it is not re-derivable, and nothing of it is "
            "claimed." + lost_note({n: r["lost"] for n, r in results.items()}))


def fig1(folder, results, ref, name):
    """fig1.png: the levels of ``ref`` and ``name`` against the budget, the median target and
    the speed-up in the title (the README's picture)."""
    levs = {n: [levels([(c[0], c[2]) for c in curve]) for curve in results[n]["curves"]]
            for n in (ref, name)}
    target = median([lv[-1][1] for lv in levs[ref]])
    s, floor = results[name]["speedup_units"]["values"], results[ref]["speedup_units"]["values"]
    method = {"simclr": "SimCLR", "moco": "MoCo-v3", "dino": "DINO"}.get(
        results[ref]["method"], results[ref]["method"])
    caption = (f"{method}, CIFAR-10, {len(s)} seeds: constant patch scaling 4 → 8 px holds the "
               f"baseline's end level\nwith {factor_spread(s)}× fewer units (median (range); "
               f"the baseline against itself: {factor_spread(floor)}×)")
    plots.plot_speedup(os.path.join(folder, "fig1.png"), levs[ref], levs[name],
                       [f"{ref} ({len(floor)} seeds)", f"{name}: qk:patch=8 ({len(s)} seeds)"],
                       target, caption)


FIG4 = ("q:patch=8;k:patch=8", "q:patch=6;k:patch=6", "q:drop=0.75")   # the table's columns


def probe_table(folder):
    """Fig. 4 from the offline probes (probe_*.json, one per stage of seed 0's baseline):
    per stage the uncompressed CA-MSE, bias² / CA-MSE of the FIG4 strategies, and the
    strategy of least CA-MSE (the schedule's choice) with its units a sample against the
    uncompressed one's; in units of ‖g‖², as probe.py writes them. Empty without probes."""
    from schedule import best_strategy
    stages = []
    for path in glob.glob(os.path.join(folder, "probe_*.json")):
        with open(path) as f:
            probe = json.load(f)
        by = {r["strategy"]: r for r in probe["rows"]}
        stages.append((probe["progress"], by, by[best_strategy(probe)]))
    if not stages:
        return ""
    rows = []
    for progress, by, least in sorted(stages, key=lambda s: s[0]):
        rows.append((f"{progress:.0%}", f"{by['none']['ca_mse']:.2f}",
                     *(f"{by[n]['bias2']:.2f} / {by[n]['ca_mse']:.2f}" if n in by else "–"
                       for n in FIG4),
                     f"`{least['strategy']}` {least['ca_mse']:.2f}",
                     f"{least['units']:.1f} of {by['none']['units']:.1f}"))
    return ("\n\nFig. 4, the offline probes of the first seed's baseline per stage (units of "
            "‖g‖²; bias² / CA-MSE per strategy):\n\n"
            + table(["stage", "uncompressed CA-MSE", *(f"`{n}`" for n in FIG4),
                     "least CA-MSE", "its units a sample"], rows))


PIXEL_KNN = "pixel_knn.json"      # a figure's raw-pixel reference (eval.py --pixel-knn)


def pixel_knn(folder):
    """Raw pixels' k-NN top-1 % on the figure's bank (its PIXEL_KNN, written by
    eval.py --pixel-knn), or None without one."""
    path = os.path.join(folder, PIXEL_KNN)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["pixel_knn"]["top1"]


def probe_units(folder):
    """Units the offline probes spent: the sum over the folder's probe_*.json."""
    total = 0.0
    for path in sorted(glob.glob(os.path.join(folder, "probe_*.json"))):
        with open(path) as f:
            total += json.load(f)["units_spent"]
    return total


# ================================================================ several budgets
def budget_results(manifest, reference="baseline"):
    """{"<row> <budget>": {"runs", "lost"}} → results with final NN / LP and the NN gain over
    the ``reference`` row of the same budget (in units: 500k = 500000), paired by seed."""
    import options
    reads = {}
    for key, row in manifest.items():
        runs, lost = split_lost(row)
        rs = [read_run(at(o)) for o in runs]
        reads[key] = (runs, lost, rs, {r["seed"]: read_eval(at(o)) for r, o in zip(rs, runs)})
    units = lambda key: options.parse_units(key.split()[1])  # noqa: E731
    refs = {units(k): v[3] for k, v in reads.items() if k.split()[0] == reference}
    results = {}
    for key, (runs, lost, rs, evals) in reads.items():
        ref = refs.get(units(key), {})
        delta = [evals[s][0] - ref[s][0] for s in evals if s in ref]
        results[key] = dict(runs=runs, lost=lost, seeds=list(evals),
                            steps=[r["steps"] for r in rs],
                            nn=summary([e[0] for e in evals.values()]),
                            lp=summary([e[1] for e in evals.values()]),
                            nn_minus_reference=summary(delta) if key.split()[0] != reference
                            else None, method=rs[0]["method"] if rs else None)
    return results


def render_budgets(folder, manifest):
    """constant / decay: final NN and LP at each budget, the gain over the reference."""
    results = budget_results(manifest)
    first = next(r for r in results.values() if r["runs"])
    kind = kind_of(folder)
    what = ("constant strategies (q:drop=0.75, qk:patch=8) against the baseline"
            if kind == "constant" else "learning-rate decay after warm-up, cosine (baseline) "
            "against polynomial 1 − t² (poly)")
    rows = [(k.split()[1], k.split()[0], ",".join(map(str, r["seeds"])),
             r["steps"][0] if r["steps"] else "–", spread(r["nn"]["values"]),
             spread(r["lp"]["values"]),
             "" if r["nn_minus_reference"] is None else spread(r["nn_minus_reference"]["values"]))
            for k, r in results.items() if r["runs"]]
    text = (f"{first['method']}: {what}, at equal budgets "
            f"({data_label(folder)}; final NN / LP: "
            "eval.py, mean (range) over seeds; the gain paired by seed)\n\n"
            + table(["budget", "run", "seeds", "steps", "NN %", "LP %", "NN − baseline"], rows)
            + lost_note({k: r["lost"] for k, r in results.items()}))
    import options
    lines = {}
    for key, r in results.items():
        if r["runs"]:
            name, budget = key.split()
            lines.setdefault(name, []).append((options.parse_units(budget), r["nn"], r["lp"]))
    plots.plot_budgets(os.path.join(folder, "accuracy_vs_budget.png"), lines,
                       f"{first['method']}: {what.split(',')[0]} (mean and range over seeds)")
    return text, results


# ========================================================================= Fig. 3
def cost_text(record):
    """Fig. 3's table from its record (figures.py fig_cost's measurement)."""
    cells, patches = record["cells"], sorted({c["patch"] for c in record["cells"]})
    drops = sorted({c["drop"] for c in cells})
    at = {(c["patch"], c["drop"]): c for c in cells}
    rows = [[p, *[f"{at[p, d]['flops']:.2f} ({at[p, d]['measured']:.2f})" for d in drops]]
            for p in patches]
    ratios = [c["measured"] / c["flops"] for c in cells]
    return (f"Cost of one {record['method']} training sample on ViT-{record['model']} "
            f"({record['img_size']} px, p0 = {record['p0']}), heads counted, the query "
            "compressed and the key not, relative to the uncompressed sample "
            f"({record['base_flops']:.2f} units by the model, {record['base_measured']:.2f} "
            "timed): FLOP model (timed forward passes of backbone + head, median of "
            f"{record['reps']} batches of 32). measured / model: "
            f"{min(ratios):.2f}–{max(ratios):.2f}\n\n"
            + table(["patch \\ drop", *[f"{d:g}" for d in drops]], rows)), patches, drops


def render_cost(folder, record):
    text, patches, drops = cost_text(record)
    plots.plot_cost(os.path.join(folder, "cost.png"), record["cells"], patches, drops)
    return text, record


# ======================================================================= the lot
def render(folder, manifest=None, quiet=False):
    """table.md, results.json and the PNG of one figure folder, from its list of runs
    (``manifest``, default its results.json) and the runs' records; returns the table
    (printed unless ``quiet``)."""
    if manifest is None:
        with open(os.path.join(folder, "results.json")) as f:
            manifest = json.load(f)
    kind = kind_of(folder)
    draw = render_group if kind in GROUP_KINDS else render_budgets if kind in BUDGET_KINDS \
        else render_cost
    text, results = draw(folder, manifest)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not quiet:
        print(text)
    return text


def figure_folders(out, known=True):
    """Every figure folder under ``out`` (figs/<dataset>/<figure>/ with a results.json) of a
    kind this file renders (``known``), or of none (``known=False``)."""
    folders = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(out, "*", "*",
                                                                       "results.json")))
    return [f for f in folders if is_figure(f) == known]


def is_figure(folder):
    try:
        return bool(kind_of(folder))
    except ValueError:
        return False
