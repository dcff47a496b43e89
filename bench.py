"""Speed: what a compressed training step really costs, beside what the cost model predicts.

Concern: the paper's acceleration claim rests on the cost model of §4 (Fig. 3): a view
encoded as L tokens costs f(L)/f(L_base) of an uncompressed one, with
f(L) = depth·(24LD² + 4L²D) + patch embedding. This file times the thing that the budget
actually pays for, a full training step of the backbone (forward + backward + AdamW step),
for the baseline and for each (drop, patch) cell, and prints the measured speed-up next
to the predicted one f(L_base)/f(L_cell). (A step is ≈ 3 forwards for every cell, so the
ratio of steps predicted by the model is the ratio of forwards.)

Cells are timed interleaved — round-robin over all cells, repeated — so that slow drift of
the machine (thermal throttling, another process) falls on every cell alike; each cell's
figure is the median of its timed steps. Where the measured speed-up falls short of the
predicted one at short sequences, read the ``opt`` column: the AdamW step costs the same at
every sequence length, and the cost model leaves it out (right for the large batches of real
training, less so for a small CPU batch); ``fwd+bwd only`` is the speed-up without it.

Sections are one function each (``--what``); ``step`` is the only one so far (per-method
throughput, data-loader throughput and GPU utilisation are meant to join it).

Usage::

    python bench.py                                        # ViT-Ti/16 at 224 px on CPU, < 2 min
    python bench.py --grid "drop=0,0.5,0.75,0.9 patch=16,32" --steps 10
    python bench.py --device cuda --batch-size 128 --model base
    python bench.py --compare-timm     # also time timm's ViT of the same shape, if installed
"""
import argparse
import functools
import importlib
import itertools
import json
import platform
import statistics
import time

import torch

import vit
from compress import forward_flops


# ======================================================================= cells
def parse_grid(text, p0):
    """Cells (drop, patch) from e.g. "drop=0,0.5,0.75,0.9; patch=32".

    Groups are separated by ';'; each group is the product of its lists; a key left out
    of a group takes its base value (drop 0, patch p0). The baseline (0, p0) always comes
    first, as the reference of every speed-up.
    """
    cells = [(0.0, p0)]
    for group in filter(None, (g.strip() for g in text.split(";"))):
        values = {"drop": [0.0], "patch": [p0]}
        for item in group.split():
            key, eq, rhs = item.partition("=")
            if key not in values or not eq:
                raise ValueError(f"bad grid item {item!r} in {text!r}: expected drop=a,b,... "
                                 "or patch=a,b,...")
            try:
                values[key] = [float(v) if key == "drop" else int(v) for v in rhs.split(",")]
            except ValueError:
                raise ValueError(f"bad number in grid item {item!r}") from None
        for drop, patch in itertools.product(values["drop"], values["patch"]):
            if not 0.0 <= drop < 1.0:
                raise ValueError(f"drop {drop} in grid {text!r} must be in [0, 1)")
            if patch < 1:
                raise ValueError(f"patch {patch} in grid {text!r} must be ≥ 1")
            if (drop, patch) not in cells:
                cells.append((drop, patch))
    return cells


def cell_name(drop, patch, p0):
    if (drop, patch) == (0.0, p0):
        return "baseline"
    return ",".join(([f"drop={drop:g}"] if drop else []) + ([f"patch={patch}"] if patch != p0 else []))


def n_tokens(model, img, drop, patch):
    """Sequence length the blocks see: class token + kept patch tokens (vit.ViT's rules)."""
    n = model.grid(img, patch) ** 2
    return 1 + (max(1, round((1 - drop) * n)) if drop else n)


# ===================================================================== timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def adamw(model, device):
    """The optimizer as train.py builds it: fused kernel on GPU, PyTorch's default on CPU."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def make_step(features, opt, device):
    """A callable running one full training step: ``features()`` forward, backward, ``opt``.

    It returns the seconds spent in each phase (forward, backward, optimizer) and in all.
    """
    def step():
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # any scalar of the (B, D) features will do for timing: backward visits every layer
        loss = features().square().mean()
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        sync(device)
        t3 = time.perf_counter()
        return dict(total=t3 - t0, forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2)
    return step


def interleaved_times(steps, warmup, reps):
    """Run every step of ``steps`` once per round, warmup + reps rounds, round-robin.

    Returns {name: {phase: median seconds}} over the timed rounds, plus "all": the list of
    total times (for the spread).
    """
    times = {name: [] for name in steps}
    for r in range(warmup + reps):
        for name, fn in steps.items():
            t = fn()
            if r >= warmup:
                times[name].append(t)
    return {name: {**{k: statistics.median(t[k] for t in ts) for k in ts[0]},
                   "all": [t["total"] for t in ts]}
            for name, ts in times.items()}


# =================================================================== sections
def bench_step(args, device):
    """Train-step time per (drop, patch) cell, measured against the cost model's prediction."""
    torch.manual_seed(0)
    model = vit.build_vit(args.model, img_size=args.img_size).to(device).train()
    p0 = model.patch_size
    grid = f"drop=0.5,0.75,0.9; patch={2 * p0}" if args.grid is None else args.grid
    cells = parse_grid(grid, p0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    # one model and one optimizer for all cells: the weights' values do not change the
    # cost, and AdamW's state has the same size whatever the sequence length
    opt = adamw(model, device)
    names = [cell_name(d, p, p0) for d, p in cells]
    steps = {n: make_step(functools.partial(model, images, patch_size=p, drop=d), opt, device)
             for n, (d, p) in zip(names, cells)}
    print(f"# step: ViT-{args.model}/{p0} at {args.img_size} px, batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads; {len(cells)} cells interleaved, "
          f"{args.warmup} warm-up + {args.steps} timed rounds")
    times = interleaved_times(steps, args.warmup, args.steps)

    base = times["baseline"]
    base_flops = forward_flops(model, args.img_size, p0, 0.0)
    rows = []
    for name, (drop, patch) in zip(names, cells):
        t = times[name]
        predicted = base_flops / forward_flops(model, args.img_size, patch, drop)
        measured = base["total"] / t["total"]
        rows.append(dict(cell=name, drop=drop, patch=patch,
                         tokens=n_tokens(model, args.img_size, drop, patch),
                         ms_per_step=1e3 * t["total"], ms_min=1e3 * min(t["all"]),
                         ms_max=1e3 * max(t["all"]),
                         ms_forward=1e3 * t["forward"], ms_backward=1e3 * t["backward"],
                         ms_optimizer=1e3 * t["optimizer"],
                         images_per_s=args.batch_size / t["total"],
                         measured_speedup=measured, predicted_speedup=predicted,
                         ratio=measured / predicted,
                         # the same, leaving out the optimizer step (its cost does not
                         # depend on the sequence length, so the cost model ignores it)
                         measured_speedup_fwd_bwd=(base["forward"] + base["backward"])
                         / (t["forward"] + t["backward"])))
    # ms/step is the median of whole steps; fwd+bwd and opt are medians of those phases
    print(f"{'cell':<18}{'tokens':>7}{'ms/step':>9}{'fwd+bwd':>9}{'opt':>6}{'measured':>10}"
          f"{'predicted':>11}{'meas/pred':>11}{'fwd+bwd only':>14}")
    for r in rows:
        print(f"{r['cell']:<18}{r['tokens']:>7}{r['ms_per_step']:>9.1f}"
              f"{r['ms_forward'] + r['ms_backward']:>9.1f}{r['ms_optimizer']:>6.1f}"
              f"{r['measured_speedup']:>9.2f}×{r['predicted_speedup']:>10.2f}×{r['ratio']:>11.2f}"
              f"{r['measured_speedup_fwd_bwd']:>13.2f}×")
    return dict(model=args.model, img_size=args.img_size, batch_size=args.batch_size,
                warmup=args.warmup, steps=args.steps, cells=rows)


def compare_timm(args, device):
    """Our ViT against timm's VisionTransformer of the same shape: same features, step time."""
    try:
        # optional: only for this comparison, never a dependency of the project
        timm = importlib.import_module("timm")
        VisionTransformer = importlib.import_module("timm.models.vision_transformer").VisionTransformer
    except ImportError as e:
        print(f"# timm: not importable ({e}); comparison skipped")
        return dict(skipped=str(e))
    torch.manual_seed(0)
    ours = vit.build_vit(args.model, img_size=args.img_size).to(device)
    c = ours.config()
    theirs = VisionTransformer(img_size=c["img_size"], patch_size=c["patch_size"],
                               in_chans=c["in_chans"], embed_dim=c["dim"], depth=c["depth"],
                               num_heads=c["heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=True,
                               num_classes=0, class_token=True, global_pool="token").to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)     # raises if the layouts differ
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    ours.train(), theirs.train()
    steps = {name: make_step(functools.partial(m, x), adamw(m, device), device)
             for name, m in (("ours", ours), ("timm", theirs))}
    times = interleaved_times(steps, args.warmup, args.steps)
    ms = {k: 1e3 * v["total"] for k, v in times.items()}
    print(f"# timm {timm.__version__}: state dict loads strictly; max |feature diff| (eval) = "
          f"{diff:.3g}")
    print(f"  train step, drop 0: ours {ms['ours']:.1f} ms, timm {ms['timm']:.1f} ms, "
          f"ours/timm = {ms['ours'] / ms['timm']:.3f}")
    return dict(timm_version=timm.__version__, strict_load=True, max_abs_feature_diff=diff,
                ms_ours=ms["ours"], ms_timm=ms["timm"], ratio_ours_over_timm=ms["ours"] / ms["timm"])


SECTIONS = {"step": bench_step}


# ======================================================================= main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="step", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--model", default="tiny", help=f"ViT preset: {', '.join(vit.PRESETS)}")
    ap.add_argument("--img-size", type=int, default=None, help="default: the preset's (224 for tiny)")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="16 keeps the default run well under 2 min on 2 CPU cores (≈ 30 s on an "
                         "idle machine); use 64–256 on a GPU")
    ap.add_argument("--grid", default=None,
                    help='cells, e.g. "drop=0,0.5,0.75,0.9 patch=16,32" (product; groups '
                         "separated by ';'); default: drop 0.5/0.75/0.9 at the base patch, "
                         "and 2× the base patch at drop 0")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (allocator, caches)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--compare-timm", action="store_true",
                    help="also time timm's VisionTransformer of the same shape (skipped if absent)")
    ap.add_argument("--out", default="bench.json", help="JSON results")
    args = ap.parse_args(argv)

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    for w in what:
        if w not in SECTIONS:
            ap.error(f"unknown section {w!r}; allowed: {', '.join(SECTIONS)}")
    if args.model.removeprefix("vit_") not in vit.PRESETS:
        ap.error(f"unknown model preset {args.model!r}; allowed: {', '.join(vit.PRESETS)}")
    args.img_size = args.img_size or vit.PRESETS[args.model.removeprefix("vit_")]["img_size"]
    for name in ("batch_size", "steps", "img_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be ≥ 1")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup} must be ≥ 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.grid is not None:                   # check the grid before any timing starts
        try:
            too_large = [p for _, p in parse_grid(args.grid, 1) if p > args.img_size]
        except ValueError as e:
            ap.error(str(e))
        if too_large:
            ap.error(f"patch {too_large[0]} in --grid is larger than the {args.img_size}-px image")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads {args.threads} must be ≥ 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    results = dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                   cpu=platform.processor() or platform.machine(),
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else None)
    for w in what:
        results[w] = SECTIONS[w](args, device)
    if args.compare_timm:
        results["timm"] = compare_timm(args, device)
    results["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"# {results['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
