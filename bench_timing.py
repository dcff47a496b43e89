"""Timing a training step: interleaved rounds, medians, each phase apart (bench.py's tools).

Concern: how bench.py and bench_methods.py time what they compare — one callable per thing
timed, run round-robin so that slow drift of the machine falls on all alike, the median of the
timed rounds reported; AdamW built as train.py builds it.
"""
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_adamw(params, fused=None):
    """AdamW as train.py builds it: fused (one kernel for all parameters) where this torch has
    it for the device, else the foreach implementation. ``fused=False`` forces foreach."""
    params = list(params)
    if fused is not False:
        try:
            return torch.optim.AdamW(params, lr=1e-4, fused=True)
        except RuntimeError:
            if fused:
                raise
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


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
