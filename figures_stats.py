"""figures.py's numbers: mean and range over seeds, the speed-up factor, the Markdown table.

**Seeds.** Baselines, schedules and ``auto`` run with every seed of ``--seeds`` (default
0,1,2); the constant strategies with the first ``--constant-seeds`` of them (default 1).
Tables give mean and range (min–max) over seeds; the curves are drawn as the mean with the
range as a band.

**Speed-up factor (Fig. 1).** The baseline of seed s spends budget B and ends at k-NN
accuracy a*. The accelerated run of seed s is evaluated every 10 % of the same budget; the
budget at which its k-NN curve (linear between evaluations) first reaches a* is b, and the
speed-up is B / b, counted in units (forward passes; compress.py) and, from the same curves
in training seconds (evaluation time excluded), in wall-clock time. Computed per seed, then
reported as mean and range; a run that never reaches a* has no factor (counted as such).
The curves' k-NN uses ``--knn-bank`` training images (all of them on the embedded set); the
final NN / LP columns are eval.py's, against the whole training set.
"""


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


def spread(values, digits=1):
    """'mean (min–max)' over seeds; values that are None (never reached) are left out and
    counted: '3.1 (2.8–3.5), 1 of 3 not reached'. One value prints alone."""
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    if not got:
        return "not reached" if values else "–"
    mean = sum(got) / len(got)
    text = f"{mean:.{digits}f}" if len(got) == 1 else \
        f"{mean:.{digits}f} ({min(got):.{digits}f}–{max(got):.{digits}f})"
    return text + (f", {missing} of {len(values)} not reached" if missing else "")


def summary(values):
    """mean, min, max and the values (None left out of the first three) for results.json."""
    got = [v for v in values if v is not None]
    return dict(mean=sum(got) / len(got) if got else None, min=min(got, default=None),
                max=max(got, default=None), values=values)


def table(header, rows):
    """A Markdown table (printed and written to table.md)."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
