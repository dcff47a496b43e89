"""Sequence compression strategies and the sample-cost model (paper §4, Fig. 3).

Concern: *what* each view of a training sample is compressed to, and *what that costs*.

* A ViT's cost grows with its sequence length L, so shortening the sequence makes a
  gradient step cheaper. Two ways, both applied by vit.py at encode time:
  **token dropout** (keep round((1−drop)·N) random patch tokens; ``vit.token_dropout``)
  and **patch scaling** (same image, patch size p > p0, so N = (img/p)² tokens).
* A **Strategy** says, for each *view role*, which of the two to apply. Role ``q`` is the
  online / student / first view; role ``k`` the momentum / teacher / second view. The
  paper's "asymmetric token dropout" compresses only q; "symmetric patch scaling" scales
  both. CLI form, roles separated by ';', settings by ',':

      "none"                            the uncompressed baseline
      "q:drop=0.75"                     drop 75 % of the query view's tokens, key untouched
      "q:drop=0.5,patch=24;k:patch=24"  both roles at patch 24, the query also drops half
      "qk:patch=32"                     both roles at patch 32 (a role list shares settings)
      "q:drop=0.5;views=4"              4 views per sample (DINO: 2 global + 2 local crops)
      "views=4"                         4 uncompressed views

  ``views`` (an integer ≥ 2; unset = the run's own number of views) is a third dimension of
  the trade-off (second paper, arXiv 2312.10725): more, cheaper views per sample.

* **Cost model.** Forward FLOPs of one block on L tokens of width D (MLP ratio 4):
  qkv 6LD² + attention 4L²D + projection 2LD² + MLP 16LD² = 24LD² + 4L²D, times depth,
  plus the patch embedding 2·N·(3p²)·D. One **unit** is one forward pass of the
  uncompressed base backbone on one image (heads not included). A view costs

      units(view) = (f(L_view) + h) / f(L_base) × (3 with gradient, 1 without)

  where 3 is forward + backward ≈ 3 forwards, 1 a pass through a momentum / teacher
  encoder, and h the forward FLOPs of the head that follows the backbone on that branch
  (2·in·out per nn.Linear, one sample: a head sees the class token only, so h does not
  shrink with compression). ``heads=(online, target)`` gives the two heads; without them
  h = 0. On ViT-S/B the heads are under 1 % of a view; on the narrow CPU preset they are not,
  and leaving them out overstates the saving of aggressive compression.
  ``--budget`` in train.py is counted in these units. The ``measured`` mode replaces
  f(L) + h by timed forward passes of the actual model and head.

Usage::

    from compress import Strategy, CostModel
    import vit
    s = Strategy.parse("q:drop=0.75")
    cost = CostModel(vit.build_vit("base"))
    cost.sample_units("moco", s.resolve(2))   # 3·f(0.25 N)/f(N) + 1 ≈ 1.66 (symmetric: ×2)
    # with the method's heads: CostModel(backbone, heads=method.cost_heads())

``python compress.py`` prints the paper's Fig. 3 grid (drop 0–0.9 × patch 16–48), backbone
only; ``python figures.py cost --method M`` adds the method's heads and timed passes.
"""
import argparse
import dataclasses
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import rank_world
import vit
from vit import kept_tokens


# =========================================================================== strategy
@dataclasses.dataclass(frozen=True)
class ViewCompression:
    """How one view role is compressed: token drop rate and patch size (None = base)."""
    drop: float = 0.0
    patch_size: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop {self.drop} must be in [0, 1)")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch {self.patch_size} must be a positive integer")

    def __str__(self):
        # repr of the float: the shortest text that parses back to the same value
        parts = [f"drop={float(self.drop)!r}"] if self.drop else []
        parts += [f"patch={self.patch_size}"] if self.patch_size is not None else []
        return ",".join(parts)


ROLES = ("q", "k")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Compression per view role: q (online / student / first view), k (momentum / teacher),
    and how many views a sample has (None: the run's own; ``resolve`` fills it in)."""
    q: ViewCompression = ViewCompression()
    k: ViewCompression = ViewCompression()
    views: int | None = None

    def __post_init__(self):
        if self.views is not None and (isinstance(self.views, bool)
                                       or not isinstance(self.views, int) or self.views < 2):
            raise ValueError(f"views={self.views!r} must be an integer ≥ 2 (or None for the "
                             "run's own number of views)")

    @classmethod
    def parse(cls, text):
        """Parse the CLI form (see the module docstring); raises ValueError naming the field."""
        if not isinstance(text, str):
            raise ValueError(f"strategy must be a string, got {text!r}")
        text = text.strip()
        if text.lower() in ("", "none", "baseline"):
            return cls()
        roles, views = {r: {} for r in ROLES}, None
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, eq, value = part.partition("=")
            if key.strip() == "views" and ":" not in part:          # the views part: views=M
                if views is not None:
                    raise ValueError(f"views is given twice in strategy {text!r}")
                views = int(value) if eq and value.strip().isdigit() else None
                if views is None or views < 2:
                    raise ValueError(f"bad setting {part!r} in strategy {text!r}: expected "
                                     "views=<integer ≥ 2>")
                continue
            role_names, sep, settings = part.partition(":")
            if not sep or not role_names or not set(role_names) <= set(ROLES):
                raise ValueError(f"bad strategy part {part!r} in {text!r}: expected ROLE:key=value "
                                 f"with ROLE one of {', '.join(ROLES)} (or 'qk'), e.g. "
                                 "'q:drop=0.75', or views=<integer ≥ 2>")
            for item in filter(None, (s.strip() for s in settings.split(","))):
                key, eq, value = item.partition("=")
                key = key.strip()
                if key not in ("drop", "patch"):
                    raise ValueError(f"unknown setting {key!r} in strategy {text!r}; "
                                     "allowed: drop, patch (views is a part of its own: "
                                     "'q:drop=0.5;views=4')")
                try:
                    if not eq:
                        raise ValueError
                    parsed = float(value) if key == "drop" else int(value)
                except ValueError:
                    raise ValueError(f"bad setting {item!r} in strategy {text!r}: expected "
                                     "drop=<float in [0,1)> or patch=<int>") from None
                if key == "drop":
                    if not 0.0 <= parsed < 1.0:
                        raise ValueError(f"drop={value} in strategy {text!r} must be in [0, 1)")
                elif parsed < 1:
                    raise ValueError(f"patch={value} in strategy {text!r} must be ≥ 1")
                for r in role_names:
                    roles[r]["patch_size" if key == "patch" else "drop"] = parsed
        return cls(**{r: ViewCompression(**v) for r, v in roles.items()}, views=views)

    def __str__(self):
        parts = [f"{r}:{getattr(self, r)}" for r in ROLES if str(getattr(self, r))]
        parts += [f"views={self.views}"] if self.views is not None else []
        return ";".join(parts) or "none"

    def resolve(self, views):
        """The views rule: this strategy fully specified for a run of ``views`` views per
        sample. A strategy that names no view count takes the run's; one that names M keeps
        it (a step then uses the first M views of its batch, and DINO's M views are 2
        global + M − 2 local crops: ``local_crops``). Training, the probe and the cost model
        all go through here; a resolved strategy has ``views`` set."""
        return self if self.views is not None else dataclasses.replace(self, views=views)

    def to_dict(self):
        return dataclasses.asdict(self)             # {"q": {...}, "k": {...}, "views": M or None}

    @classmethod
    def from_dict(cls, d):
        return cls(**{r: ViewCompression(**d.get(r, {})) for r in ROLES}, views=d.get("views"))


NONE = Strategy()
FULL = ViewCompression()                             # a view left as it is


def local_crops(method, views):
    """DINO's M views are its 2 global crops and M − 2 local crops; other methods have none."""
    return views - 2 if method == "dino" else 0


# ========================================================================= cost model
def block_flops(L, D):
    """Forward FLOPs of one transformer block on L tokens of width D (MLP ratio 4)."""
    # qkv 6LD² + attention scores and weighted sum 4L²D + projection 2LD² + MLP 16LD²
    return 24 * L * D * D + 4 * L * L * D


def forward_flops(model, img_size=None, patch_size=None, drop=0.0):
    """Forward FLOPs of the backbone on one image (patch embedding + blocks)."""
    img = model.img_size if img_size is None else img_size
    p = model.patch_size if patch_size is None else patch_size
    n = model.grid(img, p) ** 2                     # patches embedded (vit.ViT's resize rule)
    L = 1 + kept_tokens(n, drop)                    # kept tokens + class token
    embed = 2 * n * (model.in_chans * p * p) * model.dim
    return embed + model.depth * block_flops(L, model.dim)


def head_flops(head):
    """Forward FLOPs of a head on one sample: 2·in·out for every nn.Linear in it (biases,
    norms and activations are left out, as in the block count); 0 for no head."""
    if head is None:
        return 0
    return sum(2 * m.in_features * m.out_features for m in head.modules()
               if isinstance(m, nn.Linear))


HEAD_ROLES = ("online", "target")


class CostModel:
    """Sample cost in units (forward passes of the uncompressed base backbone).

    mode "flops" counts FLOPs (above); mode "measured" times forward passes of ``model``
    then the head (batch ``batch``, median of ``reps``; under bf16 autocast where ``dtype`` is
    bfloat16, as train.py's step on a GPU) for each sequence setting the first time it is
    asked for, and uses time ratios instead. ``heads`` = (online, target): the
    modules after the backbone on a gradient-carrying view and on a momentum / teacher view
    (``method.cost_heads()``; None where there is none). The unit excludes them.
    """

    def __init__(self, model, mode="flops", batch=32, reps=5, heads=(None, None), dtype=None):
        if mode not in ("flops", "measured"):
            raise ValueError(f"cost mode {mode!r}; allowed: flops, measured")
        heads = tuple(heads)
        if len(heads) != 2 or not all(h is None or isinstance(h, nn.Module) for h in heads):
            raise ValueError(f"heads={heads!r}; allowed: (online, target), each an nn.Module "
                             "or None")
        self.model, self.mode, self.batch, self.reps, self.dtype = model, mode, batch, reps, dtype
        self.heads = dict(zip(HEAD_ROLES, heads))
        self.head_flops = {role: head_flops(h) for role, h in self.heads.items()}
        self._cache = {}
        self.base = self.forward_cost()                  # the backbone alone: the unit

    def forward_cost(self, img_size=None, patch_size=None, drop=0.0, head=None):
        """f(L) + h of one view: the backbone at this setting, then ``head`` ("online",
        "target", or None for the backbone alone); FLOPs per image, or seconds per batch."""
        if head is not None and head not in HEAD_ROLES:
            raise ValueError(f"head {head!r}; allowed: {', '.join(HEAD_ROLES)} or None")
        if head is not None and self.heads[head] is None:
            head = None                                  # no such head: the backbone alone
        key = (img_size, patch_size, drop, head)
        if key not in self._cache:
            if self.mode == "flops":
                self._cache[key] = (forward_flops(self.model, img_size, patch_size, drop)
                                    + (self.head_flops[head] if head else 0))
            else:
                self._cache[key] = self._time_forward(img_size, patch_size, drop, head)
        return self._cache[key]

    def _time_forward(self, img_size, patch_size, drop, head):
        """Median seconds of a forward pass (backbone, then the head) on a batch.

        Under torchrun rank 0 times and every rank takes its number, so that all ranks charge
        the same prices: each rank's progress decides when it leaves the training loop, and
        ranks that leave at different steps wait for each other's collectives forever. The
        broadcast is safe because every rank prices the same settings in the same order
        (train.py prices each stage, and the probe its grid, on every rank in lockstep), so
        each broadcast meets its partners."""
        rank, world = rank_world()
        device = next(self.model.parameters()).device
        seconds = self._median_seconds(img_size, patch_size, drop, head, device) \
            if rank == 0 else 0.0
        if world > 1:
            box = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.broadcast(box, src=0)
            seconds = box.item()
        return seconds

    @torch.no_grad()
    def _median_seconds(self, img_size, patch_size, drop, head, device):
        m, h = self.model, self.heads[head] if head else None
        img = m.img_size if img_size is None else img_size
        modes = (m.training, h.training if h is not None else None)
        # Timing runs token dropout and draws its input: on a forked RNG, so that pricing a
        # strategy never moves the training stream.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.randn(self.batch, m.in_chans, img, img, device=device)
            m.train()                               # dropout only acts in training mode
            if h is not None:
                # eval: a BatchNorm head in training mode would update its running statistics
                # and, under torchrun, gather batch statistics from ranks that are not timing
                h.eval()
            times = []
            try:
                for i in range(self.reps + 1):      # the first call warms up
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    with torch.autocast(device.type, dtype=self.dtype or torch.bfloat16,
                                        enabled=self.dtype is not None):
                        feats = m(x, patch_size=patch_size, drop=drop)   # (B, D)
                        if h is not None:
                            h(feats)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            finally:
                m.train(modes[0])
                if h is not None:
                    h.train(modes[1])
        return sorted(times[1:])[len(times[1:]) // 2]

    def view_units(self, vc, grad=True, img_size=None):
        """(f(L_view) + h)/f(L_base) × (3 with gradient, 1 through a momentum/teacher encoder),
        h the online head's FLOPs with gradient, the target head's without."""
        vc = vc or ViewCompression()
        head = "online" if grad else "target"
        rel = self.forward_cost(img_size, vc.patch_size, vc.drop, head) / self.base
        return rel * (3.0 if grad else 1.0)

    def sample_units(self, method, strategy, local_size=None, symmetric=True):
        """Units for one training sample of ``method`` under a resolved ``strategy``
        (``Strategy.resolve``: M = strategy.views views); every view is charged, so the price
        grows linearly with M.
        simclr, multiview:  every view carries gradient; views alternate roles q, k, q, k, ...
        moco:    symmetric — every view through the online encoder (q, gradient) and the
                 momentum encoder (k, no gradient): M·(q + k); one-directional — view 1
                 online only, views 2..M momentum only: q + (M − 1)·k.
        dino:    each of the 2 global crops through the student (q) and teacher (k); each of
                 the M − 2 local crops (``local_size`` px) through the student only, with q's
                 drop at the base patch size.
        Uncompressed, without heads: SimCLR 6, MoCo-v3 8 (one-directional 4), DINO with 2
        global crops 8; with heads, each view adds h/f(L_base) × (3 or 1) of its branch's head.
        """
        views = strategy.views
        if views is None:
            raise ValueError(f"strategy {strategy} has no view count: resolve it first "
                             "(Strategy.resolve(run's views))")
        if views < 2:
            raise ValueError(f"views={views} must be ≥ 2")
        q = lambda grad: self.view_units(strategy.q, grad)       # noqa: E731
        k = lambda grad: self.view_units(strategy.k, grad)       # noqa: E731
        if method in ("simclr", "multiview"):
            return sum(q(True) if i % 2 == 0 else k(True) for i in range(views))
        if method == "moco":
            if symmetric:
                return views * (q(True) + k(False))
            return q(True) + (views - 1) * k(False)
        if method == "dino":
            local = ViewCompression(drop=strategy.q.drop)
            size = local_size or self.model.img_size
            return (2 * (q(True) + k(False))
                    + local_crops(method, views) * self.view_units(local, True, size))
        raise ValueError(f"unknown method {method!r}; allowed: simclr, moco, dino, multiview")


def default_patch_grid(p0):
    """The paper's Fig. 3 patch sizes 16–48 for p0 = 16, scaled to any base patch size."""
    return sorted({round(p0 * f) for f in (1, 1.25, 1.5, 1.75, 2, 2.5, 3)})


DROP_GRID = (0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample cost over drop × patch (paper Fig. 3): "
                                 "the query view is compressed, the key view is not; the "
                                 "backbone alone, as the paper's figure (figures.py cost "
                                 "adds each method's heads and timed passes).")
    ap.add_argument("--model", default="base", help="ViT preset (the paper's figure uses base)")
    ap.add_argument("--method", default="moco", choices=["simclr", "moco", "dino", "multiview"])
    ap.add_argument("--mode", default="flops", choices=["flops", "measured"],
                    help="flops: analytic count; measured: timed forward passes (slow for base)")
    args = ap.parse_args(argv)
    model = vit.build_vit(args.model)
    cost = CostModel(model, args.mode)
    base = cost.sample_units(args.method, NONE.resolve(2))
    print(f"sample cost in units (1 unit = 1 forward of uncompressed ViT-{args.model}), "
          f"{args.method}, key view uncompressed; baseline = {base:.2f}")
    print("patch \\ drop " + "".join(f"{d:>7.2f}" for d in DROP_GRID))
    for p in default_patch_grid(model.patch_size):
        row = [cost.sample_units(args.method, Strategy(q=ViewCompression(d, p), views=2))
               for d in DROP_GRID]
        print(f"{p:>12d} " + "".join(f"{u:>7.2f}" for u in row))


if __name__ == "__main__":
    main()
