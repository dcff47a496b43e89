"""Schedules over training progress: learning rate and the acceleration stage schedule.

Concern: everything that changes with **progress** t = budget spent / budget ∈ [0, 1]
(paper §5–6.3). Counting in progress rather than steps matters here: a compressed step is
cheaper, so an accelerated run takes more steps for the same budget, and a schedule in
steps would end too early or too late.

* **Learning rate** (§6.3, Fig. 6): linear warm-up over the first ``warmup`` of progress,
  then cosine decay  lr·½(1 + cos(π·s))  or polynomial decay  lr·(1 − s)^α  with α = 2,
  where s is the progress after warm-up rescaled to [0, 1]. Under a tight budget the
  polynomial schedule keeps the rate high for longer.
* **Stage schedule** (§5): a list of (start, strategy) pairs; the strategy in force at
  progress t is that of the last stage with start ≤ t. Written as JSON::

      {"stages": [{"start": 0.0,  "strategy": "q:drop=0.9"},
                  {"start": 0.5,  "strategy": "q:drop=0.75"},
                  {"start": 0.75, "strategy": "none"}]}

Usage::

    from schedule import learning_rate, StageSchedule
    learning_rate(0.5, base_lr=1e-3, warmup=0.1, kind="poly")    # 1e-3 · (1 − 0.444)²
    sched = StageSchedule.parse("q:drop=0.75")                     # a constant strategy
    sched.at(0.3)                                                   # Strategy(q=drop 0.75)
"""
import json
import math
import os

from compress import Strategy

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
        factor = (1.0 - s) ** alpha                              # (1 − s)^α
    return final_lr + (base_lr - final_lr) * factor


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
