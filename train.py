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
at stage fractions of the budget (probe.py reads those).

Crashes and preemption: ``--resume`` continues from ``last.pt`` (or starts fresh if there is
none), so ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts=3 ...
train.py ... --resume`` restarts a failed group from its last checkpoint by itself. A resumed
run restores the weights, the momentum encoder / teacher, the optimizer, DINO's centre, every
RNG stream of every rank, the position in the epoch and the budget spent, and so ends with
the weights of an uninterrupted run (bitwise on CPU with ``--deterministic``). SIGTERM or
SIGUSR1 (a scheduler's preemption) saves ``last.pt`` after the current step and exits with
status 75 (cluster.py); a damaged ``last.pt`` falls back to the newest good checkpoint
(checkpoint.py); a failed save, a lost rank (``--dist-timeout``) or a second run into the same
--out stop with a message. A run that stops on a non-finite loss leaves ``STOPPED`` in --out,
so restarts do not replay it.

The file reads top-down (the step itself is step.py's): non-finite losses, what happens at
fractions of the budget (evaluation, checkpoints, the auto probe), logging, and the loop with the ways it
ends; how a run starts or resumes (the processes, the state a resume restores, --out) is
startup.py's.
"""
import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import precision
import protocols
from checkpoint import BackgroundWriter, rng_state
from cluster import PREEMPTED, PreemptionSignals, RunLock, signal_name
from distributed import cpu_group, gather_no_grad, is_lost_rank
from options import get_args, hms
from probe import probe
from schedule import auto_schedule, best_strategy
from startup import start
from step import train_step           # the step of §6 (tests wrap train.train_step)


# ====================================================== non-finite losses, stopping
CHECK_EVERY = 20        # steps between checks of the losses (and before every save)


def check_losses(run, state, last_good):
    """Stop if any rank met a non-finite loss since the last check (every CHECK_EVERY steps,
    on every rank at once, and before every save, so that nothing computed after it is ever
    saved): one all-gather, not a host sync per step. Stopping, rather
    than skipping, because a NaN almost always means the run diverged (too high a rate, a
    broken input): skipping would hide that and keep spending budget."""
    everyone = gather_no_grad(run.watch[None]).cpu()        # (world, 4): one sync, all ranks
    bad = everyone[everyone[:, 0] > 0]
    if len(bad):
        settle(run, state, last_good)               # the write in flight: is it good?
        step, progress = int(bad[:, 1].min()), float(bad[bad[:, 1].argmin(), 2])
        by_rank = ", ".join(f"rank {r}: {v[3]:g}" for r, v in enumerate(everyone) if v[0] > 0)
        stop(run, f"error: non-finite loss at step {step} (progress {progress:.1%}; {by_rank}); "
                  f"nothing after step {step - 1} was saved; the last good checkpoint is "
                  f"{last_good}")


def stop(run, message, final=True):
    """Exit with an error; the message once (from rank 0), the exit status on every rank.
    A ``final`` stop (a diverged run) also writes the message to OUT/STOPPED, which a --resume
    (a torchrun restart) reads and refuses to replay; a full disk is not final."""
    if run.master:
        print(message, file=sys.stderr, flush=True)
        if final:
            with open(os.path.join(run.args.out, "STOPPED"), "w") as f:
                f.write(message + "\n")
    if run.world > 1 and dist.is_initialized():     # every rank stops here together, with no
        # collective in flight; a group left behind at exit makes NCCL warn
        dist.destroy_process_group()
    raise SystemExit(1)


@dataclasses.dataclass
class Saves:
    """What a resume would find: the last ``last.pt`` known written (path, step), and rank 0's
    write in flight (checkpoint.BackgroundWriter)."""
    path: str | None = None
    step: int | None = None
    writer: BackgroundWriter = dataclasses.field(default_factory=BackgroundWriter)

    def __str__(self):
        return "none has been written yet" if self.path is None else \
            f"{self.path} (step {self.step})"


# ================================================== evaluation, checkpoints, the probe
def evaluate(run, state, tag):
    """k-NN top-1 of the reported weights, every rank extracting the features of its share
    (eval.knn_accuracy), logged by rank 0 with the budget and the training time so far
    (figures.py compares runs on both)."""
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):             # evaluation must not move the RNG
        acc = protocols.knn_accuracy(run.evaluated, *run.knn_sets, run.device,
                                     num_workers=run.args.workers)
    if run.master:
        print(f"[{tag}] k-NN top-1 {acc:.1f} % (k=20, T=0.07, {len(run.knn_sets[1])} val images, "
              f"{len(run.knn_sets[0])} training images)", flush=True)
        log(run, dict(step=state.step, progress=state.spent / run.args.budget, knn=acc,
                      units=state.spent, train_wall=state.wall - state.eval_wall))
    state.eval_wall += time.time() - t0


def save(run, state, last_good, *paths, wait=False):
    """Save once to paths[0], copy to the others; last.pt goes last, as the commit point.
    Rank 0 writes in the background: the step loop waits for a host copy of the state, not
    for the disk; every rank learns how a write ended at the next save (``settle``), or here
    with ``wait`` (the final save, a preemption). Never a NaN model over a good one: a finite
    loss with an overflowing gradient leaves non-finite weights that no loss check sees."""
    settle(run, state, last_good)               # one write at a time
    check_losses(run, state, last_good)
    bad = [n for n, t in run.method.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        stop(run, f"error: non-finite weights after step {state.step} ({bad[0]}"
                  f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saved; "
                  f"the last good checkpoint is {last_good}")
    states = [None] * run.world                 # every rank's RNG streams, gathered to rank 0
    if run.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run.master:                              # unreadable files met so far (for the record)
        state.bad_files = sorted(set(state.bad_files) | getattr(run.train_base, "bad_files", set()))
        keep = [run.args.keep_last if os.path.basename(p) == "last.pt" else 1 for p in paths]
        last_good.writer.submit(dict(
            args=vars(run.args), vit_config=run.backbone.config(),
            method_kwargs=run.method_kwargs,
            method=run.method.state_dict(),                        # the backbone is inside it
            optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),  # fp16's scale
            state=dataclasses.asdict(state), rng=states, accel=run.accel.to_json(),
            strategy=str(run.accel.at(state.spent / run.args.budget))),
            paths, keep, tag=(paths[-1], state.step))
    if wait:
        settle(run, state, last_good)


def settle(run, state, last_good, collective=True):
    """Wait for rank 0's write in flight; every rank learns how it ended (``collective``;
    else rank 0 alone, when the others are lost). A failed write (disk full, I/O error) stops
    them all, the previous files intact; a written last.pt becomes the last good one."""
    outcome = [None, None]                      # (the write's tag: path, step; its error)
    if run.master:
        tag, error = last_good.writer.wait()
        outcome = [tag, error and error.strerror]
    if collective and run.world > 1:
        dist.broadcast_object_list(outcome, src=0, group=cpu_group())
    (path, step), error = outcome[0] or (None, None), outcome[1]
    if error:
        stop(run, f"error: {error} (the save after step {step}); the run stopped after step "
                  f"{state.step}: make room, then --resume (from {last_good})", final=False)
    if path and os.path.basename(path) == "last.pt":
        last_good.path, last_good.step = path, step


def at_fractions(run, state, last_good):
    """Evaluation and checkpoints at fractions of the budget, after a step."""
    args, progress = run.args, state.spent / run.args.budget
    if args.eval_every and progress < 1.0 and progress >= (state.evals_done + 1) * args.eval_every:
        state.evals_done = int(progress / args.eval_every)
        evaluate(run, state, f"{progress:.0%}")
    due = [f for f in args.ckpt_at if 0 < f <= progress and f not in state.ckpts_done]
    every_steps = args.save_every_steps and state.step % args.save_every_steps == 0
    if due or every_steps or progress >= 1.0 or progress >= (state.saves_done + 1) * args.save_every:
        state.saves_done = int(progress / args.save_every)
        state.ckpts_done += due
        # Stage checkpoints first, last.pt last: a kill in between resumes from the
        # previous last.pt and writes the stage checkpoints again.
        save(run, state, last_good, *[os.path.join(args.out, f"ckpt_{round(f * 100)}.pt")
                                      for f in due], os.path.join(args.out, "last.pt"),
             wait=progress >= 1.0)


def auto_probe(run, state):
    """--accel auto: CA-MSE of every --auto-grid strategy at the current weights (probe.py),
    on every rank in lockstep (the losses gather across ranks); rank 0's choice (the argmin,
    or the cheapest near it: --auto-tolerance) is the next stage. Every forward/backward pass
    of the probe is charged to the budget, so an auto run compares with a fixed schedule at
    equal total compute. The probe restores weights,
    buffers and RNG, so a resumed run that replays it makes the same choice."""
    args, n = run.args, len(state.auto)
    # bf16 as a step; fp16 steps' probe in float32 (the probe has no loss scale, and its fp16
    # gradients would underflow)
    with precision.autocast(run.device, "bf16" if run.precision == "bf16" else "fp32"):
        result = probe(run.method, run.view_set(), run.grid, args.method, run.cost,
                       progress=state.spent / args.budget, batches=args.auto_batches,
                       ref_batches=args.auto_batches, batch_size=args.batch_size // run.world,
                       seed=(args.seed + 1) * 7919 + 104_729 * n, views=args.views,
                       local_size=run.local_size)
    best = [best_strategy(result, args.auto_tolerance)]
    if run.world > 1:
        dist.broadcast_object_list(best, src=0)
    units = result["units_spent"] * run.world                 # every rank probed its batches
    state.auto.append(dict(start=args.auto_at[n], strategy=best[0], units=units,
                           seconds=result["seconds"]))
    state.spent += units
    run.accel = auto_schedule(state.auto)
    state.prices = [args.batch_size * run.price(s) for _, s in run.accel.stages]
    if run.master:
        with open(os.path.join(args.out, f"probe_{round(args.auto_at[n] * 100)}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"[auto {args.auto_at[n]:.0%}] probed {len(run.grid)} strategies in "
              f"{result['seconds']:.0f} s for {units:,.0f} units "
              f"({units / args.budget:.1%} of the budget) → {best[0]}", flush=True)
    log(run, dict(step=state.step, progress=state.spent / args.budget, auto=best[0],
                  probe_units=units, probe_seconds=result["seconds"],
                  rows=[{k: r[k] for k in ("strategy", "units", "ca_mse")} for r in result["rows"]]))


# ========================================================================== logging
def log(run, record):
    if run.master:
        with open(os.path.join(run.args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class Meter:
    """Throughput over the window since the last progress line: seconds waiting for data,
    seconds per step, steps."""
    t_log: float
    units: float
    data_wait: float = 0.0
    step_time: float = 0.0
    steps: int = 0
    warned: bool = False


def log_progress(run, state, meter, loss, stats):
    """The progress line and its log.jsonl record (the only place a step's numbers are read
    from the device); warns once when the loader, not the model, sets the pace."""
    args, now = run.args, time.time()
    progress = state.spent / args.budget
    rate = (state.spent - meter.units) / max(now - meter.t_log, 1e-9)         # units / s
    eta = max(args.budget - state.spent, 0.0) / max(rate, 1e-9)
    ips = meter.steps * args.batch_size / max(meter.step_time, 1e-9)
    strategy = run.label(run.accel.stages[state.stage][1])
    print(f"{min(progress, 1):6.1%} | step {state.step:6d} | loss {loss.item():.4f} | "
          f"lr {stats['lr']:.2e} | {ips:7.1f} img/s | {strategy} | ETA {hms(eta)}", flush=True)
    if meter.data_wait > 0.3 * meter.step_time and not meter.warned:   # once: the log keeps it
        meter.warned = True
        print(f"warning: the data loader, not the model, limits this run "
              f"({meter.data_wait / meter.step_time:.0%} of the step time waiting for batches); "
              "raise --workers (the share is logged as data_wait)", flush=True)
    log(run, {**{k: float(v) for k, v in stats.items()}, "step": state.step, "progress": progress,
              "loss": loss.item(), "units": state.spent, "strategy": strategy, "img_per_s": ips,
              "data_wait": meter.data_wait / meter.step_time, "wall": state.wall})
    meter.t_log, meter.units = now, state.spent
    meter.data_wait, meter.step_time, meter.steps = 0.0, 0.0, 0


def finish(run, state):
    """The last evaluation and the closing lines."""
    evaluate(run, state, "end")
    if run.master:
        # The k-NN passes read every training image here, so this set is complete.
        bad = sorted(set(state.bad_files) | getattr(run.train_base, "bad_files", set()))
        if bad:
            print(f"warning: {len(bad)} unreadable training image(s) were skipped, each replaced "
                  f"by the next readable one: {', '.join(bad[:5])}"
                  f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}", flush=True)
        print(f"done: {state.step} steps, {state.spent:,.0f} units, "
              f"{state.wall / 60:.1f} min; checkpoints in {run.args.out}", flush=True)
    if run.world > 1:
        dist.destroy_process_group()


def train(run, state, last_good, signals):
    """Steps until the budget is spent; after each, what is due at this fraction of it, and
    whether a preemption signal reached any rank."""
    args = run.args
    t_start, t_prev = time.time() - state.wall, time.time()
    meter = Meter(t_log=time.time(), units=state.spent)
    while state.spent < args.budget:
        run.sampler.set_epoch(state.epoch)
        run.sampler.set_start(state.batch_in_epoch)          # mid-epoch after a resume
        for batch, _ in run.loader:
            t_data = time.time()
            if args.accel == "auto" and len(state.auto) < len(args.auto_at) and \
                    state.spent / args.budget >= args.auto_at[len(state.auto)]:
                auto_probe(run, state)
                t_prev += time.time() - t_data         # probing is neither data wait nor step
            loss, stats = train_step(run, state, batch)
            now = time.time()
            meter.data_wait += t_data - t_prev
            meter.step_time += now - t_prev
            meter.steps += 1
            state.wall = now - t_start
            if state.step % CHECK_EVERY == 0:
                check_losses(run, state, last_good)
            if run.master and (now - meter.t_log >= args.log_every or state.spent >= args.budget):
                log_progress(run, state, meter, loss, stats)
            signum = signals.agreed(cpu_group())         # every rank, after every step: before
            if signum:                                   # an evaluation or save eats the grace
                preempt(run, state, last_good, signum)   # period
            at_fractions(run, state, last_good)
            t_prev = time.time()                     # evaluation / saving is not data wait
            if state.spent >= args.budget:
                break
        else:                                        # the epoch ran out before the budget
            state.epoch += 1
            state.batch_in_epoch = 0
    check_losses(run, state, last_good)


def preempt(run, state, last_good, signum):
    """A preemption signal (cluster.py): last.pt of this step, then every rank exits with
    status PREEMPTED (75); OUT/PREEMPTED says so to a requeue script that sees only torchrun's
    status. --resume continues as from any other save."""
    last = os.path.join(run.args.out, "last.pt")
    settle(run, state, last_good)                   # the write in flight, if any
    if (last_good.path, last_good.step) != (last, state.step):
        save(run, state, last_good, last, wait=True)
    message = (f"preempted by {signal_name(signum)} after step {state.step} "
               f"({state.spent / run.args.budget:.1%} of the budget): saved {last}; exit status "
               f"{PREEMPTED}; --resume continues from there")
    if run.master:
        print(message, flush=True)
        with open(os.path.join(run.args.out, "PREEMPTED"), "w") as f:
            f.write(message + "\n")
    if run.world > 1:
        dist.destroy_process_group()
    raise SystemExit(PREEMPTED)


def lost_rank(run, state, last_good, error):
    """A collective failed: a rank died (connection closed) or hangs (--dist-timeout). Every
    rank that sees it says so and exits 1, so torchrun ends (or, with --max-restarts and
    --resume, restarts) the group instead of leaving it waiting."""
    first = str(error).strip().splitlines()[0][:240]
    settle(run, state, last_good, collective=False)
    print(f"error: rank {run.rank} lost the other ranks after step {state.step} (waited up to "
          f"--dist-timeout {run.args.dist_timeout:g} min in a collective; a rank died or "
          f"hangs): {first}; the last good checkpoint is {last_good}",
          file=sys.stderr, flush=True)
    dist.destroy_process_group()            # else the pending collective aborts the process
    raise SystemExit(1)


def main(argv=None):
    args, parser = get_args(argv)
    with RunLock(args.out, holder=int(os.environ.get("RANK", 0)) == 0), \
            PreemptionSignals() as signals:
        run, state, resume_path = start(args, parser)
        last_good = Saves(resume_path, state.step if resume_path else None)
        try:
            if not resume_path:
                evaluate(run, state, "start")
                if 0.0 in args.ckpt_at:
                    save(run, state, last_good, os.path.join(args.out, "ckpt_0.pt"))  # stage 0
            try:
                train(run, state, last_good, signals)
            except RuntimeError as e:
                if run.world == 1 or not is_lost_rank(e):
                    raise
                lost_rank(run, state, last_good, e)
            finish(run, state)
        finally:                        # however the run ends (an error, a stop), no write
            last_good.writer.wait()     # outlives the lock on its folder


if __name__ == "__main__":
    main()
