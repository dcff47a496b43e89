"""Everything that changes with training progress: rates, momenta, temperatures, stages.

Concern: the functions of **progress** t = budget spent / budget ∈ [0, 1] (paper §5–6.3).
Counting in progress rather than steps matters here: a compressed step is cheaper, so an
accelerated run takes more steps for the same budget, and a schedule in steps would end too
early or too late.

* **Learning rate** (§6.3, Fig. 6): linear warm-up over the first ``warmup`` of progress,
  then cosine decay  lr·½(1 + cos(π·s))  or polynomial decay  lr·(1 − s^α)  with α = 2,
  where s is the progress after warm-up rescaled to [0, 1]. The polynomial schedule keeps
  the rate higher than cosine throughout (at s = ½: 0.75 of the peak against 0.5) and drops
  it late, the shape of the paper's Fig. 6, made for tight budgets. ((1 − s)^α, the other
  reading of "polynomial decay", lies below cosine everywhere: the opposite of that figure.)
* **Weight decay** (DINO): a half cosine from its start to its end value (``cosine_between``).
* **EMA momentum** of MoCo-v3's momentum encoder and DINO's teacher, raised to 1 on a half
  cosine; **DINO's teacher temperature**, warmed up linearly, then constant.
* **Stage schedule** (§5): a list of (start, strategy) pairs; the strategy in force at
  progress t is that of the last stage with start ≤ t. Written as JSON::

      {"stages": [{"start": 0.0,  "strategy": "q:drop=0.9"},
                  {"start": 0.5,  "strategy": "q:drop=0.75"},
                  {"start": 0.75, "strategy": "none"}]}

  ``build`` makes one from gradient-error probes at several stages (probe.py): the argmin
  CA-MSE of each stage.

CLI::

    python schedule.py build probe_0.json probe_25.json probe_50.json probe_75.json --out sched.json
    python schedule.py lr --out lr.png                     # cosine vs polynomial (Fig. 6)

Usage::

    from schedule import learning_rate, StageSchedule
    learning_rate(0.5, base_lr=1e-3, warmup=0.1, kind="poly")    # 1e-3 · (1 − 0.444²)
    sched = StageSchedule.parse("q:drop=0.75")                     # a constant strategy
    sched.at(0.3)                                                   # Strategy(q=drop 0.75)
"""
import argparse
import itertools
import json
import math
import os

from compress import NONE, Strategy, ViewCompression
from plots import plot_lr, save_heatmaps  # Figs. 4 and 6

LR_SCHEDULES = ("cosine", "poly")


# ====================================================================== learning rate
def learning_rate(progress, base_lr, warmup=0.05, kind="cosine", alpha=2.0, final_lr=0.0):
    """The learning rate at ``progress`` ∈ [0, 1] (see the module docstring)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")
    t = min(max(progress, 0.0), 1.0)
    if warmup > 0 and t < warmup:
        return base_lr * t / warmup                              # linear warm-up from 0
    s = (t - warmup) / (1.0 - warmup) if warmup < 1 else 1.0     # decay phase in [0, 1]
    if kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * s))            # ½(1 + cos πs)
    else:
        factor = 1.0 - s ** alpha                                # 1 − s^α
    return final_lr + (base_lr - final_lr) * factor


def cosine_between(progress, start, end):
    """start at progress 0 to end at 1 on a half cosine: end + (start − end)·½(1 + cos πt).
    DINO's weight decay (0.04 → 0.4) and its cosine_scheduler in general."""
    t = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


# ================================================================ momentum, temperature
def momentum_schedule(progress, base=0.99):
    """EMA momentum m = 1 − (1 − base)·(cos(π·progress) + 1)/2: base at the start, 1 at the end
    (MoCo-v3, BYOL and DINO: the target slows down as training converges)."""
    progress = min(max(progress, 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def teacher_temperature(progress, warmup_temp=0.04, final_temp=0.04, warmup_frac=0.0):
    """DINO's τ_t: linear from warmup_temp to final_temp over the first warmup_frac of the
    budget, then constant. The official defaults are a constant 0.04 (warm-up 0); its ViT-S
    recipe warms 0.04 → 0.07 over the first 30 of 100 epochs (warmup_frac 0.3). DINO's help
    text warns that above 0.07 training is unstable; a lower τ_t sharpens the targets."""
    progress = min(max(progress, 0.0), 1.0)     # the last step may overshoot the budget a little
    if progress >= warmup_frac:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * progress / warmup_frac


# ===================================================================== stage schedule
class StageSchedule:
    """Strategies by progress: ``stages`` is a list of (start, Strategy), starts increasing from 0."""

    def __init__(self, stages):
        stages = [(float(s), st) for s, st in stages]
        if not stages or stages[0][0] != 0.0:
            raise ValueError(f"the first stage must start at 0, got starts {[s for s, _ in stages]}")
        starts = [s for s, _ in stages]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1.0:
            raise ValueError(f"stage starts {starts} must increase strictly and lie in [0, 1)")
        self.stages = stages

    def at(self, progress):
        return self.stages[self.index(progress)][1]

    def index(self, progress):
        """Which stage is in force at ``progress``: the last one with start ≤ progress."""
        return max(i for i, (s, _) in enumerate(self.stages) if s <= max(progress, 0.0))

    def __str__(self):
        return " → ".join(f"{s:.0%}: {st}" for s, st in self.stages)

    def to_json(self):
        return {"stages": [{"start": s, "strategy": str(st)} for s, st in self.stages]}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def from_json(cls, obj, source="schedule"):
        """Build from the JSON form; every error names the field that is wrong."""
        if not isinstance(obj, dict) or "stages" not in obj:
            raise ValueError(f"{source}: expected an object with a 'stages' list, got "
                             f"{type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
        if not isinstance(obj["stages"], list) or not obj["stages"]:
            raise ValueError(f"{source}: 'stages' must be a non-empty list")
        stages = []
        for i, st in enumerate(obj["stages"]):
            if not isinstance(st, dict):
                raise ValueError(f"{source}: stages[{i}] must be an object with 'start' and 'strategy'")
            for field in ("start", "strategy"):
                if field not in st:
                    raise ValueError(f"{source}: stages[{i}] has no '{field}' field")
            start = st["start"]
            if not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
                raise ValueError(f"{source}: stages[{i}].start = {start!r} must be a number in [0, 1)")
            try:
                strategy = Strategy.parse(st["strategy"])
            except ValueError as e:
                raise ValueError(f"{source}: stages[{i}].strategy: {e}") from None
            stages.append((start, strategy))
        try:
            return cls(stages)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(obj, source=path)

    @classmethod
    def parse(cls, text):
        """``--accel``: 'none', a strategy string, or the path of a schedule JSON file."""
        if text.endswith(".json") or os.path.isfile(text):
            if not os.path.isfile(text):
                raise ValueError(f"--accel {text!r}: no such schedule file")
            return cls.load(text)
        return cls([(0.0, Strategy.parse(text))])


def parse_grid(text, base_patch):
    """'drop=0,0.5,0.9 patch=16,32 roles=paper,q views=2,4' → list of Strategies (the product).

    Fields are separated by spaces and their values by commas; a grid may be a union of such
    products, separated by ';' (as ';' separates the parts of a strategy): 'drop=0.5,0.75;
    patch=32' is drop 0.5 and 0.75 at the base patch, then patch 32 at drop 0. A field left
    out takes its base value (drop 0, the base patch, roles paper, views unset).
    roles: "paper" (default) — token dropout on the query only (asymmetric), patch scaling on
    both roles (symmetric), as in the paper; "q" — both on the query only; "qk" — both on both.
    views: views per sample, integers ≥ 2 (DINO: 2 global + M − 2 local crops); not given, the
    strategies leave it unset, i.e. the run's own number of views. The probe (probe.py),
    --accel auto and bench.py read grids in this form.
    """
    out = []
    for group in filter(None, (g.strip() for g in text.split(";"))):
        for s in _grid_product(group, text, base_patch):
            if s not in out:
                out.append(s)
    if not out:
        raise ValueError(f"empty grid {text!r}: expected e.g. 'drop=0,0.5 patch=16,32'")
    return out


def _grid_product(group, text, base_patch):
    fields = {"drop": [0.0], "patch": [base_patch], "roles": ["paper"], "views": [None]}
    for part in group.split():
        key, eq, values = part.partition("=")
        if key not in fields or not eq or not values:
            raise ValueError(f"bad grid field {part!r} in {text!r}: expected drop=…, patch=…, "
                             "roles=… or views=… with comma-separated values")
        items = [v for v in values.split(",") if v]
        try:
            fields[key] = ([float(v) for v in items] if key == "drop" else
                           [int(v) for v in items] if key in ("patch", "views") else items)
        except ValueError:
            raise ValueError(f"grid field {key}: {values!r} is not a list of "
                             f"{'numbers' if key == 'drop' else 'integers'}") from None
    for d in fields["drop"]:
        if not 0.0 <= d < 1.0:
            raise ValueError(f"grid field drop: {d} must be in [0, 1)")
    for p in fields["patch"]:
        if p < 1:
            raise ValueError(f"grid field patch: {p} must be ≥ 1")
    for r in fields["roles"]:
        if r not in ("paper", "q", "qk"):
            raise ValueError(f"grid field roles: {r!r}; allowed: paper, q, qk")
    for m in fields["views"]:
        if m is not None and m < 2:
            raise ValueError(f"grid field views: {m} must be an integer ≥ 2")
    for drop, patch, roles, views in itertools.product(fields["drop"], fields["patch"],
                                                       fields["roles"], fields["views"]):
        p = None if patch == base_patch else patch
        q = ViewCompression(drop, p)
        k = ViewCompression(drop if roles == "qk" else 0.0, p if roles in ("paper", "qk") else None)
        yield Strategy(q, k, views)


# ================================================================= schedules from probes
def best_strategy(result, tolerance=1.0):
    """The strategy of least CA-MSE in one probe's result (probe.py): the paper's rule. With
    ``tolerance`` τ > 1, the cheapest strategy whose CA-MSE is at most τ times the least — a
    near-tie broken towards the fewer units per sample (--auto-tolerance)."""
    best = min(result["rows"], key=lambda r: r["ca_mse"])
    if tolerance <= 1:
        return best["strategy"]
    near = [r for r in result["rows"] if r["ca_mse"] <= tolerance * best["ca_mse"]] or [best]
    return min(near, key=lambda r: (r["units"], r["ca_mse"]))["strategy"]


def build_schedule(results):
    """Stage schedule from probes at several progress points: argmin CA-MSE for each stage."""
    results = sorted(results, key=lambda r: r["progress"])
    stages = [(0.0 if i == 0 else r["progress"], Strategy.parse(best_strategy(r)))
              for i, r in enumerate(results)]
    merged = [stages[0]]                       # consecutive stages with one strategy: one stage
    for start, s in stages[1:]:
        if s != merged[-1][1]:
            merged.append((start, s))
    return StageSchedule(merged)


def auto_schedule(chosen):
    """--accel auto's schedule so far, from its probes' choices (train.py keeps them in the
    checkpoint's state): uncompressed until the first probe, then each probe's choice from its
    --auto-at point on."""
    stages = [(0.0, NONE)]
    for c in chosen:
        stage = (c["start"], Strategy.parse(c["strategy"]))
        stages[-1:] = [stages[-1], stage] if c["start"] > 0 else [stage]
    return StageSchedule(stages)


# ================================================================================ CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description="Stage schedules from probes (paper §5) and the "
                                 "learning-rate schedules (Fig. 6).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="stage schedule = argmin CA-MSE of each probe")
    b.add_argument("probes", nargs="+", help="probe JSON files (probe.py), one per stage")
    b.add_argument("--out", required=True)
    b.add_argument("--png", default=None, help="heatmaps of every stage in one figure (needs "
                   "matplotlib); default: the --out path with .png")
    lr = sub.add_parser("lr", help="cosine vs polynomial learning rate (Fig. 6)")
    lr.add_argument("--warmup", type=float, default=0.05)
    lr.add_argument("--out", default=None, help="PNG path (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        results = []
        for path in args.probes:
            try:
                with open(path) as f:
                    r = json.load(f)
                r["rows"], r["progress"]                       # noqa: B018  (fields it needs)
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                ap.error(f"{path}: not a probe result ({type(e).__name__}: {e})")
            results.append(r)
        sched = build_schedule(results)
        sched.save(args.out)
        print(f"schedule: {sched} → {args.out}")
        png = args.png or os.path.splitext(args.out)[0] + ".png"
        if save_heatmaps(results, png):
            print(f"heatmaps → {png}")
    else:
        ts = [i / 100 for i in range(101)]
        print("progress  cosine    poly(α=2)")
        for t in ts[::10]:
            print(f"{t:8.2f}  {learning_rate(t, 1, args.warmup):.4f}    "
                  f"{learning_rate(t, 1, args.warmup, 'poly'):.4f}")
        if args.out:
            plot_lr(args.out, ts, {kind: [learning_rate(t, 1, args.warmup, kind) for t in ts]
                                   for kind in LR_SCHEDULES})


if __name__ == "__main__":
    main()
