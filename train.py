"""Pre-training with a budget: SimCLR, MoCo-v3 or DINO on a ViT, accelerated or not.

Concern: the training loop (paper §6). Training spends a **budget** counted in units (one
unit = one forward pass of the uncompressed backbone on one image; compress.py). Every
step charges the cost model's price of its samples under the strategy in force, and
**progress** t = spent / budget drives the learning rate, the momentum / teacher EMA,
DINO's teacher temperature and the compression stage (schedule.py). A compressed step is
cheaper, so an accelerated run takes more steps for the same budget.

One process or many, same script (DDP; one process per GPU, gloo on CPU):

    python train.py --method simclr                                  # embedded data, CPU
    python train.py --method moco --accel "q:drop=0.75" --budget 400k
    torchrun --nproc_per_node=4 train.py --method moco --data folder \\
        --data-root /data/imagenet100 --model small --img-size 224 --budget 50M

Outputs in --out: ``log.jsonl`` (one JSON object per logged step / evaluation),
``last.pt`` (everything a resume needs; rewritten atomically) and ``ckpt_{0,25,50,75,100}.pt``
at stage fractions of the budget (the probe in schedule.py reads those).

Crashes and preemption: ``--resume`` continues from ``last.pt`` (or starts fresh if there is
none), so ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts=3 ...
train.py ... --resume`` restarts a failed group from its last checkpoint by itself. A resumed
run restores the weights, the momentum encoder / teacher, the optimizer, DINO's centre, every
RNG stream of every rank, the position in the epoch and the budget spent, and so ends with
the weights of an uninterrupted run (bitwise on CPU with ``--deterministic``). A run that
stops on a non-finite loss leaves ``STOPPED`` in --out, so restarts do not replay it.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import compress
import data
from checkpoint import (check_out_dir, copy_atomic, read_checkpoint, restore, rng_state,  # noqa: F401
                        save_atomic, seed_all, set_rng_state)
import eval as evaluation
from distributed import setup_distributed
import losses
import vit
from schedule import LR_SCHEDULES, StageSchedule, learning_rate

# Defaults that differ per method, from the official recipes (MoCo-v3 ViT: AdamW lr 1.5e-4
# per 256 images, wd 0.1; DINO ViT: lr 5e-4 per 256, wd 0.04; SimCLR as MoCo-v3's ViT
# baseline). The CPU preset trains a small ViT from scratch on a small dataset for a short
# budget, where a larger rate is stable and learns faster: 5e-3 per 256 (README, "Data").
METHOD_DEFAULTS = {
    "simclr": dict(lr=1.5e-4, weight_decay=0.1),
    "moco": dict(lr=1.5e-4, weight_decay=0.1),
    "dino": dict(lr=5e-4, weight_decay=0.04),
}
CPU_PRESET_LR = 5e-3
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", default="simclr", choices=["simclr", "moco", "dino"])
    ap.add_argument("--data", default="embedded",
                    help="embedded (procedural, offline), cifar10, cifar100, stl10, or folder "
                         "(an ImageFolder root with train/ and val/, e.g. ImageNet-100)")
    ap.add_argument("--data-root", default=None, help="where cifar/stl/folder data lives")
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
                         "'q:drop=0.5,patch=8;k:patch=8', or a stage-schedule JSON file")
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
    for name in ("lr", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, METHOD_DEFAULTS[args.method][name])
    if args.batch_size < 2:
        ap.error(f"--batch-size {args.batch_size} must be ≥ 2 (contrastive losses need negatives)")
    if not 0.0 <= args.warmup < 1.0:
        ap.error(f"--warmup {args.warmup} must be in [0, 1)")
    if args.local_crops < 0:
        ap.error(f"--local-crops {args.local_crops} must be ≥ 0")
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


# ============================================================================== main
def main(argv=None):
    args, parser = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    resume_path = check_out_dir(args)
    stopped = os.path.join(args.out, "STOPPED")
    if args.resume and os.path.exists(stopped):     # e.g. torchrun restarting after a NaN stop
        with open(stopped) as f:
            raise SystemExit(f"{f.read().strip()}\nerror: this run stopped there, and a resume "
                             f"would replay the same steps; delete {stopped} to resume anyway")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to be
        torch.use_deterministic_algorithms(True)
    seed_all(args.seed, rank)

    # ===== model =====
    overrides = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size)) if v}
    try:
        backbone = vit.build_vit(args.model, **overrides)
        accel = StageSchedule.parse(args.accel)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    for _, strategy in accel.stages:                 # fail now, not hours into the run
        for vc in (strategy.q, strategy.k):
            if vc.patch_size and vc.patch_size > backbone.img_size:
                parser.error(f"--accel {args.accel!r}: patch {vc.patch_size} is larger than "
                             f"the {backbone.img_size}-px image")
    ckpt = read_checkpoint(resume_path, args, accel) if resume_path else None   # before the data
    try:
        train_base = data.build_dataset(args.data, args.data_root, "train", backbone.img_size,
                                        args.download, seed=args.seed, size=args.data_size)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    method_kwargs = losses.head_sizes(args.method, backbone.dim)
    if args.method == "moco":
        method_kwargs["symmetric"] = args.symmetric
    method = losses.build_method(args.method, backbone, **method_kwargs).to(device)
    cost = compress.CostModel(backbone, args.cost)

    # ===== data =====
    recipes = data.build_views(args.method, backbone.img_size, views=2,
                               local_crops=args.local_crops if args.method == "dino" else 0,
                               dataset=args.data)
    local_size = recipes[-1].size if args.local_crops and args.method == "dino" else None
    train_set = data.ViewDataset(train_base, recipes, seed=args.seed)
    per_rank = args.batch_size // world
    try:
        sampler = data.ResumableSampler(len(train_set), per_rank, seed=args.seed, rank=rank,
                                        world_size=world)
    except ValueError as e:
        parser.error(str(e))
    loader = data.build_loader(train_set, per_rank, sampler, num_workers=args.workers,
                               pin_memory=device.type == "cuda")
    knn_sets = None
    if master:
        try:
            val_base = data.build_dataset(args.data, args.data_root, "val", backbone.img_size,
                                          args.download, seed=args.seed,
                                          size=args.data_size and max(args.data_size // 4, 20))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            parser.error(str(e))
        knn_sets = (data.EvalDataset(train_base, backbone.img_size),
                    data.EvalDataset(val_base, backbone.img_size))

    # ===== optimizer =====
    # No weight decay on biases, norms, class token and position embedding (as DeiT / DINO).
    decay, no_decay = [], []
    for name, p in method.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    peak_lr = args.lr * args.batch_size / 256                       # linear scaling rule
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr,
                                  fused=device.type == "cuda")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # ===== state (everything a resume restores) =====
    # The price of a step under each stage is fixed here, once, and kept in the checkpoint:
    # with --cost measured, timings taken again after a restart would differ (and timing runs
    # token dropout, so it must not draw from the training RNG either).
    with torch.random.fork_rng(devices=[]):
        prices = [args.batch_size * cost.sample_units(
            args.method, strategy, local_crops=args.local_crops, local_size=local_size,
            symmetric=args.symmetric) for _, strategy in accel.stages]
        base_units = cost.sample_units(args.method, compress.NONE, local_crops=args.local_crops,
                                       local_size=local_size, symmetric=args.symmetric)
    state = dict(step=0, spent=0.0, epoch=0, batch_in_epoch=0, stage=0, ckpts_done=[],
                 evals_done=0, saves_done=0, images=0, wall=0.0, prices=prices, bad_files=[])
    if resume_path:
        restore(ckpt, resume_path, args, backbone, method, optimizer)
        state.update(ckpt["state"])
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:       # another number of processes: data order and budget stay exact, dropout not
            seed_all((args.seed * 1_000_003 + state["step"]) % 2**31, rank)
            if master:
                print(f"note: {resume_path} was written by {len(ckpt['rng'])} process(es), this "
                      f"run has {world}; token-dropout streams are re-seeded, so the result "
                      "will not be bitwise that of an uninterrupted run", flush=True)
        del ckpt
        if master:
            print(f"resumed from {resume_path}: step {state['step']}, "
                  f"{state['spent'] / args.budget:.1%} of the budget, epoch {state['epoch']} "
                  f"batch {state['batch_in_epoch']}", flush=True)
    model = method
    if world > 1:
        # Buffers (BN running stats, DINO centre) are computed from global-batch statistics
        # and are therefore identical on every rank: no need to broadcast them each step.
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda"
                                        else None, broadcast_buffers=False)

    log_path = os.path.join(args.out, "log.jsonl")
    if master:
        os.makedirs(args.out, exist_ok=True)
        for name in os.listdir(args.out):       # left by a save that a kill interrupted
            if name.endswith(".pt.tmp"):
                os.remove(os.path.join(args.out, name))
                print(f"note: removed {name}, a partial save of an interrupted run", flush=True)
        if resume_path and os.path.exists(log_path):   # drop lines logged after the checkpoint
            kept = []
            with open(log_path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= state["step"]:
                            kept.append(line)
                    except json.JSONDecodeError:
                        pass                    # a line cut short by the kill
            with open(log_path, "w") as f:
                f.writelines(kept)
        elif os.path.exists(log_path):
            os.remove(log_path)                 # --overwrite
        if not resume_path and os.path.exists(stopped):
            os.remove(stopped)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    last_path = os.path.join(args.out, "last.pt")
    last_good = dict(path=resume_path, step=state["step"] if resume_path else None)

    def last_good_text():
        if last_good["path"] is None:
            return "none has been written yet"
        return f"{last_good['path']} (step {last_good['step']})"

    def stop(message):
        """Exit with an error; the message once (from rank 0), the exit status on every rank.
        The message also goes to OUT/STOPPED, which a --resume (a torchrun restart) reads."""
        if master:
            print(message, file=sys.stderr, flush=True)
            with open(stopped, "w") as f:
                f.write(message + "\n")
        raise SystemExit(1)

    def checkpoint(*paths):
        """Save once to paths[0], copy to the others; last.pt goes last, as the commit point."""
        # Never put a NaN model over a good one: a finite loss with an overflowing gradient
        # leaves non-finite weights that the next step's loss check would only see later.
        bad = [n for n, t in method.state_dict().items()
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            stop(f"error: non-finite weights after step {state['step']} ({bad[0]}"
                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saved; "
                 f"the last good checkpoint is {last_good_text()}")
        if world > 1:                           # every rank's RNG streams, gathered to rank 0
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:                              # unreadable files met so far (for the record)
            met = getattr(train_base, "bad_files", set())
            state["bad_files"] = sorted(set(state["bad_files"]) | met)
            save_atomic(dict(args=vars(args), vit_config=backbone.config(), method_kwargs=method_kwargs,
                             backbone=backbone.state_dict(), method=method.state_dict(),
                             optimizer=optimizer.state_dict(), state=dict(state), rng=states,
                             accel=accel.to_json(),
                             strategy=str(accel.at(state["spent"] / args.budget))), paths[0])
            for path in paths[1:]:
                copy_atomic(paths[0], path)
        if paths[-1] == last_path:
            last_good.update(path=last_path, step=state["step"])

    def knn(tag):
        if master:
            with torch.random.fork_rng(devices=[]):         # evaluation must not move the RNG
                acc = evaluation.knn_accuracy(backbone, *knn_sets, device)
            print(f"[{tag}] k-NN top-1 {acc:.1f} % (k=20, T=0.07, {len(knn_sets[1])} val images)",
                  flush=True)
            log(dict(step=state["step"], progress=state["spent"] / args.budget, knn=acc))
        if world > 1:
            dist.barrier()

    if master:
        print(f"{args.method} | ViT {backbone.config()} | {world} process(es) on {device} | "
              f"batch {args.batch_size} | budget {args.budget:,.0f} units "
              f"(~{args.budget / base_units / len(train_base):.1f} uncompressed epochs) | "
              f"accel: {accel}", flush=True)
    if not resume_path:
        knn("start")

    # ===== train =====
    t_start = time.time() - state["wall"]
    t_last_log, units_last, t_prev = time.time(), state["spent"], time.time()
    data_wait, step_time, n_window = 0.0, 0.0, 0
    loader_warned = False
    if not resume_path and 0.0 in args.ckpt_at:
        checkpoint(os.path.join(args.out, "ckpt_0.pt"))      # the initial weights (stage 0)
    while state["spent"] < args.budget:
        sampler.set_epoch(state["epoch"])
        sampler.set_start(state["batch_in_epoch"])          # mid-epoch after a resume
        for views, _ in loader:
            t_data = time.time()
            fault = args.fault and args.fault[1] == state["step"] + 1 and rank == world - 1
            if fault and args.fault[0] == "crash" and not resume_path:
                os._exit(3)                          # test only: a worker dies without a word
            progress = state["spent"] / args.budget
            state["stage"] = accel.index(progress)
            strategy = accel.stages[state["stage"]][1]
            lr = learning_rate(progress, peak_lr, args.warmup, args.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = [v.to(device, non_blocking=True) for v in views]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, stats = model(views, strategy, progress)
            if fault and args.fault[0] == "nan-loss":
                loss = loss * float("nan")
            # ---- a non-finite loss stops the run before it can touch the weights ----
            # Stopping, rather than skipping the step, because a NaN here almost always means
            # the run diverged (too high a rate, a broken input): skipping would hide that and
            # keep spending budget. All ranks see every rank's loss and stop together.
            values = losses.gather_no_grad(loss.detach().float().reshape(1))   # (world,)
            if not torch.isfinite(values).all():
                by_rank = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(values.tolist()))
                stop(f"error: non-finite loss at step {state['step'] + 1} (progress "
                     f"{progress:.1%}; {by_rank}); the step was not taken and nothing was "
                     f"saved; the last good checkpoint is {last_good_text()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fault and args.fault[0] == "nan-grad":
                next(p for p in method.parameters() if p.grad is not None).grad.fill_(float("nan"))
            optimizer.step()
            method.update_target(progress)          # momentum encoder / teacher EMA
            # ---- budget: every sample of every rank pays its strategy's price ----
            state["spent"] += state["prices"][state["stage"]]
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["images"] += args.batch_size
            now = time.time()
            data_wait += t_data - t_prev
            step_time += now - t_prev
            n_window += 1
            t_prev = now
            state["wall"] = now - t_start
            progress = state["spent"] / args.budget

            if master and (now - t_last_log >= args.log_every or progress >= 1.0):
                rate = (state["spent"] - units_last) / max(now - t_last_log, 1e-9)   # units / s
                eta = max(args.budget - state["spent"], 0.0) / max(rate, 1e-9)
                ips = n_window * args.batch_size / max(step_time, 1e-9)
                print(f"{min(progress, 1):6.1%} | step {state['step']:6d} | loss {loss.item():.4f} | "
                      f"lr {lr:.2e} | {ips:7.1f} img/s | {strategy} | ETA {hms(eta)}", flush=True)
                if data_wait > 0.3 * step_time and not loader_warned:   # once: the log keeps the figure
                    loader_warned = True
                    print(f"warning: the data loader, not the model, limits this run "
                          f"({data_wait / step_time:.0%} of the step time waiting for batches); "
                          "raise --workers (the share is logged as data_wait)", flush=True)
                log({**stats, "step": state["step"], "progress": progress, "loss": loss.item(),
                     "lr": lr, "units": state["spent"], "strategy": str(strategy), "img_per_s": ips,
                     "data_wait": data_wait / step_time, "wall": state["wall"]})
                t_last_log, units_last = now, state["spent"]
                data_wait, step_time, n_window = 0.0, 0.0, 0

            # ---- evaluation and checkpoints at fractions of the budget ----
            if args.eval_every and progress < 1.0 and progress >= (state["evals_done"] + 1) * args.eval_every:
                state["evals_done"] = int(progress / args.eval_every)
                knn(f"{progress:.0%}")
            due = [f for f in args.ckpt_at if 0 < f <= progress and f not in state["ckpts_done"]]
            every_steps = args.save_every_steps and state["step"] % args.save_every_steps == 0
            if (due or every_steps or progress >= 1.0
                    or progress >= (state["saves_done"] + 1) * args.save_every):
                state["saves_done"] = int(progress / args.save_every)
                state["ckpts_done"] += due
                # Stage checkpoints first, last.pt last: a kill in between resumes from the
                # previous last.pt and writes the stage checkpoints again.
                checkpoint(*[os.path.join(args.out, f"ckpt_{round(f * 100)}.pt") for f in due],
                           last_path)
            t_prev = time.time()                     # evaluation / saving is not data wait
            if state["spent"] >= args.budget:
                break
        else:                                        # the epoch ran out before the budget
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    knn("end")
    if master:
        # The k-NN passes read every training image here, so this set is complete.
        bad = sorted(set(state["bad_files"]) | getattr(train_base, "bad_files", set()))
        if bad:
            print(f"warning: {len(bad)} unreadable training image(s) were skipped, each replaced "
                  f"by the next readable one: {', '.join(bad[:5])}"
                  f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}", flush=True)
        print(f"done: {state['step']} steps, {state['spent']:,.0f} units, "
              f"{state['wall'] / 60:.1f} min; checkpoints in {args.out}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
