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
    python train.py --method simclr --accel auto          # probe at 0/25/50/75 %, switch
    python train.py --method multiview --views 4 --accel "qk:drop=0.5"
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
import dataclasses
import json
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
from options import get_args, hms
from schedule import StageSchedule, cosine_between, learning_rate, parse_grid, probe

# ========================================================================= optimisation
def weight_decay_groups(method, name):
    """(decayed, exempt) trainable parameters, as each official code groups them.

    DINO (utils.get_params_groups) exempts biases and every 1-D parameter (norms); the class
    token and position embedding are decayed. MoCo-v3 passes every parameter to AdamW with
    its weight decay, norms and biases included; SimCLR and the multi-view method follow it.
    """
    decay, exempt = [], []
    for key, p in method.named_parameters():
        if p.requires_grad:
            skip = name == "dino" and (key.endswith(".bias") or p.ndim == 1)
            (exempt if skip else decay).append(p)
    return decay, exempt


@torch.no_grad()
def clip_gradients(module, max_norm):
    """Scale each parameter's gradient to L2 norm ≤ max_norm, parameter by parameter, as DINO's
    utils.clip_gradients (not torch's clip_grad_norm_, which scales all by the global norm):
    g ← g · min(1, max_norm / (‖g‖ + 1e-6))."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


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
    if args.pos_embed != "learned":
        overrides["pos_embed"] = args.pos_embed
    auto = args.accel == "auto"          # the schedule is chosen during the run (probe_now)
    try:
        backbone = vit.build_vit(args.model, **overrides)
        p0 = backbone.patch_size
        accel = StageSchedule([(0.0, compress.NONE)]) if auto else StageSchedule.parse(args.accel)
        grid = (parse_grid(args.auto_grid or f"drop=0,0.5,0.75 patch={p0},{2 * p0}", p0)
                if auto else [])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    flag = f"--auto-grid {args.auto_grid!r}" if auto else f"--accel {args.accel!r}"
    for strategy in [s for _, s in accel.stages] + grid:   # fail now, not hours into the run
        for vc in (strategy.q, strategy.k):
            if vc.patch_size and vc.patch_size > backbone.img_size:
                parser.error(f"{flag}: patch {vc.patch_size} is larger than the "
                             f"{backbone.img_size}-px image")
    # Batches carry the most views any stage asks for; a stage that names no view count uses
    # the run's --views (the methods then take the first M views of each batch).
    max_views = max([args.views] + [getattr(s, "views", None) or 0
                                    for s in [s for _, s in accel.stages] + grid])
    pin = lambda s: s if max_views == args.views or getattr(s, "views", None) else \
        dataclasses.replace(s, views=args.views)                                   # noqa: E731
    accel = StageSchedule([(start, pin(s)) for start, s in accel.stages])
    grid = [pin(s) for s in grid]

    def auto_schedule(chosen):
        """--accel auto's schedule so far: uncompressed until the first probe, then each
        probe's choice from its --auto-at point on (kept in the checkpoint's state)."""
        stages = [(0.0, pin(compress.NONE))]
        for c in chosen:
            stage = (c["start"], compress.Strategy.parse(c["strategy"]))
            stages[-1:] = [stages[-1], stage] if c["start"] > 0 else [stage]
        return StageSchedule(stages)
    ckpt = (read_checkpoint(resume_path, args, None if auto else accel)           # before the data
            if resume_path else None)
    try:
        train_base = data.build_dataset(args.data, args.data_root, "train", backbone.img_size,
                                        args.download, seed=args.seed, size=args.data_size,
                                        cache=args.data_cache)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    if args.stop_grad_conv1:              # MoCo-v3: a random, frozen patch projection
        backbone.freeze_patch_embed()
    try:
        method_kwargs = losses.method_kwargs(args, backbone.dim)
    except ValueError as e:
        parser.error(str(e))
    method = losses.build_method(args.method, backbone, **method_kwargs).to(device)
    cost = compress.CostModel(backbone, args.cost, heads=method.cost_heads())

    # ===== data =====
    dino = args.method == "dino"
    recipes = data.build_views(args.method, backbone.img_size, views=max_views,
                               local_crops=max_views - 2 if dino else 0,
                               **data.recipe_settings(args))
    local_size = recipes[-1].size if dino and max_views > 2 else None
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
                                          size=args.data_size and max(args.data_size // 4, 20),
                                          cache=args.data_cache)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            parser.error(str(e))
        knn_sets = (data.EvalDataset(train_base, backbone.img_size, subset=args.knn_bank),
                    data.EvalDataset(val_base, backbone.img_size))

    # ===== optimizer =====
    decay, no_decay = weight_decay_groups(method, args.method)
    peak_lr = args.lr * args.batch_size / 256                       # linear scaling rule
    # Fused AdamW: one kernel for all parameters instead of a dozen elementwise passes; on CPU
    # it needs torch ≥ 2.4 and is a third of the foreach step (bench.py --section adamw).
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]         # MoCo-v3 has no exempt group
    try:
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, fused=True)
    except RuntimeError:                # older torch on CPU: the foreach implementation
        optimizer = torch.optim.AdamW(groups, lr=peak_lr)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # ===== state (everything a resume restores) =====
    # The price of a step under each stage is fixed here, once, and kept in the checkpoint:
    # with --cost measured, timings taken again after a restart would differ (and timing runs
    # token dropout, so it must not draw from the training RNG either).
    def price(strategy):                 # units of one sample (compress.CostModel)
        with torch.random.fork_rng(devices=[]):
            return cost.sample_units(args.method, strategy, views=args.views,
                                     local_crops=args.local_crops, local_size=local_size,
                                     symmetric=args.symmetric)
    prices = [args.batch_size * price(strategy) for _, strategy in accel.stages]
    base_units = price(compress.NONE)
    state = dict(step=0, spent=0.0, epoch=0, batch_in_epoch=0, stage=0, ckpts_done=[],
                 evals_done=0, saves_done=0, images=0, wall=0.0, prices=prices, bad_files=[],
                 auto=[], eval_wall=0.0)
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
    if auto:                              # the stages an interrupted run had chosen so far
        accel = auto_schedule(state["auto"])

    # ===== --accel auto: probe the current weights at each of --auto-at =====
    probe_set = data.ViewDataset(train_base, recipes, seed=args.seed) if auto else None

    def probe_now(progress):
        """CA-MSE of every --auto-grid strategy at the current weights (schedule.probe), on
        every rank in lockstep (the losses gather across ranks); rank 0's argmin is the next
        stage. Every forward/backward pass of the probe is charged to the budget, so an auto
        run compares with a fixed schedule at equal total compute. The probe restores weights,
        buffers and RNG, so a resumed run that replays it makes the same choice."""
        n = len(state["auto"])
        result = probe(method, probe_set, grid, args.method, cost, progress=progress,
                       batches=args.auto_batches, ref_batches=args.auto_batches,
                       batch_size=per_rank, seed=(args.seed + 1) * 7919 + 104_729 * n,
                       local_crops=args.local_crops, local_size=local_size, views=args.views)
        best = min(result["rows"], key=lambda r: r["ca_mse"])["strategy"]
        if world > 1:
            box = [best]
            dist.broadcast_object_list(box, src=0)
            best = box[0]
        units = result["units_spent"] * world                 # every rank probed its batches
        state["auto"].append(dict(start=args.auto_at[n], strategy=best, units=units,
                                  seconds=result["seconds"]))
        state["spent"] += units
        state["prices"] = [args.batch_size * price(s) for _, s in auto_schedule(state["auto"]).stages]
        if master:
            with open(os.path.join(args.out, f"probe_{round(args.auto_at[n] * 100)}.json"), "w") as f:
                json.dump(result, f, indent=1)
            print(f"[auto {args.auto_at[n]:.0%}] probed {len(grid)} strategies in "
                  f"{result['seconds']:.0f} s for {units:,.0f} units "
                  f"({units / args.budget:.1%} of the budget) → {best}", flush=True)
        log(dict(step=state["step"], progress=state["spent"] / args.budget, auto=best,
                 probe_units=units, probe_seconds=result["seconds"],
                 rows=[{k: r[k] for k in ("strategy", "units", "ca_mse")} for r in result["rows"]]))
        return auto_schedule(state["auto"])

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

    # The weights each method reports: DINO's teacher (its paper evaluates the teacher, which
    # is better than the student throughout training); MoCo-v3's base (online) encoder.
    evaluated = method.teacher.backbone if dino else backbone

    def knn(tag):
        if master:
            t0 = time.time()
            with torch.random.fork_rng(devices=[]):         # evaluation must not move the RNG
                acc = evaluation.knn_accuracy(evaluated, *knn_sets, device)
            print(f"[{tag}] k-NN top-1 {acc:.1f} % (k=20, T=0.07, {len(knn_sets[1])} val images, "
                  f"{len(knn_sets[0])} training images)",
                  flush=True)
            # train_wall: seconds of training so far, without the evaluations (figures.py
            # compares runs in wall-clock time, and they need not evaluate equally often)
            log(dict(step=state["step"], progress=state["spent"] / args.budget, knn=acc,
                     units=state["spent"], train_wall=state["wall"] - state["eval_wall"]))
            state["eval_wall"] += time.time() - t0
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
            if auto and len(state["auto"]) < len(args.auto_at) and \
                    progress >= args.auto_at[len(state["auto"])]:
                t_probe = time.time()
                accel = probe_now(progress)
                progress = state["spent"] / args.budget
                t_prev += time.time() - t_probe        # probing is neither data wait nor step
            state["stage"] = accel.index(progress)
            strategy = accel.stages[state["stage"]][1]
            lr = learning_rate(progress, peak_lr, args.warmup, args.lr_schedule, final_lr=args.min_lr)
            wd = cosine_between(progress, args.weight_decay, args.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["weight_decay"]:                   # the decayed group only
                    group["weight_decay"] = wd
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
            if args.clip_grad:
                clip_gradients(method, args.clip_grad)
            if dino and progress < args.freeze_last_layer:
                method.cancel_last_layer_gradients()
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
                     "lr": lr, "wd": wd, "units": state["spent"], "strategy": str(strategy), "img_per_s": ips,
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
