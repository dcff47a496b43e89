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

* **Gradient-error analysis** (§5, Fig. 4) — the paper's central tool. A compressed step
  estimates the gradient of the *uncompressed* objective; how well, per unit of compute?
  At a checkpoint θ and batch size b (the run's global batch; under torchrun each rank
  computes its share and the gradients are averaged over ranks):

      g*      = mean of K_ref uncompressed mini-batch gradients    (the reference)
      σ_0²    = Σ_i ‖g_i − g*‖² / (K_ref − 1)                      (its per-batch variance)
      ‖g‖²    = ‖g*‖² − σ_0²/K_ref                 (the true squared norm, unbiased:
                                                   E‖g*‖² = ‖g‖² + σ_0²/K_ref)
      ḡ_s     = mean of K mini-batch gradients under strategy s    (fresh views, fresh dropout)
      σ_s²    = Σ_k ‖g_{s,k} − ḡ_s‖² / (K − 1)                     (per-batch variance)
      bias²   = ‖ḡ_s − g*‖² − σ_s²/K − σ_0²/K_ref  (finite-sample corrected; kept as
                                                   bias2_raw, may be < 0; bias2 clips at 0)
      CA-var  = σ_s² · c_s / c_0      (for a fixed budget, s affords c_0/c_s times more samples)
      CA-MSE  = bias² + CA-var,       all three reported relative to ‖g‖².

  An estimate of ‖g‖² near or below 0 means the reference is mostly noise (raise K_ref or
  b); below SIGNAL_FLOOR·‖g*‖² it is clipped there and the result says so
  (``ref_norm2_clipped``): the relative figures are then too small, though their order,
  hence the argmin, is unchanged.

  Early in training, gradients are large and noisy: the variance term dominates and cheap,
  aggressive compression wins. As training converges, the bias of a compressed gradient
  becomes the larger error and milder compression wins. ``build`` turns probes at several
  stages into a stage schedule by argmin CA-MSE. A strategy may also set ``views`` (more,
  cheaper views per sample; ``probe`` says what its bias then means), and
  ``plots.save_heatmaps`` draws the three terms over drop × patch per stage, as the paper's
  Fig. 4.

CLI::

    python schedule.py probe --ckpt runs/simclr/ckpt_25.pt --grid "drop=0,0.5,0.75 patch=4,6,8" \
                             --out probe_25.json          # + probe_25.png heatmaps (Fig. 4)
    python schedule.py probe --ckpt runs/simclr/ckpt_25.pt --grid "drop=0,0.75 views=2,4"
    python schedule.py build probe_0.json probe_25.json probe_50.json probe_75.json --out sched.json
    python schedule.py lr --out lr.png                     # cosine vs polynomial (Fig. 6)

Usage::

    from schedule import learning_rate, StageSchedule
    learning_rate(0.5, base_lr=1e-3, warmup=0.1, kind="poly")    # 1e-3 · (1 − 0.444)²
    sched = StageSchedule.parse("q:drop=0.75")                     # a constant strategy
    sched.at(0.3)                                                   # Strategy(q=drop 0.75)
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time

import torch

from compress import NONE, CostModel, Strategy, ViewCompression
from distributed import all_reduce_mean, rank_world
from plots import plot_lr, save_heatmaps  # Figs. 4 and 6 (schedule.save_heatmaps, as before)

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


def cosine_between(progress, start, end):
    """start at progress 0 to end at 1 on a half cosine: end + (start − end)·½(1 + cos πt).
    DINO's weight decay (0.04 → 0.4) and its cosine_scheduler in general."""
    t = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


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


# ============================================================ gradient-error analysis
def parse_grid(text, base_patch):
    """'drop=0,0.5,0.9 patch=16,32 roles=paper,q views=2,4' → list of Strategies (the product).

    roles: "paper" (default) — token dropout on the query only (asymmetric), patch scaling on
    both roles (symmetric), as in the paper; "q" — both on the query only; "qk" — both on both.
    views: views per sample, integers ≥ 2 (DINO: 2 global + M − 2 local crops); not given, the
    strategies leave it unset, i.e. the run's own number of views.
    """
    fields = {"drop": [0.0], "patch": [base_patch], "roles": ["paper"], "views": [None]}
    for part in text.split():
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
    out = []
    for drop, patch, roles, views in itertools.product(fields["drop"], fields["patch"],
                                                       fields["roles"], fields["views"]):
        p = None if patch == base_patch else patch
        q = ViewCompression(drop, p)
        k = ViewCompression(drop if roles == "qk" else 0.0, p if roles in ("paper", "qk") else None)
        s = Strategy(q, k, views)
        if s not in out:
            out.append(s)
    return out


class RunningGradientStats:
    """Mean and total variance of a stream of gradient vectors, one vector in memory.

    Welford's update, summed over coordinates: with δ = g_k − mean_{k−1},
    mean_k = mean_{k−1} + δ/k and M2 += ⟨δ, g_k − mean_k⟩, so that M2 = Σ_k ‖g_k − ḡ‖² at the
    end without storing the K gradients (float64: the variance can be tiny next to ‖ḡ‖²).
    """

    def __init__(self):
        self.k, self.mean, self.m2 = 0, None, 0.0

    def add(self, g):
        g = g.double()
        self.k += 1
        if self.mean is None:
            self.mean = g.clone()
            return
        delta = g - self.mean
        self.mean += delta / self.k
        self.m2 += float(delta @ (g - self.mean))

    @property
    def variance(self):
        """σ² = Σ_k ‖g_k − ḡ‖² / (K − 1), the per-batch variance (trace of the covariance)."""
        return self.m2 / (self.k - 1)


SIGNAL_FLOOR = 0.1          # ‖g‖² is clipped at this fraction of ‖g*‖² (module docstring)


def signal_norm2(ref_mean, ref_var, k_ref):
    """(‖g‖², clipped): the squared norm of the true gradient, without the reference's noise.

    g* is a mean of K_ref gradients of variance σ_0², so E‖g*‖² = ‖g‖² + σ_0²/K_ref and
    ‖g*‖² − σ_0²/K_ref is unbiased. When the noise swamps the signal the difference can fall
    to 0 or below; it is then clipped at SIGNAL_FLOOR·‖g*‖² and ``clipped`` is True.
    """
    ref2 = float(ref_mean @ ref_mean)
    signal2 = ref2 - ref_var / k_ref
    if signal2 <= SIGNAL_FLOOR * ref2:
        return SIGNAL_FLOOR * ref2, True
    return signal2, False


def error_terms(mean_s, var_s, k, ref_mean, ref_var, k_ref, cost_ratio):
    """bias², cost-adjusted variance and CA-MSE, relative to ‖g‖² (see the module docstring).

    bias2_raw is the unbiased estimate, which noise can make negative; bias2 (and CA-MSE)
    clip it at 0."""
    signal2, _ = signal_norm2(ref_mean, ref_var, k_ref)
    diff = mean_s - ref_mean
    # E‖ḡ_s − g*‖² = bias² + σ_s²/K + σ_0²/K_ref for independent estimates: subtract the noise.
    bias2_raw = float(diff @ diff) - var_s / k - ref_var / k_ref
    bias2 = max(bias2_raw, 0.0)
    ca_var = var_s * cost_ratio
    return dict(bias2=bias2 / signal2, bias2_raw=bias2_raw / signal2, ca_var=ca_var / signal2,
                ca_mse=(bias2 + ca_var) / signal2, var=var_s / signal2)


def probe(method, view_set, strategies, method_name, cost, progress=0.0, batches=8,
          ref_batches=8, batch_size=64, seed=0, local_crops=0, local_size=None, views=None):
    """Gradient-error analysis of ``strategies`` at the current weights of ``method``.

    view_set: a data.ViewDataset (its epochs are used as fresh-augmentation draws: the
    reference uses epochs 1_000_000 + i, strategy batch k uses 2_000_000 + k, so the
    reference is independent of the estimates, and all strategies share their K batches —
    common random numbers make the comparison between strategies less noisy).

    views: the run's own number of views M_0 (DINO: 2 + local crops); None = 2 + local_crops
    for DINO, else as many as the view set's recipes. The reference g* is the UNCOMPRESSED
    gradient at M_0 views, and so is every strategy that leaves ``views`` unset. A strategy
    with views = M needs batches of M views: build the view set with the most views of the
    grid (data.build_views(method, img_size, views=max_views), DINO: more local crops) and
    every step keeps the first M of them (losses.use_views), so all strategies still share
    their batches. Its cost c_s is charged for M views.

    What bias² means with more views: g* is the gradient of the M_0-view objective, and an
    M-view step estimates a slightly different one (SimCLR's multi-positive NT-Xent and the
    multi-view loss change with M; MoCo and DINO average over other pairs of crops). Its bias²
    therefore mixes compression error with that change of objective, and is not zero even
    uncompressed. The second paper argues the M-view objective is the better estimate of the
    ideal (augmentation-kernel) loss, so this part of the "bias" may point towards a better
    target; the probe cannot tell the two apart. Read it as the distance from the run's own
    gradient. Its variance term is what more views buy: less noise per sample, at M/M_0 the cost.

    Under torchrun every rank calls this in lockstep with the same ``seed`` and its own
    share ``batch_size``: the ranks draw the indices of ONE global batch of world·batch_size
    images from that seed, each takes its slice, and every gradient is averaged over ranks,
    so the probe measures the gradient (and the variance) of the global batch, as one process
    on the concatenated batch would. Token dropout draws per rank (seeded seed + rank).
    ``units_spent`` is this rank's share.

    Weights and buffers (BatchNorm statistics, DINO centre) are restored afterwards and the
    global RNG is left untouched. Returns a dict with one row per strategy.
    """
    have = len(view_set.recipes)
    if views is None:
        views = 2 + local_crops if method_name == "dino" else have
    run = dataclasses.replace(NONE, views=views)
    # A strategy without views is run (and charged) at the run's own number of views.
    resolved = [s if s.views is not None else dataclasses.replace(s, views=views)
                for s in strategies]
    most = max([views] + [s.views for s in resolved])
    if most > have:
        raise ValueError(f"a strategy (or the run) needs {most} views but the view set makes "
                         f"{have}; build its recipes with views={most}"
                         + (f" (local_crops={most - 2})" if method_name == "dino" else ""))
    params = [p for p in method.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in method.named_buffers()}       # BN statistics, DINO centre
    device = params[0].device
    was_training = method.training
    method.train()
    rank, world = rank_world()
    g = torch.Generator().manual_seed(seed)            # the same stream on every rank
    batch = lambda epoch: _probe_batch(view_set, epoch, g, batch_size, device)   # noqa: E731
    grad = lambda views, s: _flat_gradient(method, params, buffers, views, s, progress)  # noqa: E731

    t0 = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank)                                  # dropout subsets
        ref = RunningGradientStats()
        for i in range(ref_batches):
            ref.add(grad(batch(1_000_000 + i), run))
        stats = [RunningGradientStats() for _ in strategies]
        for k in range(batches):
            batch_views = batch(2_000_000 + k)
            for s, st in zip(resolved, stats):
                st.add(grad(batch_views, s))
    method.zero_grad(set_to_none=True)
    method.train(was_training)
    # c_s / c_0 with every view charged (strategy.views also sets DINO's local crops to M − 2)
    price = dict(local_crops=local_crops, local_size=local_size,
                 symmetric=getattr(method, "symmetric", True))
    c0 = cost.sample_units(method_name, run, **price)
    rows = []
    for s, r, st in zip(strategies, resolved, stats):
        cs = cost.sample_units(method_name, r, **price)
        rows.append(dict(strategy=str(s), drop=s.q.drop, patch=s.q.patch_size, views=r.views,
                         units=cs, **error_terms(st.mean, st.variance, batches, ref.mean,
                                                 ref.variance, ref_batches, cs / c0)))
    # What the probe itself cost, in units: every gradient is a training step's forward+backward.
    spent = batch_size * (ref_batches * c0 + batches * sum(r["units"] for r in rows))
    signal2, clipped = signal_norm2(ref.mean, ref.variance, ref_batches)
    return dict(progress=progress, batch_size=batch_size, world=world, batches=batches,
                ref_batches=ref_batches, views=views,
                base_patch=getattr(cost.model, "patch_size", None),
                ref_norm2=float(ref.mean @ ref.mean), ref_norm2_corrected=signal2,
                ref_norm2_clipped=clipped, ref_var=ref.variance, units_spent=spent,
                seconds=time.time() - t0, rows=rows)


def _probe_batch(view_set, epoch, g, batch_size, device):
    """This rank's share of one global batch drawn from g (the same stream on every rank), its
    views made at ``epoch`` (a fresh augmentation draw): views × (b, 3, s, s)."""
    rank, world = rank_world()
    view_set.set_epoch(epoch)
    everyone = torch.randint(len(view_set), (world * batch_size,), generator=g)
    idx = everyone[rank * batch_size:(rank + 1) * batch_size].tolist()   # this rank's share
    fetch = getattr(view_set, "__getitems__", None)                   # batched augmentation
    items = [v for v, _ in fetch(idx)] if fetch else [view_set[i][0] for i in idx]
    return [torch.stack(v).to(device) for v in zip(*items)]


def _flat_gradient(method, params, buffers, views, strategy, progress):
    """The gradient of one step's loss as one vector, buffers restored afterwards. The losses
    gather across ranks, so the mean of the ranks' gradients is the gradient of the global
    batch (what DDP hands the optimiser); one rank's alone is not."""
    method.zero_grad(set_to_none=True)
    loss, _ = method(views, strategy, progress)                       # keeps strategy.views
    loss.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    method.load_state_dict(buffers, strict=False)                     # undo BN / centre updates
    return all_reduce_mean(grad) if rank_world()[1] > 1 else grad


def best_strategy(result):
    return min(result["rows"], key=lambda r: r["ca_mse"])["strategy"]


def print_table(result, out=sys.stdout):
    world = result.get("world", 1)
    signal = (f"‖g‖² = {result['ref_norm2_corrected']:.3e}"
              + (" (clipped: the reference is mostly noise)" if result["ref_norm2_clipped"] else "")
              if "ref_norm2_corrected" in result else "")
    print(f"progress {result['progress']:.0%} | batch {result['batch_size']}"
          f"{f' × {world} processes' if world > 1 else ''} | K={result['batches']} "
          f"K_ref={result['ref_batches']} | reference: {result.get('views') or '?'} views | "
          f"‖g*‖² = {result['ref_norm2']:.3e}{', ' + signal if signal else ''} | "
          f"{result['seconds']:.0f} s, {result['units_spent']:,.0f} units", file=out)
    w = max([28] + [len(r["strategy"]) for r in result["rows"]])
    print(f"{'strategy':<{w}} {'views':>5} {'units':>6} {'bias²':>9} {'CA-var':>9} {'CA-MSE':>9}",
          file=out)
    for r in sorted(result["rows"], key=lambda r: r["ca_mse"]):
        print(f"{r['strategy']:<{w}} {r.get('views') or '-':>5} {r['units']:6.2f} "
              f"{r['bias2']:9.4f} {r['ca_var']:9.4f} {r['ca_mse']:9.4f}", file=out)


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


def _png_path(png, out):
    """--png, else the --out path with .png, else nothing."""
    return png or (os.path.splitext(out)[0] + ".png" if out else None)


# ================================================================================ CLI
def _probe_checkpoint(args):
    import data
    import losses
    import vit
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: --ckpt {args.ckpt}: no such checkpoint")
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    if "method" not in ckpt or "vit_config" not in ckpt:
        raise SystemExit(f"error: {args.ckpt} is not a train.py checkpoint (no 'method'/'vit_config')")
    targs = ckpt["args"]
    backbone = vit.ViT(**ckpt["vit_config"])
    if targs.get("stop_grad_conv1"):          # a frozen patch projection takes no gradient
        backbone.freeze_patch_embed()
    method = losses.build_method(targs["method"], backbone, **ckpt["method_kwargs"])
    method.load_state_dict(ckpt["method"])
    try:
        strategies = parse_grid(args.grid, backbone.patch_size)
    except ValueError as e:
        raise SystemExit(f"error: --grid: {e}")
    name = targs["method"]
    local = targs.get("local_crops", 0) if name == "dino" else 0
    run_views = 2 + local if name == "dino" else targs.get("views") or 2   # the reference's
    most = max([run_views] + [s.views for s in strategies if s.views is not None])
    base = data.build_dataset(targs["data"], targs.get("data_root"), "train", backbone.img_size,
                              seed=targs["seed"], size=targs.get("data_size"))
    # Batches with the most views of the grid; each strategy keeps the first M (use_views).
    if name == "dino":
        # The run's own global crops (their scale depends on whether the run had local
        # crops), then as many local crops as the largest views of the grid needs.
        recipes = (data.build_views(name, backbone.img_size, local_crops=local,
                                    **data.recipe_settings(targs))[:2]
                   + data.build_views(name, backbone.img_size, local_crops=most - 2,
                                      **data.recipe_settings(targs))[2:])
    else:
        recipes = data.build_views(name, backbone.img_size, views=most,
                                   **data.recipe_settings(targs))
    cost = CostModel(backbone, targs.get("cost", "flops"), heads=method.cost_heads())
    progress = ckpt["state"]["spent"] / targs["budget"]
    # The run's own (global) batch unless told otherwise: the variance term scales with 1/b,
    # so a probe at another batch would weigh bias against variance for another run.
    batch_size = targs["batch_size"] if args.batch_size is None else args.batch_size
    result = probe(method, data.ViewDataset(base, recipes, seed=targs["seed"]), strategies,
                   name, cost, progress, args.batches, args.ref_batches, batch_size,
                   args.seed, local, recipes[-1].size if name == "dino" and most > 2 else None,
                   views=run_views)
    result["ckpt"] = args.ckpt
    print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    png = _png_path(args.png, args.out)
    if png and save_heatmaps([result], png):
        print(f"heatmaps → {png}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="Gradient-error analysis and stage schedules (paper §5).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="bias², cost-adjusted variance and CA-MSE at a checkpoint")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint, e.g. runs/simclr/ckpt_25.pt")
    p.add_argument("--grid", default="drop=0,0.25,0.5,0.75 patch=4,6,8",
                   help="strategies: drop=…, patch=…, roles=paper|q|qk, views=2,4 (product of "
                        "the lists; views unset = the run's own)")
    p.add_argument("--batches", type=int, default=8, help="K gradients per strategy")
    p.add_argument("--ref-batches", type=int, default=8, help="K_ref uncompressed gradients for g*")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per gradient; default: the checkpoint's run's (global) batch, "
                        "since the variance term scales with 1/b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.add_argument("--png", default=None, help="heatmaps of CA-MSE, bias², CA-var (Fig. 4; needs "
                   "matplotlib); default: the --out path with .png")
    b = sub.add_parser("build", help="stage schedule = argmin CA-MSE of each probe")
    b.add_argument("probes", nargs="+", help="probe JSON files, one per stage")
    b.add_argument("--out", required=True)
    b.add_argument("--png", default=None, help="heatmaps of every stage in one figure (needs "
                   "matplotlib); default: the --out path with .png")
    lr = sub.add_parser("lr", help="cosine vs polynomial learning rate (Fig. 6)")
    lr.add_argument("--warmup", type=float, default=0.05)
    lr.add_argument("--out", default=None, help="PNG path (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        if args.batches < 2 or args.ref_batches < 2:
            ap.error("--batches and --ref-batches must be ≥ 2 (a variance needs two samples)")
        if args.batch_size is not None and args.batch_size < 2:
            ap.error(f"--batch-size {args.batch_size} must be ≥ 2 (contrastive losses need "
                     "negatives)")
        _probe_checkpoint(args)
    elif args.cmd == "build":
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
        png = _png_path(args.png, args.out)
        if png and save_heatmaps(results, png):
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
