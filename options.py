"""Command-line options of train.py: the flags, their defaults and why, and their checks.

Concern: turning argv into a validated ``args`` namespace (paper §6 settings). Every bad
value is refused here, before any data is read or anything is written, with a message that
names the value and what is allowed. Defaults follow the official recipes; the CPU preset's
differ where a small ViT on the embedded dataset needs it (README, "Data").

Usage::

    from options import get_args, parse_units
    args, parser = get_args(["--method", "moco", "--budget", "400k"])
    parse_units("50M")                                   # 5e7 units
"""
import argparse
import math
import os

from schedule import LR_SCHEDULES

# Defaults that differ per method, from the official recipes (MoCo-v3 ViT: AdamW lr 1.5e-4
# per 256 images, wd 0.1; DINO ViT: lr 5e-4 per 256, wd 0.04; SimCLR as MoCo-v3's ViT
# baseline). The CPU preset trains a small ViT from scratch on a small dataset for a short
# budget, where a larger rate is stable and learns faster: 5e-3 per 256 (README, "Data").
METHOD_DEFAULTS = {
    "simclr": dict(lr=1.5e-4, weight_decay=0.1),
    "moco": dict(lr=1.5e-4, weight_decay=0.1),
    "dino": dict(lr=5e-4, weight_decay=0.04),
    "multiview": dict(lr=1.5e-4, weight_decay=0.1),    # no official recipe: SimCLR's
}
CPU_PRESET_LR = 5e-3
# MoCo-v3's momentum 0.99 is tuned for ~10⁵ steps; the quick start takes ~400, in which such a
# slow key encoder barely moves: 0.9 on the CPU preset (k-NN after 200k units 24.4 % vs 20.1 %,
# README "Results"). DINO's teacher is kept at 0.996: 0.9 did not help it at that budget.
CPU_PRESET_MOCO_MOMENTUM = 0.9
SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_units(text):
    """'50M', '2.5k', '1e6', '200000' → float units; error for ≤ 0 or unparsable."""
    t = str(text).strip().lower()
    mult = SUFFIXES.get(t[-1:], None)
    try:
        value = float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is not a number of units (e.g. 200k, 50M, 2.5e6)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"budget {text!r} must be a positive number of units")
    return value


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fraction_list(text):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fractions")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every fraction must be in [0, 1]")
    return sorted(set(values))


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Pre-training with a budget: SimCLR, MoCo-v3 or DINO "
                                 "on a ViT, accelerated or not (train.py).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", default="simclr", choices=["simclr", "moco", "dino", "multiview"])
    ap.add_argument("--data", default="embedded",
                    help="embedded (procedural, offline), cifar10, cifar100, stl10, or folder "
                         "(an ImageFolder root with train/ and val/, e.g. ImageNet-100)")
    ap.add_argument("--data-root", default=None, help="where cifar/stl/folder data lives")
    ap.add_argument("--data-cache", default=None, metavar="DIR",
                    help="--data folder: read the images from this decode-once cache (uint8 "
                         "squares; build it with python imagecache.py --data-root ROOT --out "
                         "DIR) instead of decoding a JPEG per image per epoch, which can leave "
                         "compressed steps waiting for the loader. A resume may add or drop "
                         "it (it is not in checkpoint.FIXED_ARGS); views then come from the "
                         "cache's central squares")
    ap.add_argument("--download", action="store_true", help="download cifar/stl (needs internet)")
    ap.add_argument("--model", default="cpu", help="ViT preset: cpu, tiny, small, base")
    ap.add_argument("--img-size", type=int, default=None, help="default: the preset's size")
    ap.add_argument("--patch-size", type=int, default=None, help="base patch size p0; default: the preset's")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="global batch over all processes (per process = batch / world size)")
    ap.add_argument("--budget", type=parse_units, default=parse_units("200k"),
                    help="training budget in units (forward passes of the uncompressed backbone "
                         "on one image); the default is ~4 epochs of SimCLR on the embedded set, "
                         "a few minutes on a 2-core CPU")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr per 256 images (scaled linearly with the batch); default: the "
                         f"official per-method value, or {CPU_PRESET_LR} for the cpu preset")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW decay; default per method")
    ap.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                    help="decay after warm-up; poly = (1 − t)², higher for longer under a tight budget")
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of the budget")
    ap.add_argument("--accel", default="none",
                    help="'none' (baseline), a strategy such as 'q:drop=0.75' or "
                         "'q:drop=0.5,patch=8;k:patch=8', a stage-schedule JSON file, or 'auto' "
                         "(probe the weights at --auto-at and switch to the argmin CA-MSE)")
    ap.add_argument("--auto-grid", default=None,
                    help="--accel auto: the strategies probed (schedule.parse_grid form); "
                         "default 'drop=0,0.5,0.75 patch=p0,2·p0' (6 strategies)")
    ap.add_argument("--auto-at", type=fraction_list, default=fraction_list("0,0.25,0.5,0.75"),
                    help="--accel auto: progress points where the weights are probed")
    ap.add_argument("--auto-batches", type=int, default=4,
                    help="--accel auto: K = K_ref gradients per strategy in each probe; the "
                         "probe's forward/backward passes are charged to the budget")
    ap.add_argument("--momentum", type=float, default=None,
                    help="base EMA rate of MoCo-v3's momentum encoder / DINO's teacher, raised "
                         "to 1 on a cosine over progress; default 0.99 (MoCo-v3; 0.9 on the cpu preset), "
                         "0.996 (DINO)")
    ap.add_argument("--views", type=int, default=2,
                    help="views per image M: SimCLR/multiview positives, MoCo-v3 pairs, DINO "
                         "2 global + M−2 local crops; the budget pays for every view")
    ap.add_argument("--cost", default="flops", choices=["flops", "measured"],
                    help="how the budget prices a step: counted FLOPs or timed forward passes")
    ap.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                    help="MoCo-v3: symmetric loss (both views as queries, 8 units) as the official code")
    ap.add_argument("--local-crops", type=int, default=0,
                    help="DINO: number of small local crops (official: 10 at 96 px on 224 px images)")
    ap.add_argument("--out", default=None, help="run folder; default runs/<method>")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT/last.pt if it exists (else start fresh: safe for "
                         "torchrun --max-restarts)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    ap.add_argument("--seed", type=int, default=0, help="each rank uses seed + rank for dropout")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loader processes per GPU/process (0: load in the main process, "
                         "best for the embedded set on a 2-core CPU)")
    ap.add_argument("--eval-every", type=float, default=0.25,
                    help="k-NN accuracy every this fraction of the budget (0: only at the start and end)")
    ap.add_argument("--ckpt-at", type=fraction_list, default=fraction_list("0,0.25,0.5,0.75,1"),
                    help="progress fractions at which ckpt_<pct>.pt is kept")
    ap.add_argument("--save-every", type=float, default=0.05,
                    help="rewrite last.pt every this fraction of the budget")
    ap.add_argument("--save-every-steps", type=int, default=0,
                    help="also rewrite last.pt every this many steps (0: off); a crash loses at "
                         "most this many steps, at the price of one save each time")
    ap.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels (bitwise-reproducible resumes on CPU; slower on GPU)")
    ap.add_argument("--data-size", type=int, default=None,
                    help="use only this many training images (and a quarter as many validation "
                         "images): quick runs and tests")
    # Fault injection for tests/test_resume.py, test_distributed.py and test_bad_input.py only:
    # "crash@N" kills the last rank at the start of step N of a run that did not resume (as a
    # preempted or failed worker would die); "nan-loss@N" makes the loss of step N NaN on the
    # last rank; "nan-grad@N" makes a gradient of step N NaN (weights turn NaN, loss still finite).
    ap.add_argument("--test-fault", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lr is None and args.model in ("cpu", "vit_cpu"):
        args.lr = CPU_PRESET_LR
    if args.momentum is None and args.model in ("cpu", "vit_cpu") and args.method == "moco":
        args.momentum = CPU_PRESET_MOCO_MOMENTUM
    for name in ("lr", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, METHOD_DEFAULTS[args.method][name])
    if args.batch_size < 2:
        ap.error(f"--batch-size {args.batch_size} must be ≥ 2 (contrastive losses need negatives)")
    if not 0.0 <= args.warmup < 1.0:
        ap.error(f"--warmup {args.warmup} must be in [0, 1)")
    if args.local_crops < 0:
        ap.error(f"--local-crops {args.local_crops} must be ≥ 0")
    if args.views < 2:
        ap.error(f"--views {args.views} must be ≥ 2 (augmentation invariance needs two views)")
    if args.method == "dino" and args.views > 2:     # DINO's extra views are its local crops
        if args.local_crops not in (0, args.views - 2):
            ap.error(f"--views {args.views} means {args.views - 2} local crops for DINO, but "
                     f"--local-crops is {args.local_crops}; give one of the two")
        args.local_crops = args.views - 2
    elif args.method == "dino":
        args.views = 2 + args.local_crops
    if args.momentum is not None and not 0.0 <= args.momentum < 1.0:
        ap.error(f"--momentum {args.momentum} must be in [0, 1)")
    if args.auto_batches < 2:
        ap.error(f"--auto-batches {args.auto_batches} must be ≥ 2 (a variance needs two samples)")
    if not 0.0 <= args.eval_every <= 1.0 or not 0.0 < args.save_every <= 1.0:
        ap.error(f"--eval-every {args.eval_every} must be in [0, 1], --save-every "
                 f"{args.save_every} in (0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr {args.lr} must be a positive number")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        ap.error(f"--weight-decay {args.weight_decay} must be a number ≥ 0")
    for flag, value, low in (("--img-size", args.img_size, 1), ("--patch-size", args.patch_size, 1),
                             ("--data-size", args.data_size, 1), ("--workers", args.workers, 0),
                             ("--save-every-steps", args.save_every_steps, 0),
                             ("--seed", args.seed, 0)):
        if value is not None and value < low:
            ap.error(f"{flag} {value} must be ≥ {low}")
    if args.seed >= 2**32:                   # numpy's seed range
        ap.error(f"--seed {args.seed} must be < 2**32")
    if not args.log_every >= 0:
        ap.error(f"--log-every {args.log_every} must be ≥ 0 seconds")
    args.fault = None
    if args.test_fault:
        kind, _, step = args.test_fault.partition("@")
        if kind not in ("crash", "nan-loss", "nan-grad") or not step.isdigit():
            ap.error(f"--test-fault {args.test_fault!r}: expected crash@N, nan-loss@N or "
                     "nan-grad@N")
        args.fault = (kind, int(step))
    args.out = args.out or os.path.join("runs", args.method)
    return args, ap
