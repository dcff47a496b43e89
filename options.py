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
# DINO's self-distillation is less forgiving: 1.5e-3 per 256 on the cpu preset (teacher k-NN at
# half of 1M units on CIFAR-10: 33.5 % at 1.5e-3, 31.5 % at the official 5e-4; README "Recipes").
CPU_PRESET_DINO_LR = 1.5e-3
# The EMA momenta are tuned for ~10⁵ steps; a CPU-preset run takes a few thousand, in which such
# a slow target barely moves. MoCo-v3: 0.9 (k-NN after 200k units on the embedded set 24.4 % vs
# 20.1 % at 0.99). DINO: 0.99 (teacher k-NN at 25 % of 1M units on CIFAR-10: 30.5 % at 0.99,
# 29.6 % at 0.996, 26.7 % at 0.9; README "Recipes").
CPU_PRESET_MOMENTUM = {"moco": 0.9, "dino": 0.99}
# DINO's local crops on the cpu preset (measured on CIFAR-10, README "Recipes").
DINO_LOCAL_CROPS = 2
# The default budget per method: the quick start, ``python train.py --method M`` on the embedded
# set (k-NN before → after, one thread; docs/recipes.md "Quick start"). At 200k (~2 minutes of
# an idle 2-core CPU) SimCLR gains +21.2 points, MoCo-v3 +9.5, the multi-view loss +14.0, DINO
# +2.0. MoCo-v3 learns on with the budget (+14.5 at 400k, +21.7 at 500k, ~5 minutes), so it
# gets 500k. The multi-view loss has levelled off (+14.1 at 300k) and DINO barely starts (+3.7
# even at lr 5e-3 and momentum 0.95): more budget buys them nothing within minutes: 200k.
DEFAULT_BUDGET = {"simclr": "200k", "moco": "500k", "dino": "200k", "multiview": "200k"}
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


def fraction_pair(text):
    """'0.25,1' → (0.25, 1.0): an area range 0 < lo ≤ hi ≤ 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (e.g. 0.25,1)") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < LO ≤ HI ≤ 1")
    return (lo, hi)


def probability_list(text):
    """'0.5' or '1,0.1' → a tuple of probabilities in [0, 1]."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability or a comma-separated "
                                         "list of them") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every probability must be in [0, 1]")
    return values

def _add_run_flags(ap):
    """What is trained on what: method, data, model, budget, schedule, acceleration."""
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
    ap.add_argument("--budget", type=parse_units, default=None,
                    help="training budget in units (forward passes of the uncompressed backbone "
                         "on one image); default per method, the quick start on the embedded set "
                         "(2–5 minutes on an idle 2-core CPU): "
                         + ", ".join(f"{m} {b}" for m, b in DEFAULT_BUDGET.items()))
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr per 256 images (scaled linearly with the batch); default: the "
                         f"official per-method value, or {CPU_PRESET_LR} for the cpu preset "
                         f"({CPU_PRESET_DINO_LR} for DINO)")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW decay; default per method")
    ap.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                    help="decay after warm-up: cosine, or poly = 1 − t² (the paper's Fig. 6: "
                         "higher than cosine for longer, for tight budgets)")
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
    ap.add_argument("--auto-tolerance", type=float, default=1.0,
                    help="--accel auto: take the cheapest strategy whose CA-MSE is within this "
                         "factor of the least (default 1: the argmin, the paper's rule)")
    ap.add_argument("--momentum", type=float, default=None,
                    help="base EMA rate of MoCo-v3's momentum encoder / DINO's teacher, raised "
                         "to 1 on a cosine over progress; default 0.99 (MoCo-v3; 0.9 on the cpu "
                         "preset), 0.996 (DINO; 0.99 on the cpu preset)")
    ap.add_argument("--views", type=int, default=2,
                    help="views per image M: SimCLR/multiview positives, MoCo-v3 pairs, DINO "
                         "2 global + M−2 local crops; the budget pays for every view")
    ap.add_argument("--cost", default="flops", choices=["flops", "measured"],
                    help="how the budget prices a step: counted FLOPs or timed forward passes")
    ap.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                    help="MoCo-v3: symmetric loss (both views as queries, 8 units) as the official code")
    ap.add_argument("--local-crops", type=int, default=None,
                    help="DINO: number of small local crops (official: 8 at 96 px on 224 px "
                         f"images); default {DINO_LOCAL_CROPS} on the cpu preset, 8 otherwise")


def _add_recipe_flags(ap):
    """Each method's recipe (README, Recipes): optimisation, DINO, MoCo-v3, augmentations, multi-view."""
    # ----- optimisation: the official DINO recipe, available to every method -----
    ap.add_argument("--clip-grad", type=float, default=None,
                    help="clip each parameter's gradient to this L2 norm, as DINO's "
                         "clip_gradients does (per parameter, not the global norm); 0: off. "
                         "Default 3.0 for DINO (official), 0 otherwise (MoCo-v3, SimCLR: none)")
    ap.add_argument("--weight-decay-end", type=float, default=None,
                    help="weight decay at the end of training, reached on a cosine over "
                         "progress from --weight-decay; default 0.4 for DINO (official 0.04 → "
                         "0.4), else constant (= --weight-decay)")
    ap.add_argument("--min-lr", type=float, default=None,
                    help="the learning rate the cosine / polynomial decay ends at (absolute, "
                         "not per 256); default 1e-6 for DINO (official), 0 otherwise")
    # ----- DINO -----
    ap.add_argument("--out-dim", type=int, default=None,
                    help="DINO: prototypes K of the head; official 65536, default 4096 for "
                         "narrow backbones (dim < 256; methods.head_sizes), where small batches "
                         "and few steps cannot spread mass over 65k prototypes")
    ap.add_argument("--teacher-temp", type=float, default=0.04,
                    help="DINO: teacher temperature τ_t after warm-up (official default 0.04; "
                         "its ViT-S recipe 0.07; above 0.07 is unstable; lower sharpens against "
                         "collapse to the uniform distribution)")
    ap.add_argument("--warmup-teacher-temp", type=float, default=0.04,
                    help="DINO: τ_t at progress 0, rising linearly to --teacher-temp")
    ap.add_argument("--warmup-teacher-temp-frac", type=float, default=0.0,
                    help="DINO: fraction of the budget over which τ_t warms up (official: 0 by "
                         "default, 30 of 100 epochs = 0.3 in its ViT-S recipe)")
    ap.add_argument("--use-bn-in-head", action=argparse.BooleanOptionalAction, default=False,
                    help="DINO: BatchNorm after each hidden layer of the head (official option, "
                         "default off)")
    ap.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                    help="DINO: keep every prototype at unit norm (official default; its "
                         "README's ViT-S run turns it off: better, less stable)")
    ap.add_argument("--freeze-last-layer", type=float, default=0.01,
                    help="DINO: the head's last layer takes no step before this fraction of "
                         "the budget (official: the first of 100 epochs)")
    # ----- MoCo-v3 / ViT -----
    ap.add_argument("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=None,
                    help="freeze the patch projection at its random initialisation (MoCo-v3's "
                         "fix for training instability on ViTs); default: on for MoCo-v3, off "
                         "otherwise and on the cpu preset (k-NN on CIFAR-10 after 1M units: "
                         "42.4 %% frozen vs 45.9 %% trained; README \"Recipes\"). Patch scaling "
                         "resizes the frozen base kernel")
    ap.add_argument("--pos-embed", default="learned", choices=["learned", "sincos"],
                    help="learned position embedding, or MoCo-v3's fixed 2-D sin-cos one "
                         "(computed directly for any grid, so patch scaling interpolates nothing)")
    # ----- augmentations: each method's official recipe unless a flag says otherwise -----
    ap.add_argument("--colour", default=None, choices=["official", "strong"],
                    help="colour augmentation preset: official (the method's recipe), or strong "
                         "(hue ±0.5, grayscale 0.5: for data whose colours are random, where the "
                         "official recipe lets views be matched by colour alone); default strong "
                         "on the embedded set, official elsewhere. The flags below override it")
    ap.add_argument("--crop-scale", type=fraction_pair, default=None, metavar="LO,HI",
                    help="area range of the (global) random-resized crops; default: the "
                         "method's (0.08,1 — 0.25,1 below 96 px; DINO 0.4,1 with local crops, "
                         "0.14,1 without)")
    ap.add_argument("--jitter-strength", type=float, default=None,
                    help="× the recipe's brightness / contrast / saturation jitter (default 1)")
    ap.add_argument("--hue", type=float, default=None, help="hue jitter ±h, h ∈ [0, 0.5] (default 0.1)")
    ap.add_argument("--grayscale", type=float, default=None,
                    help="probability of a grayscale view (default 0.2)")
    ap.add_argument("--blur", type=probability_list, default=None, metavar="P[,P]",
                    help="Gaussian-blur probability, one value or one per global view (default: "
                         "SimCLR 0.5; MoCo-v3, DINO 1.0,0.1)")
    ap.add_argument("--solarize", type=probability_list, default=None, metavar="P[,P]",
                    help="solarisation probability, one value or one per global view (default: "
                         "SimCLR 0; MoCo-v3, DINO 0,0.2)")
    ap.add_argument("--local-crop-scale", type=fraction_pair, default=None, metavar="LO,HI",
                    help="DINO: area range of the local crops (default 0.05,0.4; 0.15,0.4 below 96 px)")
    ap.add_argument("--local-size", type=int, default=None,
                    help="DINO: side of a local crop in pixels (default 96/224 of the image, a "
                         "multiple of 8)")
    # ----- the multi-view loss (second paper) -----
    ap.add_argument("--proj-dim", type=int, default=None,
                    help="multiview: projector width d (hidden = d, as the authors' code); "
                         "default min(128, batch) — a d × d correlation estimated from fewer "
                         "rows than d is rank-deficient (methods.method_kwargs)")
    ap.add_argument("--lambd", type=float, default=None,
                    help="multiview: weight λ of the off-diagonal (orthogonality) term; "
                         "default 0.04 (methods.MultiView: the authors' CIFAR-10 sweeps pair "
                         "d ≤ 128 with λ = 0.04, λ·d ≈ 2.5–5)")


def _add_output_flags(ap):
    """Where a run writes, how often, on what device."""
    ap.add_argument("--out", default=None, help="run folder; default runs/<method>")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT/last.pt if it exists (else start fresh: safe for "
                         "torchrun --max-restarts)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="--resume from a checkpoint that holds more than tensors and plain "
                         "types by unpickling it fully, which runs any code it carries: only a "
                         "file you trust (without it such a file is refused)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    ap.add_argument("--seed", type=int, default=0, help="each rank uses seed + rank for dropout")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loader processes per GPU/process (0: load in the main process, "
                         "best for the embedded set on a 2-core CPU)")
    ap.add_argument("--data-path", choices=("auto", "resident", "workers"), default="auto",
                    help="how views are made. resident: the training images as one uint8 tensor on "
                         "the training device (or pinned on the host where they do not fit), each "
                         "step's views made there in batched ops from its indices (resident.py); "
                         "workers: loader processes augment and ship every view. auto: resident "
                         "wherever the images are one array that fits (CIFAR, STL, embedded, an "
                         "image cache; on a CPU only up to 64 px, where it is faster), else "
                         "workers. A resumed run keeps its path unless this flag names another "
                         "(docs/speed.md)")
    ap.add_argument("--augment-on", choices=("auto", "loader", "device"), default="auto",
                    help="where augmentation's colour ops (jitter, grayscale, blur, solarize) "
                         "run: in the loader processes, or on the training device after a uint8 "
                         "transfer of the crops (at 224 px ~5/6 of a loader's work per view "
                         "moves to the GPU). auto: device on CUDA, loader on CPU")
    ap.add_argument("--eval-every", type=float, default=0.25,
                    help="k-NN accuracy every this fraction of the budget (0: only at the start and end)")
    ap.add_argument("--knn-bank", type=int, default=None, metavar="N",
                    help="k-NN during training against N training images (a fixed random subset "
                         "of the whole training split, the same for every run and --data-size) "
                         "instead of all the run's: a cheaper curve for figures; eval.py always "
                         "uses all of them")
    ap.add_argument("--ckpt-at", type=fraction_list, default=fraction_list("0,0.25,0.5,0.75,1"),
                    help="progress fractions at which ckpt_<pct>.pt is kept")
    ap.add_argument("--save-every", type=float, default=0.05,
                    help="rewrite last.pt every this fraction of the budget")
    ap.add_argument("--save-every-steps", type=int, default=0,
                    help="also rewrite last.pt every this many steps (0: off); a crash loses at "
                         "most this many steps, at the price of one save each time")
    ap.add_argument("--keep-last", type=int, default=2, metavar="K",
                    help="keep the K newest last.pt (the older ones as last-1.pt ...): a resume "
                         "that finds last.pt damaged falls back to the newest good one")
    ap.add_argument("--dist-timeout", type=float, default=30.0, metavar="MIN",
                    help="minutes a rank waits for the others in a collective before the run "
                         "ends with an error (a rank that died or hangs); then torchrun's "
                         "--max-restarts can restart the group")
    ap.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels (bitwise-reproducible resumes on CPU; slower on GPU)")
    ap.add_argument("--data-size", type=int, default=None,
                    help="use only this many training images (and a quarter as many validation "
                         "images; all of them with --knn-bank): quick runs and tests")


def build_parser():
    """train.py's parser; defaults that depend on the method or preset stay None here."""
    ap = argparse.ArgumentParser(description="Pre-training with a budget: SimCLR, MoCo-v3 or DINO "
                                 "on a ViT, accelerated or not (train.py).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_run_flags(ap)
    _add_recipe_flags(ap)
    _add_output_flags(ap)
    return ap


def _fill_defaults(args):
    """The defaults that depend on the method, the preset or another flag (None until here)."""
    cpu, dino = args.model in ("cpu", "vit_cpu"), args.method == "dino"
    if args.budget is None:
        args.budget = parse_units(DEFAULT_BUDGET[args.method])
    if args.lr is None and cpu:
        args.lr = CPU_PRESET_DINO_LR if dino else CPU_PRESET_LR
    if args.momentum is None and cpu:
        args.momentum = CPU_PRESET_MOMENTUM.get(args.method)
    for name in ("lr", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, METHOD_DEFAULTS[args.method][name])
    if args.local_crops is None:
        args.local_crops = (DINO_LOCAL_CROPS if cpu else 8) if dino and args.views == 2 else 0
    if args.colour is None:
        args.colour = "strong" if args.data == "embedded" else "official"
    if args.clip_grad is None:
        args.clip_grad = 3.0 if dino else 0.0
    if args.weight_decay_end is None:
        args.weight_decay_end = 0.4 if dino else args.weight_decay
    if args.min_lr is None:
        args.min_lr = 1e-6 if dino else 0.0
    if args.stop_grad_conv1 is None:      # MoCo-v3's fix for ViT-S/B; it costs the cpu preset
        args.stop_grad_conv1 = args.method == "moco" and not cpu
    args.out = args.out or os.path.join("runs", args.method)


def _check_run(args, ap):
    """Refuse bad run settings, naming the value and what is allowed (exit status 2)."""
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
    if not (math.isfinite(args.auto_tolerance) and args.auto_tolerance >= 1.0):
        ap.error(f"--auto-tolerance {args.auto_tolerance} must be a number ≥ 1 (1: the argmin)")
    if args.auto_batches < 2:
        ap.error(f"--auto-batches {args.auto_batches} must be ≥ 2 (a variance needs two samples)")
    if not 0.0 <= args.eval_every <= 1.0 or not 0.0 < args.save_every <= 1.0:
        ap.error(f"--eval-every {args.eval_every} must be in [0, 1], --save-every "
                 f"{args.save_every} in (0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr {args.lr} must be a positive number")
    for flag, value, low in (("--img-size", args.img_size, 1), ("--patch-size", args.patch_size, 1),
                             ("--data-size", args.data_size, 1), ("--knn-bank", args.knn_bank, 1),
                             ("--workers", args.workers, 0),
                             ("--save-every-steps", args.save_every_steps, 0),
                             ("--keep-last", args.keep_last, 1),
                             ("--seed", args.seed, 0)):
        if value is not None and value < low:
            ap.error(f"{flag} {value} must be ≥ {low}")
    if args.seed >= 2**32:                   # numpy's seed range
        ap.error(f"--seed {args.seed} must be < 2**32")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        ap.error(f"--dist-timeout {args.dist_timeout} must be a positive number of minutes")
    if not args.log_every >= 0:
        ap.error(f"--log-every {args.log_every} must be ≥ 0 seconds")


def _check_recipe(args, ap):
    """Refuse bad recipe settings, naming the value and what is allowed (exit status 2)."""
    for flag, value in (("--weight-decay", args.weight_decay), ("--clip-grad", args.clip_grad),
                        ("--weight-decay-end", args.weight_decay_end),
                        ("--min-lr", args.min_lr), ("--freeze-last-layer", args.freeze_last_layer)):
        if not (math.isfinite(value) and value >= 0):
            ap.error(f"{flag} {value} must be a number ≥ 0")
    if args.freeze_last_layer >= 1:
        ap.error(f"--freeze-last-layer {args.freeze_last_layer} must be a fraction of the budget in [0, 1)")
    for flag, value in (("--teacher-temp", args.teacher_temp),
                        ("--warmup-teacher-temp", args.warmup_teacher_temp)):
        if not (math.isfinite(value) and value > 0):
            ap.error(f"{flag} {value} must be a positive temperature")
    if not 0.0 <= args.warmup_teacher_temp_frac < 1.0:
        ap.error(f"--warmup-teacher-temp-frac {args.warmup_teacher_temp_frac} must be in [0, 1)")
    for flag, value in (("--out-dim", args.out_dim), ("--proj-dim", args.proj_dim)):
        if value is not None and value < 2:
            ap.error(f"{flag} {value} must be ≥ 2")
    if args.hue is not None and not 0.0 <= args.hue <= 0.5:
        ap.error(f"--hue {args.hue} must be in [0, 0.5]")
    for flag, value in (("--jitter-strength", args.jitter_strength), ("--grayscale", args.grayscale)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            ap.error(f"{flag} {value} must be a number ≥ 0")
    if args.grayscale is not None and args.grayscale > 1:
        ap.error(f"--grayscale {args.grayscale} is a probability: it must be in [0, 1]")
    if args.local_size is not None and args.local_size < 1:
        ap.error(f"--local-size {args.local_size} must be ≥ 1 pixel")
    if args.lambd is not None and not (math.isfinite(args.lambd) and args.lambd >= 0):
        ap.error(f"--lambd {args.lambd} must be a number ≥ 0")


def get_args(argv=None):
    """argv → (validated args, parser): parse, fill the dependent defaults, check everything."""
    ap = build_parser()
    args = ap.parse_args(argv)
    _fill_defaults(args)
    _check_recipe(args, ap)
    _check_run(args, ap)
    return args, ap
