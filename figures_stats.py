"""figures.py's numbers: mean and range over seeds, the speed-up factor, the Markdown table.

**Seeds.** Baselines, schedules and ``auto`` run with every seed of ``--seeds`` (default
0,1,2); the constant strategies with the first ``--constant-seeds`` of them. Final accuracies
are given as mean and range (min–max) over seeds; the curves are drawn as the mean with the
range as a band.

**Speed-up factor (Fig. 1).** Each run is evaluated (k-NN) every 10 % of its budget: 11
points from 0 to 100 %. A single evaluation is noisy (±0.5 NN on a plateau), so both sides
of the comparison are read through the same 3-evaluation mean (``WINDOW``), placed at the
middle evaluation's budget:

    level(x_i) = (a_{i-1} + a_i + a_{i+1}) / 3          (i = 1 … 9: 10 % … 90 %)
    target     = level(x_9) of the baseline of the same seed  (its last three evaluations)
    x*         = the smallest x from which the run's level (linear between points) never
                 falls below the target again — it reaches the target *and stays there*
    factor     = B / x*                                  (B: the baseline's whole budget)

in units (forward passes, compress.py) and, from the same curves in training seconds
(evaluation excluded: log.jsonl's ``train_wall``), in wall-clock time. A run whose level
never stays at the target has no factor below its own budget: it is *not reached* (``None``;
its factor is below ~1.1), counted in, never dropped — the summary is the **median and
range over every seed**, a not-reached seed ranking below every reached one. The baseline
scored against itself gives the **noise floor**: level(x) reaches its own end level before
x = B when the curve has flattened, so a baseline "speeds itself up" by 1.0–1.5; a factor
inside the floor's range is noise. A factor is infinite only for a run already at the target
when first measured.

The curves' k-NN uses ``--knn-bank`` training images (10,000 of CIFAR-10's 45,000; all on
the embedded set); the final NN / LP columns are eval.py's, against the whole training set.

    from figures_stats import speedups
    base = dict(curve=[(u, u / 10, 40.0 + min(u, 500) / 100) for u in range(0, 1001, 100)])
    speedups(base, base)   # → (1.67, 1.67): flat from 500, its level holds the end's from 600
"""
import math

WINDOW = 3                    # evaluations averaged into one level (10 % of the budget apart)


def levels(points, k=WINDOW):
    """[(x, acc)] → the mean of each k consecutive accuracies at the middle point's x."""
    if len(points) < k:
        raise ValueError(f"a curve of {len(points)} evaluations cannot be read through a "
                         f"{k}-evaluation mean; need ≥ {k}")
    h = k // 2
    return [(points[i + h][0], sum(a for _, a in points[i:i + k]) / k)
            for i in range(len(points) - k + 1)]


def reach_and_stay(points, target):
    """The smallest x from which the piecewise-linear curve through [(x, acc)] stays ≥ target;
    None if its last point is below it."""
    below = [i for i, (_, a) in enumerate(points) if a < target]
    if not below:
        return points[0][0]
    i = below[-1]
    if i == len(points) - 1:
        return None
    (x0, a0), (x1, a1) = points[i], points[i + 1]
    return x0 + (x1 - x0) * (target - a0) / (a1 - a0)


def factor(total, x):
    """total / x; a run at the target when first measured (x = 0) is infinitely faster."""
    if x is None:
        return None
    return math.inf if x == 0 else total / x


def speedups(base, run, k=WINDOW):
    """(units, wall-clock) speed-up of ``run`` over ``base`` (module docstring); each None
    when the run never reaches the target to stay. Curves: [(units, train s, k-NN %)]."""
    target = levels([(c[0], c[2]) for c in base["curve"]], k)[-1][1]
    b_units, b_wall = base["curve"][-1][0], base["curve"][-1][1]
    u = reach_and_stay(levels([(c[0], c[2]) for c in run["curve"]], k), target)
    w = reach_and_stay(levels([(c[1], c[2]) for c in run["curve"]], k), target)
    return factor(b_units, u), factor(b_wall, w)


def ranked(values):
    """values sorted, a not-reached seed (None) below every reached one."""
    return sorted(values, key=lambda v: -math.inf if v is None else v)


def median(values):
    """The median over every seed, None (not reached) counted as the lowest; the mean of the
    middle two for an even count (None if either is None, or no values)."""
    v, n = ranked(values), len(values)
    if not n:
        return None
    mid = v[(n - 1) // 2: n // 2 + 1]
    return None if None in mid else sum(mid) / len(mid)


def factor_text(v, digits=1):
    return "n.r." if v is None else "∞" if v == math.inf else f"{v:.{digits}f}"


def factor_spread(values, digits=1):
    """'median (min–max)' of per-seed factors, not-reached seeds counted in as 'n.r.':
    '3.5 (3.3–5.9)', '4.3 (n.r.–4.6)', 'n.r. (n.r.–1.2)'. One value prints alone."""
    if not values:
        return "–"
    v = ranked(values)
    text = factor_text(median(values), digits)
    if len(values) > 1:
        text += f" ({factor_text(v[0], digits)}–{factor_text(v[-1], digits)})"
    return text


def per_seed(values, digits=1):
    """'3.3 / 5.9 / n.r.': each seed's factor, in seed order."""
    return " / ".join(factor_text(v, digits) for v in values)


def factor_summary(values):
    """median, min, max and the per-seed values (None: not reached) for results.json."""
    v = ranked(values)
    return dict(median=median(values), min=v[0] if v else None, max=v[-1] if v else None,
                values=values)


def spread(values, digits=1):
    """'mean (min–max)' over seeds of a final accuracy; one value prints alone."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else \
        f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def summary(values):
    """mean, min, max and the values for results.json."""
    return dict(mean=sum(values) / len(values) if values else None,
                min=min(values, default=None), max=max(values, default=None), values=values)


def table(header, rows):
    """A Markdown table (printed and written to table.md)."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
