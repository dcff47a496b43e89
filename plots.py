"""Every drawing of the project: the figures' PNGs, with matplotlib (optional).

Concern: turning numbers that other files computed into the paper's plots: the k-NN curves of
the speed-up (Fig. 1, figures.py compare, and the README's picture), final accuracy against
the budget (Figs. 7 and 5, figures.py constant and decay), the sample cost over drop × patch (Fig. 3, figures.py cost),
the gradient-error heatmaps (Fig. 4, probe.py and schedule.py build) and the learning-rate
schedules (Fig. 6, schedule.py lr). matplotlib is imported inside each function,
so nothing else needs it; without it a function prints a note and returns None (a table is
always printed by the caller; a plot never stops a run). This file imports nothing of the
project: its inputs are plain lists and dicts.

    from plots import plot_lr
    ts = [i / 100 for i in range(101)]
    plot_lr("lr.png", ts, {"linear decay": [1 - t for t in ts]})   # → "lr.png"
"""


# ============================================================================ helpers
def pyplot(note="tables only, no PNG"):
    """matplotlib.pyplot, or None with a note (plots are optional; tables are not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"note: matplotlib is not installed; {note}")
        return None


# ==================================================== Fig. 1: k-NN vs budget and time
def plot_bands(path, curves, title):
    """k-NN vs units (left) and vs training minutes (right) over seeds (Fig. 1): curves
    {name: [one curve per seed]}, a curve a list of (units, train seconds, k-NN %) at the
    same evaluation points for every seed. The line is the mean over seeds, the band the
    range (min to max); one seed draws a line alone."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs in curves.items():
        n = min(len(c) for c in runs)                          # evaluations every run has
        mean = lambda i: [sum(c[j][i] for c in runs) / len(runs) for j in range(n)]  # noqa: E731
        acc = [[c[j][2] for c in runs] for j in range(n)]
        for ax, x in zip(axes, (mean(0), mean(1))):
            x = [v / 1e3 for v in x] if ax is axes[0] else [v / 60 for v in x]
            line, = ax.plot(x, mean(2), marker="o", ms=3, label=f"{name} ({len(runs)})")
            if len(runs) > 1:
                ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc],
                                color=line.get_color(), alpha=0.2, lw=0)
    axes[0].set_xlabel("budget spent (k units)")
    axes[1].set_xlabel("training time (min, mean over seeds)")
    for ax in axes:
        ax.set_ylabel("k-NN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="run (seeds)", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_speedup(path, base, run, names, target, caption):
    """Fig. 1 for the README: the k-NN level against the budget of a baseline and one
    accelerated run, each the mean over seeds with the range as a band, the baseline's end
    level (the target) dashed, and ``caption`` (the speed-up) as the title. base, run:
    [one curve per seed], a curve [(units, k-NN %)] (figures_stats.levels' output)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for curves, name in zip((base, run), names):
        n = min(len(c) for c in curves)
        x = [sum(c[j][0] for c in curves) / len(curves) / 1e3 for j in range(n)]
        acc = [[c[j][1] for c in curves] for j in range(n)]
        line, = ax.plot(x, [sum(a) / len(a) for a in acc], marker="o", ms=3, label=name)
        ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc],
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(target, ls="--", color="grey", lw=1, label="the baseline's end level")
    ax.set_xlabel("budget spent (k units: forward passes of the uncompressed ViT)")
    ax.set_ylabel("k-NN top-1 (%), 3-evaluation mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ====================================== Fig. 7 (and Fig. 5): final accuracy vs budget
def plot_budgets(path, lines, title):
    """Final k-NN (left) and linear-probe (right) accuracy against the budget (Fig. 7's
    constant strategies, Fig. 5's decays): lines {name: [(units, nn, lp)]}, nn and lp each
    {"mean", "min", "max"} over seeds. The point is the mean, the bar the range (min to
    max); the budget axis is logarithmic, as budgets double."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in lines.items():
        points = sorted(points, key=lambda p: p[0])
        x = [p[0] / 1e3 for p in points]
        for ax, i in zip(axes, (1, 2)):
            mean = [p[i]["mean"] for p in points]
            err = [[m - p[i]["min"] for m, p in zip(mean, points)],
                   [p[i]["max"] - m for m, p in zip(mean, points)]]
            ax.errorbar(x, mean, yerr=err, marker="o", ms=4, capsize=3, label=name)
    for ax, what in zip(axes, ("k-NN", "linear probe")):
        ax.set_xscale("log")
        ax.set_xticks(sorted({p[0] / 1e3 for ps in lines.values() for p in ps}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("budget (k units)")
        ax.set_ylabel(f"final {what} top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ============================================== Fig. 3: sample cost over drop × patch
def plot_cost(path, results, patches, drops):
    """Units per sample over drop × patch, FLOP model (left) beside measured (right) (Fig. 3).
    results: dicts with drop, patch, flops, measured, in the order patch-major, drop-minor."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key in zip(axes, ("flops", "measured")):
        grid = [[r[key] for r in results if r["patch"] == p] for p in patches]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(drops)), [f"{d:g}" for d in drops])
        ax.set_yticks(range(len(patches)), patches)
        ax.set_xlabel("token drop rate")
        ax.set_title(f"units per sample ({'FLOP model' if key == 'flops' else 'measured'})")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("patch size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# =========================================== Fig. 4: gradient error over drop × patch
HEATMAP_METRICS = (("ca_mse", "CA-MSE"), ("bias2", "bias²"), ("ca_var", "cost-adjusted variance"))


def heatmap_panels(results):
    """The numbers of Fig. 4: one panel per (stage, views), in order of progress then views,
    as (title, drops, patches, {metric: grid}); grid[i][j] is the metric at patches[i] and
    drops[j] (NaN where the grid has no such cell). Where a grid varies the roles, several
    strategies fall in one (drop, patch, views) cell: the cell takes the row with the least
    CA-MSE (the one ``schedule.build`` would pick), for all three metrics."""
    import numpy as np
    panels = []
    for res in sorted(results, key=lambda r: r["progress"]):
        base = res.get("base_patch")
        for views in sorted({r.get("views") for r in res["rows"]}, key=lambda v: v or 0):
            rows = [r for r in res["rows"] if r.get("views") == views]
            drops = sorted({r["drop"] for r in rows})
            patches = sorted({r["patch"] or base or 0 for r in rows})
            best = {}                                    # (drop, patch) → row of least CA-MSE
            for r in rows:
                cell = (r["drop"], r["patch"] or base or 0)
                if cell not in best or r["ca_mse"] < best[cell]["ca_mse"]:
                    best[cell] = r
            grids = {m: np.full((len(patches), len(drops)), np.nan) for m, _ in HEATMAP_METRICS}
            for (d, p), r in best.items():
                for m, _ in HEATMAP_METRICS:
                    grids[m][patches.index(p), drops.index(d)] = r[m]
            title = f"progress {res['progress']:.0%}" + (f", {views} views" if views else "")
            panels.append((title, drops, patches, grids))
    return panels


def save_heatmaps(results, path):
    """The paper's Fig. 4: CA-MSE, bias² and cost-adjusted variance over drop × patch, as a PNG.

    One row of three panels per (stage, views) of ``heatmap_panels``: x = the query's drop
    rate, y = its patch size, log colour scale shared by all panels of a column, so that the
    stages compare. A zero (bias² clipped at 0) is drawn at the column's smallest positive
    value; each row's least CA-MSE is boxed. Without matplotlib this prints a note and returns
    None. Returns ``path`` when written.
    """
    plt = pyplot(f"no heatmaps in {path} (pip install matplotlib)")
    if plt is None:
        return None
    import numpy as np
    from matplotlib.colors import LogNorm
    panels = heatmap_panels(results)
    if not panels:
        print(f"note: no probe rows to draw, so no heatmaps in {path}")
        return None
    norms = {}
    for m, _ in HEATMAP_METRICS:
        values = np.concatenate([g[m].ravel() for *_, g in panels])
        positive = values[np.isfinite(values) & (values > 0)]
        lo, hi = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
        norms[m] = (LogNorm(lo, hi if hi > lo else lo * 10), lo)
    fig, axes = plt.subplots(len(panels), 3, figsize=(11, 2.8 * len(panels)), squeeze=False)
    for row, (title, drops, patches, grids) in enumerate(panels):
        for col, (m, label) in enumerate(HEATMAP_METRICS):
            im = _draw_heatmap(axes[row, col], grids[m], grids["ca_mse"], *norms[m])
            axes[row, col].set_xticks(range(len(drops)), [f"{d:g}" for d in drops])
            axes[row, col].set_yticks(range(len(patches)), [str(p or "base") for p in patches])
            axes[row, col].set_title(f"{label} — {title}", fontsize=9)
            fig.colorbar(im, ax=axes[row, col])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_heatmap(ax, grid, ca_mse, norm, floor):
    """One panel: the grid in colour with its values written in, a zero drawn at ``floor``,
    the cell of least CA-MSE boxed in red. Returns the image (for the colour bar)."""
    import numpy as np
    from matplotlib.patches import Rectangle
    im = ax.imshow(np.ma.masked_invalid(np.maximum(grid, floor)), origin="lower", aspect="auto",
                   cmap="viridis", norm=norm)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            light = norm(max(v, floor)) > 0.6                         # dark text on a light cell
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                    color="k" if light else "w")
    if np.isfinite(ca_mse).any():
        i, j = np.unravel_index(np.nanargmin(ca_mse), ca_mse.shape)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xlabel("token drop rate (query)")
    ax.set_ylabel("patch size")
    return im


# ============================================================== Fig. 6: learning rate
def plot_lr(path, progress, curves):
    """Learning rate against progress, one line per schedule (Fig. 6): curves {name: [lr]},
    each lr[i] at progress[i]. schedule.py lr draws cosine against polynomial decay."""
    plt = pyplot(f"no plot in {path} (pip install matplotlib)")
    if plt is None:
        return None
    plt.figure(figsize=(5, 3))
    for kind, rates in curves.items():
        plt.plot(progress, rates, label=kind)
    plt.xlabel("progress (budget spent / budget)")
    plt.ylabel("lr / peak lr")
    plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    return path
