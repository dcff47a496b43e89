"""How a run begins: the processes, the run, its state, and --out ready for it.

Concern: start-up (train.py trains what ``start`` returns). A fresh run starts at step 0; a
``--resume`` restores the newest good checkpoint of --out (checkpoint.py chooses it: rank 0
reads, every rank follows) — the weights, the optimiser, every rank's RNG streams and the
``TrainState`` of the loop, so the run continues where it stopped. ``prepare_out_dir`` leaves
--out as that continuation expects: partial saves of a kill removed, log lines after the
resumed step dropped, a replaced (--overwrite) run's checkpoints removed.

    run, state, resumed_from = start(args, parser)    # resumed_from: a path, or None
"""
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

import compress
from checkpoint import check_out_dir, read_resumable, restore, seed_all, set_rng_state
from distributed import cpu_group, setup_distributed
from run import BadRun, build_run, build_views_loader
from schedule import auto_schedule


@dataclasses.dataclass
class TrainState:
    """Everything of the loop that a resume restores (a dict in every checkpoint)."""
    step: int = 0
    spent: float = 0.0              # units spent: the budget's meter (compress.py)
    epoch: int = 0
    batch_in_epoch: int = 0         # where in the epoch a resume continues
    stage: int = 0                  # index of the stage in force
    images: int = 0
    wall: float = 0.0               # seconds since the start, evaluations included
    eval_wall: float = 0.0          # ... of which spent evaluating
    prices: list = dataclasses.field(default_factory=list)      # units of one step, per stage
    auto: list = dataclasses.field(default_factory=list)        # --accel auto: probes so far
    ckpts_done: list = dataclasses.field(default_factory=list)  # stage checkpoints written
    evals_done: int = 0
    saves_done: int = 0
    bad_files: list = dataclasses.field(default_factory=list)   # unreadable images met
    data_path: str = ""             # how views are made: resident or workers ("": workers)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def start(args, parser):
    """Processes, the run and its state (restored on --resume); → (run, state, resumed from)."""
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    candidates = out_dir_candidates(args, rank, world)
    stopped = os.path.join(args.out, "STOPPED")
    if args.resume and os.path.exists(stopped):     # e.g. torchrun restarting after a NaN stop
        with open(stopped) as f:
            raise SystemExit(f"{f.read().strip()}\nerror: this run stopped there, and a resume "
                             f"would replay the same steps; delete {stopped} to resume anyway")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to be
        torch.use_deterministic_algorithms(True)
    seed_all(args.seed, rank)
    try:
        run = build_run(args, device, rank, world)
    except BadRun as e:
        parser.error(str(e))
    state, resume_path = TrainState(prices=[args.batch_size * run.price(s)
                                            for _, s in run.accel.stages]), None
    if candidates:                 # the newest good checkpoint (last.pt, unless it is damaged)
        state, resume_path = resume(run, candidates)
    keep_data_path(run, state, resume_path)
    if args.accel == "auto":                          # the stages an interrupted run had chosen
        run.accel = auto_schedule(state.auto)
    epochs = args.budget / run.price(compress.NONE) / len(run.train_base)   # every rank prices
    if run.master:
        prepare_out_dir(args, state.step if resume_path else None)
        print(f"{args.method} | ViT {run.backbone.config()} | {world} process(es) on {device} | "
              f"views: {describe_path(run)} | batch {args.batch_size} | "
              f"budget {args.budget:,.0f} units (~{epochs:.1f} "
              f"uncompressed epochs) | accel: {run.accel}", flush=True)
        if epochs < 1 and args.data != "embedded":
            warn_short_budget(run, epochs)
    return run, state, resume_path


def out_dir_candidates(args, rank, world):
    """Rank 0 lists --out and decides (``check_out_dir``: the checkpoints to resume from, or
    refuse), then tells the others: on a shared filesystem a node's listing can lag behind
    another's, and ranks that decided apart would start and resume in one group."""
    choice = [None, None]                     # (candidates, why not)
    if rank == 0:
        try:
            choice[0] = check_out_dir(args)
        except SystemExit as e:
            choice[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(choice, src=0, group=cpu_group())
    if choice[1]:
        raise SystemExit(choice[1] if rank == 0 else 1)
    return choice[0]


def describe_path(run):
    """The data path in the start-up line: where the images are, how many bytes."""
    if run.data_path != "resident":
        return f"{run.args.workers} loader worker(s)"
    images = run.loader.images
    where = run.device if images.on_device else "pinned host memory"
    return f"resident ({images.images.numel() / 1e6:,.0f} MB on {where})"


def keep_data_path(run, state, resumed):
    """A resumed run goes on making its views as it did (resident or workers: the same draws,
    pixels apart by float rounding, so only its own path resumes bitwise), unless --data-path
    names the other; either way the log says so."""
    saved = state.data_path or "workers"          # runs from before --data-path used workers
    if resumed and saved != run.data_path:
        if run.args.data_path == "auto":
            try:
                build_views_loader(run, saved)
                change = f"keeps its data path {saved!r} (--data-path changes it)"
            except BadRun as e:
                change = f"cannot keep its data path {saved!r} ({e}); views by {run.data_path!r}"
        else:
            change = f"changes its data path from {saved!r} to {run.data_path!r} (--data-path)"
        if run.master:
            print(f"note: the resumed run {change}", flush=True)
    state.data_path = run.data_path


def warn_short_budget(run, epochs):
    """A budget that buys less than one epoch of a real dataset is almost always a forgotten
    --budget (the default, 200k, is sized for the embedded set on a CPU)."""
    args, sample = run.args, run.price(compress.NONE)
    one_epoch, steps = sample * len(run.train_base), args.budget / sample / args.batch_size
    print(f"warning: --budget {args.budget:,.0f} units buys {epochs:.2f} uncompressed epochs of "
          f"these {len(run.train_base):,} images ({steps:,.0f} steps of batch "
          f"{args.batch_size}; one epoch costs "
          f"{one_epoch:,.0f} units). The default budget is sized for the embedded set on a CPU; "
          "the ImageNet-100 recipes use --budget 50M (ViT-S/16, ~49 epochs of MoCo-v3; "
          "docs/training.md)", file=sys.stderr, flush=True)


def resume(run, candidates):
    """The newest good checkpoint of ``candidates`` restored into ``run``: weights, optimizer,
    this rank's RNG streams; → (its TrainState, its path)."""
    args, rank, world = run.args, run.rank, run.world
    accel = None if args.accel == "auto" else run.accel
    choice = [None, None]                     # rank 0 chooses (one read, one decision), or why not
    if run.master:
        try:
            path, ckpt = read_resumable(candidates, args, accel)
            choice[0] = path
        except SystemExit as e:
            choice[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(choice, src=0, group=cpu_group())
    if choice[1]:
        raise SystemExit(choice[1] if run.master else 1)
    if not run.master:
        path, ckpt = read_resumable(choice[:1], args, accel)
    restore(ckpt, path, args, run.backbone, run.method, run.optimizer)
    if ckpt.get("scaler") and run.scaler.is_enabled():    # fp16's loss scale (precision.py);
        run.scaler.load_state_dict(ckpt["scaler"])        # from a bf16 run: a fresh one
    state = TrainState.from_dict(ckpt["state"])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank])
    else:           # another number of processes: data order and budget stay exact, dropout not
        seed_all((args.seed * 1_000_003 + state.step) % 2**31, rank)
        if run.master:
            print(f"note: {path} was written by {len(ckpt['rng'])} process(es), this run has "
                  f"{world}; token-dropout streams are re-seeded, so the result will not be "
                  "bitwise that of an uninterrupted run", flush=True)
    if run.master:
        print(f"resumed from {path}: step {state.step}, {state.spent / args.budget:.1%} of the "
              f"budget, epoch {state.epoch} batch {state.batch_in_epoch}", flush=True)
    return state, path


def prepare_out_dir(args, resumed_step):
    """--out for this run: partial saves of a killed run removed, log lines written after the
    checkpoint it resumes dropped (or the log and checkpoints of an --overwrite'd run removed,
    so that no fallback can resume it), args.json."""
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):       # left by a save that a kill interrupted
        if name.endswith(".pt.tmp"):
            os.remove(os.path.join(args.out, name))
            print(f"note: removed {name}, a partial save of an interrupted run", flush=True)
    log_path = os.path.join(args.out, "log.jsonl")
    if os.path.exists(os.path.join(args.out, "PREEMPTED")):     # this is the run continuing
        os.remove(os.path.join(args.out, "PREEMPTED"))
    if resumed_step is not None and os.path.exists(log_path):
        kept = []
        with open(log_path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass                    # a line cut short by the kill
        with open(log_path, "w") as f:
            f.writelines(kept)
    elif os.path.exists(log_path):
        os.remove(log_path)                 # --overwrite
    if resumed_step is None:                # a fresh run: nothing of a replaced one may be
        replaced = [n for n in os.listdir(args.out) if n == "STOPPED" or    # resumed or probed
                    (n.endswith((".pt", ".pt.bad")) and n.startswith(("last", "ckpt_")))]
        for name in replaced:
            os.remove(os.path.join(args.out, name))
        if [n for n in replaced if n != "STOPPED"]:
            print(f"note: --overwrite removed the replaced run's {len(replaced)} checkpoint "
                  "file(s)", flush=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
