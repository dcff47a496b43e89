"""Speed: what a compressed training step really costs, and whether the data keeps up with it.

Concern: the paper's acceleration claim rests on the cost model of §4 (Fig. 3): a view
encoded as L tokens costs f(L)/f(L_base) of an uncompressed one, with
f(L) = depth·(24LD² + 4L²D) + patch embedding. This file times what the budget actually pays
for and what can stand in its way. One function per section (``--section``):

* ``step`` (the default): a full training step of the backbone (forward + backward + AdamW
  step) for the baseline and for each (drop, patch) cell, with the measured speed-up next to
  the predicted one f(L_base)/f(L_cell). (A step is ≈ 3 forwards for every cell, so the ratio
  of steps predicted by the model is the ratio of forwards.)
* ``loader`` (in bench_loader.py): images/s of each method's augmentation pipeline through
  data.build_loader, the per-image reference (``augment.augment``) against the batched one
  (``augment_batch``), and the batched one with its colour ops left to the training device
  (``--augment-on device``), at the CPU preset (32 px, the embedded dataset) and at 224 px
  (random 256² images in memory, so that no decoding is timed), with 0 and 2 loader workers.
  ``--loader-decode`` adds what decoding costs: the SimCLR loader over generated 375×500
  JPEG files (decoded every time) against the same images read from their decode-once cache
  (imagecache.build_cache).
* ``resident`` (in bench_loader.py): images/s of the resident data path (resident.py: the
  images held on ``--device``, each step's views made there) beside each method's whole
  training step for ``--models``, uncompressed and most compressed. The prepared GPU run:
  ``--section resident --device cuda --models small --batch-size 256`` (ViT-S/16, 224 px).
  The ``loader`` section also times the resident path on the CPU, beside the loaders.
* ``methods`` (in bench_methods.py): images/s of a whole SimCLR / MoCo-v3 / DINO training
  step (heads, loss, momentum update included), uncompressed and under the most compressed
  strategy of the default schedule (drop 0.75 and twice the base patch), beside the images/s
  one loader process makes for that method: a compressed step that outruns the loader is
  loader-bound (on CPU the workers also take cores from the step). ``--peak-tflops`` adds MFU.
* ``colour`` (in bench_colour.py): the colour ops of --augment-on device and of the resident
  views (``augment.colour_on_device``), each op on just the images whose coin came up,
  against the version that ran every op on every image and kept results by ``torch.where``,
  at 32 px (batch 256) and 224 px (batch 32; on a GPU 256 too), with their aten ops and
  passes over the batch.
* ``adamw`` (in bench_methods.py): one AdamW step over the parameters of the cpu and tiny
  presets (backbone + SimCLR head), PyTorch's foreach implementation against the fused one.

The timing tools every section shares (interleaved rounds, medians, AdamW as train.py builds
it) are in bench_timing.py.

Timings are interleaved — round-robin over everything compared, repeated — so that slow
drift of the machine (thermal throttling, another process) falls on all alike; each figure is
the median of its timed rounds. Where the measured speed-up of ``step`` falls short of the
predicted one at short sequences, read the ``opt`` column: the AdamW step costs the same at
every sequence length, and the cost model leaves it out (right for the large batches of real
training, less so for a small CPU batch); ``fwd+bwd only`` is the speed-up without it. On a
shared machine ``--threads 1`` gives steadier figures: OpenMP threads wait for each other at
every op, and one that is descheduled can make two threads slower than one.

Usage::

    python bench.py                                        # step: ViT-Ti/16, 224 px, CPU, < 2 min
    python bench.py --grid "drop=0,0.5,0.75,0.9 patch=16,32" --steps 10
    python bench.py --section loader --workers 0,2         # per-image vs batched augmentation
    python bench.py --section loader --loader-sizes 224 --loader-decode    # JPEG vs cache
    python bench.py --section methods,adamw                # CPU preset; --models cpu,small,base
    python bench.py --section colour --threads 1           # the colour ops, before and after
    python bench.py --section resident --device cuda --models small --batch-size 256   # < 5 min
    python bench.py --section all --device cuda --batch-size 128 --models small --peak-tflops 989
    python bench.py --compare-timm     # also time timm's ViT of the same shape, if installed
"""
import argparse
import functools
import importlib
import json
import platform
import time

import torch

import vit
from bench_colour import bench_colour
from bench_loader import bench_loader, bench_resident
from bench_methods import bench_adamw, bench_methods
from bench_timing import interleaved_times, make_adamw, make_step
from compress import forward_flops
from schedule import parse_grid


# ======================================================================= cells
def grid_cells(text, p0):
    """Cells (drop, patch) of the query view from a grid in schedule.parse_grid's form, e.g.
    "drop=0.5,0.75,0.9; patch=32" (a union of two products); the baseline (0, p0) first, as
    the reference of every speed-up."""
    cells = [(0.0, p0)]
    for s in parse_grid(text, p0):
        cell = (s.q.drop, s.q.patch_size or p0)
        if cell not in cells:
            cells.append(cell)
    return cells


def cell_name(drop, patch, p0):
    if (drop, patch) == (0.0, p0):
        return "baseline"
    return ",".join(([f"drop={drop:g}"] if drop else []) + ([f"patch={patch}"] if patch != p0 else []))


def n_tokens(model, img, drop, patch):
    """Sequence length the blocks see: class token + kept patch tokens (vit.ViT's rules)."""
    n = model.grid(img, patch) ** 2
    return 1 + vit.kept_tokens(n, drop)


# =================================================================== sections
def bench_step(args, device):
    """Train-step time per (drop, patch) cell, measured against the cost model's prediction."""
    torch.manual_seed(0)
    batch = args.batch_size or 16
    model = vit.build_vit(args.model, img_size=args.img_size).to(device).train()
    p0 = model.patch_size
    grid = f"drop=0.5,0.75,0.9; patch={2 * p0}" if args.grid is None else args.grid
    cells = grid_cells(grid, p0)
    images = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    # one model and one optimizer for all cells: the weights' values do not change the
    # cost, and AdamW's state has the same size whatever the sequence length
    opt = make_adamw(model.parameters())
    names = [cell_name(d, p, p0) for d, p in cells]
    steps = {n: make_step(functools.partial(model, images, patch_size=p, drop=d), opt, device)
             for n, (d, p) in zip(names, cells)}
    print(f"# step: ViT-{args.model}/{p0} at {args.img_size} px, batch {batch}, "
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
                         images_per_s=batch / t["total"],
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
    return dict(model=args.model, img_size=args.img_size, batch_size=batch,
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
    batch = args.batch_size or 16
    ours = vit.build_vit(args.model, img_size=args.img_size).to(device)
    c = ours.config()
    theirs = VisionTransformer(img_size=c["img_size"], patch_size=c["patch_size"],
                               in_chans=c["in_chans"], embed_dim=c["dim"], depth=c["depth"],
                               num_heads=c["heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=True,
                               num_classes=0, class_token=True, global_pool="token").to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)     # raises if the layouts differ
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    ours.train(), theirs.train()
    steps = {name: make_step(functools.partial(m, x), make_adamw(m.parameters()), device)
             for name, m in (("ours", ours), ("timm", theirs))}
    times = interleaved_times(steps, args.warmup, args.steps)
    ms = {k: 1e3 * v["total"] for k, v in times.items()}
    print(f"# timm {timm.__version__}: state dict loads strictly; max |feature diff| (eval) = "
          f"{diff:.3g}")
    print(f"  train step, drop 0: ours {ms['ours']:.1f} ms, timm {ms['timm']:.1f} ms, "
          f"ours/timm = {ms['ours'] / ms['timm']:.3f}")
    return dict(timm_version=timm.__version__, strict_load=True, max_abs_feature_diff=diff,
                ms_ours=ms["ours"], ms_timm=ms["timm"], ratio_ours_over_timm=ms["ours"] / ms["timm"])


SECTIONS = {"step": bench_step, "loader": bench_loader, "methods": bench_methods,
            "adamw": bench_adamw, "colour": bench_colour, "resident": bench_resident}


# ======================================================================= main
def parse_args(argv=None):
    """The flags, checked before any timing starts (bad input: an error naming it, exit 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", "--what", dest="section", default="step",
                    help=f"comma-separated sections, or all: {', '.join(SECTIONS)} (default: step)")
    ap.add_argument("--model", default="tiny", help=f"step: ViT preset: {', '.join(vit.PRESETS)}")
    ap.add_argument("--img-size", type=int, default=None, help="step: default the preset's (224 "
                    "for tiny)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default per section: step 16 (keeps the default run well under 2 min on "
                         "2 CPU cores, ≈ 30 s idle); loader 64 at ≤ 64 px, else 16; methods 64 "
                         "for the cpu preset, else 8. Use 64–256 on a GPU")
    ap.add_argument("--grid", default=None,
                    help='step: cells, e.g. "drop=0,0.5,0.75,0.9 patch=16,32" (schedule.parse_grid: '
                         "a product; products separated by ';'); default: drop 0.5/0.75/0.9 at the base patch, "
                         "and 2× the base patch at drop 0")
    ap.add_argument("--steps", type=int, default=10,
                    help="timed rounds (the median is reported); loader: timed batches")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (allocator, caches)")
    ap.add_argument("--workers", default="0,2", help="loader: loader worker counts to time")
    ap.add_argument("--loader-sizes", default="32,224", help="loader: image sizes (≤ 64 px: the "
                    "embedded dataset; above: random images 8/7 larger, in memory)")
    ap.add_argument("--loader-decode", action="store_true",
                    help="loader: also time the simclr loader over generated JPEG files against "
                         "their decode-once cache (imagecache.build_cache)")
    ap.add_argument("--methods", default="simclr,moco,dino",
                    help="loader, methods: which methods (loader times DINO with 2 and 6 local crops)")
    ap.add_argument("--models", default="cpu",
                    help="methods: ViT presets (small and base at 224 px are slow on CPU)")
    ap.add_argument("--adamw-models", default="cpu,tiny", help="adamw: ViT presets")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="methods: the device's peak dense bf16 TFLOP/s (H100 SXM: 989), to print "
                         "MFU = achieved FLOP/s ÷ peak; default: no MFU")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--compare-timm", action="store_true",
                    help="also time timm's VisionTransformer of the same shape (skipped if absent)")
    ap.add_argument("--out", default="bench.json", help="JSON results")
    args = ap.parse_args(argv)

    what = [w.strip() for w in args.section.split(",") if w.strip()]
    args.sections = what = list(SECTIONS) if what == ["all"] else what
    for w in what:
        if w not in SECTIONS:
            ap.error(f"unknown section {w!r}; allowed: {', '.join(SECTIONS)}, or all")
    if args.model.removeprefix("vit_") not in vit.PRESETS:
        ap.error(f"unknown model preset {args.model!r}; allowed: {', '.join(vit.PRESETS)}")
    args.img_size = args.img_size or vit.PRESETS[args.model.removeprefix("vit_")]["img_size"]
    for name in ("batch_size", "steps", "img_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be ≥ 1")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup} must be ≥ 0")
    def listed(flag, allowed=None, least=0):
        """--flag "a,b" → [a, b]: names from ``allowed``, or integers ≥ ``least``."""
        option, text = "--" + flag.replace("_", "-"), getattr(args, flag)
        items = [v.strip() for v in text.split(",") if v.strip()]
        if not items:
            ap.error(f"{option} {text!r}: give at least one value")
        for v in items:
            if allowed and v not in allowed:
                ap.error(f"{option}: {v!r} is not one of {', '.join(allowed)}")
            if not allowed and not (v.isdigit() and int(v) >= least):
                ap.error(f"{option}: {v!r} must be an integer ≥ {least}")
        setattr(args, flag, items if allowed else [int(v) for v in items])
    listed("workers", least=0)
    listed("loader_sizes", least=8)
    listed("methods", ("simclr", "moco", "dino"))
    listed("models", tuple(vit.PRESETS))
    listed("adamw_models", tuple(vit.PRESETS))
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error(f"--peak-tflops {args.peak_tflops} must be > 0 (TFLOP/s)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.grid is not None:                   # check the grid before any timing starts
        try:
            too_large = [p for _, p in grid_cells(args.grid, 1) if p > args.img_size]
        except ValueError as e:
            ap.error(str(e))
        if too_large:
            ap.error(f"patch {too_large[0]} in --grid is larger than the {args.img_size}-px image")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads} must be ≥ 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    results = dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                   cpu=platform.processor() or platform.machine(),
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else None)
    for w in args.sections:
        results[w] = SECTIONS[w](args, device)
    if args.compare_timm:
        results["timm"] = compare_timm(args, device)
    results["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"# {results['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
