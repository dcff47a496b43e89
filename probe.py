"""The gradient-error analysis (paper §5, Fig. 4): how good a compressed gradient is per unit of compute.

Concern: measuring, at given weights, how well a step under each compression strategy
estimates the gradient of the *uncompressed* objective, and what that costs. At a checkpoint
θ and batch size b (the run's global batch; under torchrun each rank computes its share and
the gradients are averaged over ranks):

    g*      = mean of K_ref uncompressed mini-batch gradients    (the reference)
    σ_0²    = Σ_i ‖g_i − g*‖² / (K_ref − 1)                      (its per-batch variance)
    ‖g‖²    = ‖g*‖² − σ_0²/K_ref                 (the true squared norm, unbiased:
                                                 E‖g*‖² = ‖g‖² + σ_0²/K_ref)
    ḡ_s     = mean of K mini-batch gradients under strategy s    (fresh views, fresh dropout)
    σ_s²    = Σ_k ‖g_{s,k} − ḡ_s‖² / (K − 1)                     (per-batch variance)
    bias²   = ‖ḡ_s − g*‖² − σ_s²/K − σ_0²/K_ref  (finite-sample corrected; kept as
                                                 bias2_raw, may be < 0; bias2 clips at 0)
    CA-var  = σ_s² · c_s / c_0      (for a fixed budget, s affords c_0/c_s times more samples)
    CA-MSE  = bias² + CA-var,       all three reported relative to ‖g‖².

An estimate of ‖g‖² near or below 0 means the reference is mostly noise (raise K_ref or b);
below SIGNAL_FLOOR·‖g*‖² it is clipped there and the result says so (``ref_norm2_clipped``):
the relative figures are then too small, though their order, hence the argmin, is unchanged.

Early in training, gradients are large and noisy: the variance term dominates and cheap,
aggressive compression wins. As training converges, the bias of a compressed gradient
becomes the larger error and milder compression wins. ``schedule.py build`` turns probes at
several stages into a stage schedule by argmin CA-MSE; ``train.py --accel auto`` probes
during its run. A strategy may also set ``views`` (more, cheaper views per sample; ``probe``
says what its bias then means), and ``plots.save_heatmaps`` draws the three terms over
drop × patch per stage, as the paper's Fig. 4.

    python probe.py --ckpt runs/simclr/ckpt_25.pt --grid "drop=0,0.5,0.75 patch=4,6,8" \
                    --out probe_25.json          # + probe_25.png heatmaps (Fig. 4)
    python probe.py --ckpt runs/simclr/ckpt_25.pt --grid "drop=0,0.75 views=2,4"
"""
import argparse
import json
import os
import sys
import time

import torch

import options
from augment import normalize
from checkpoint import BadCheckpoint, UntrustedCheckpoint, load_checked
from compress import NONE, local_crops
from distributed import all_reduce_mean, rank_world
from plots import save_heatmaps
from run import BadRun, build_run


# ======================================================================== estimator
class RunningGradientStats:
    """Mean and total variance of a stream of gradient vectors, one vector in memory.

    Welford's update, summed over coordinates: with δ = g_k − mean_{k−1},
    mean_k = mean_{k−1} + δ/k and M2 += ⟨δ, g_k − mean_k⟩, so that M2 = Σ_k ‖g_k − ḡ‖² at the
    end without storing the K gradients (float64: the variance can be tiny next to ‖ḡ‖²).
    """

    def __init__(self):
        self.k, self.mean, self.m2 = 0, None, 0.0

    def add(self, g):
        g = g.double()
        self.k += 1
        if self.mean is None:
            self.mean = g.clone()
            return
        delta = g - self.mean
        self.mean += delta / self.k
        self.m2 += float(delta @ (g - self.mean))

    @property
    def variance(self):
        """σ² = Σ_k ‖g_k − ḡ‖² / (K − 1), the per-batch variance (trace of the covariance)."""
        return self.m2 / (self.k - 1)


SIGNAL_FLOOR = 0.1          # ‖g‖² is clipped at this fraction of ‖g*‖² (module docstring)


def signal_norm2(ref_mean, ref_var, k_ref):
    """(‖g‖², clipped): the squared norm of the true gradient, without the reference's noise.

    g* is a mean of K_ref gradients of variance σ_0², so E‖g*‖² = ‖g‖² + σ_0²/K_ref and
    ‖g*‖² − σ_0²/K_ref is unbiased. When the noise swamps the signal the difference can fall
    to 0 or below; it is then clipped at SIGNAL_FLOOR·‖g*‖² and ``clipped`` is True.
    """
    ref2 = float(ref_mean @ ref_mean)
    signal2 = ref2 - ref_var / k_ref
    if signal2 <= SIGNAL_FLOOR * ref2:
        return SIGNAL_FLOOR * ref2, True
    return signal2, False


def error_terms(mean_s, var_s, k, ref_mean, ref_var, k_ref, cost_ratio):
    """bias², cost-adjusted variance and CA-MSE, relative to ‖g‖² (see the module docstring).

    bias2_raw is the unbiased estimate, which noise can make negative; bias2 (and CA-MSE)
    clip it at 0."""
    signal2, _ = signal_norm2(ref_mean, ref_var, k_ref)
    diff = mean_s - ref_mean
    # E‖ḡ_s − g*‖² = bias² + σ_s²/K + σ_0²/K_ref for independent estimates: subtract the noise.
    bias2_raw = float(diff @ diff) - var_s / k - ref_var / k_ref
    bias2 = max(bias2_raw, 0.0)
    ca_var = var_s * cost_ratio
    return dict(bias2=bias2 / signal2, bias2_raw=bias2_raw / signal2, ca_var=ca_var / signal2,
                ca_mse=(bias2 + ca_var) / signal2, var=var_s / signal2)


def probe(method, view_set, strategies, method_name, cost, progress=0.0, batches=8,
          ref_batches=8, batch_size=64, seed=0, views=2, local_size=None):
    """Gradient-error analysis of ``strategies`` at the current weights of ``method``.

    view_set: a data.ViewDataset (its epochs are used as fresh-augmentation draws: the
    reference uses epochs 1_000_000 + i, strategy batch k uses 2_000_000 + k, so the
    reference is independent of the estimates, and all strategies share their K batches —
    common random numbers make the comparison between strategies less noisy).

    views: the run's own number of views M_0 (DINO: 2 + local crops). The reference g* is the
    UNCOMPRESSED gradient at M_0 views, and every strategy is resolved at M_0
    (compress.Strategy.resolve): one that names no view count runs at M_0. A strategy with
    views = M needs batches of M views: the view set makes the most views of the grid
    (run.view_recipes; DINO: more local crops) and every gradient takes the first M of them,
    so all strategies still share their batches. Its cost c_s is charged for M views
    (``local_size``: DINO's local crops).

    What bias² means with more views: g* is the gradient of the M_0-view objective, and an
    M-view step estimates a slightly different one (SimCLR's multi-positive NT-Xent and the
    multi-view loss change with M; MoCo and DINO average over other pairs of crops). Its bias²
    therefore mixes compression error with that change of objective, and is not zero even
    uncompressed. The second paper argues the M-view objective is the better estimate of the
    ideal (augmentation-kernel) loss, so this part of the "bias" may point towards a better
    target; the probe cannot tell the two apart. Read it as the distance from the run's own
    gradient. Its variance term is what more views buy: less noise per sample, at M/M_0 the cost.

    Under torchrun every rank calls this in lockstep with the same ``seed`` and its own
    share ``batch_size``: the ranks draw the indices of ONE global batch of world·batch_size
    images from that seed, each takes its slice, and every gradient is averaged over ranks,
    so the probe measures the gradient (and the variance) of the global batch, as one process
    on the concatenated batch would. Token dropout draws per rank (seeded seed + rank).
    ``units_spent`` is this rank's share.

    Weights and buffers (BatchNorm statistics, DINO centre) are restored afterwards and the
    global RNG is left untouched. Returns a dict with one row per strategy.
    """
    run, resolved = _resolve_views(strategies, views, view_set, method_name)
    t0 = time.time()
    ref, stats = _gradient_stats(method, view_set, run, resolved, progress, batches,
                                 ref_batches, batch_size, seed)
    # c_s / c_0 with every view charged (DINO: M − 2 of them local crops)
    price = dict(local_size=local_size, symmetric=getattr(method, "symmetric", True))
    c0 = cost.sample_units(method_name, run, **price)
    rows = []
    for s, r, st in zip(strategies, resolved, stats):
        cs = cost.sample_units(method_name, r, **price)
        rows.append(dict(strategy=str(s), drop=s.q.drop, patch=s.q.patch_size, views=r.views,
                         units=cs, **error_terms(st.mean, st.variance, batches, ref.mean,
                                                 ref.variance, ref_batches, cs / c0)))
    # What the probe itself cost, in units: every gradient is a training step's forward+backward.
    spent = batch_size * (ref_batches * c0 + batches * sum(r["units"] for r in rows))
    signal2, clipped = signal_norm2(ref.mean, ref.variance, ref_batches)
    return dict(progress=progress, batch_size=batch_size, world=rank_world()[1],
                batches=batches, ref_batches=ref_batches, views=views,
                base_patch=getattr(cost.model, "patch_size", None),
                ref_norm2=float(ref.mean @ ref.mean), ref_norm2_corrected=signal2,
                ref_norm2_clipped=clipped, ref_var=ref.variance, units_spent=spent,
                seconds=time.time() - t0, rows=rows)


def _resolve_views(strategies, views, view_set, method_name):
    """The run's own strategy (uncompressed at M_0 = ``views``) and each strategy resolved at
    M_0; an error if the view set makes fewer views than the most any of them needs."""
    run = NONE.resolve(views)
    resolved = [s.resolve(views) for s in strategies]
    most, have = max([views] + [s.views for s in resolved]), len(view_set.recipes)
    if most > have:
        raise ValueError(f"a strategy (or the run) needs {most} views but the view set makes "
                         f"{have}; build its recipes with views={most}"
                         + (f" (local_crops={local_crops('dino', most)})"
                            if method_name == "dino" else ""))
    return run, resolved


def _gradient_stats(method, view_set, run, resolved, progress, batches, ref_batches,
                    batch_size, seed):
    """The reference g* (``ref_batches`` uncompressed gradients) and, per strategy, the
    running mean and variance of its gradient over the same ``batches`` batches; weights,
    buffers, train/eval mode and the global RNG as they were."""
    params = [p for p in method.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in method.named_buffers()}       # BN statistics, DINO centre
    device = params[0].device
    was_training = method.training
    method.train()
    g = torch.Generator().manual_seed(seed)            # the same stream on every rank
    batch = lambda epoch: _probe_batch(view_set, epoch, g, batch_size, device)   # noqa: E731
    grad = lambda views, s: _flat_gradient(method, params, buffers, views, s, progress)  # noqa: E731
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank_world()[0])                       # dropout subsets
        ref = RunningGradientStats()
        for i in range(ref_batches):
            ref.add(grad(batch(1_000_000 + i), run))
        stats = [RunningGradientStats() for _ in resolved]
        for k in range(batches):
            batch_views = batch(2_000_000 + k)
            for s, st in zip(resolved, stats):
                st.add(grad(batch_views, s))
    method.zero_grad(set_to_none=True)
    method.train(was_training)
    return ref, stats


def _probe_batch(view_set, epoch, g, batch_size, device):
    """This rank's share of one global batch drawn from g (the same stream on every rank), its
    views made at ``epoch`` (a fresh augmentation draw): views × (b, 3, s, s)."""
    rank, world = rank_world()
    view_set.set_epoch(epoch)
    everyone = torch.randint(len(view_set), (world * batch_size,), generator=g)
    idx = everyone[rank * batch_size:(rank + 1) * batch_size].tolist()   # this rank's share
    fetch = getattr(view_set, "__getitems__", None)                   # batched augmentation
    items = [v for v, _ in fetch(idx)] if fetch else [view_set[i][0] for i in idx]
    return [normalize(torch.stack(v).to(device)) for v in zip(*items)]


def _flat_gradient(method, params, buffers, views, strategy, progress):
    """The gradient of one step's loss (a resolved strategy: its first M views) as one vector,
    buffers restored afterwards. The losses
    gather across ranks, so the mean of the ranks' gradients is the gradient of the global
    batch (what DDP hands the optimiser); one rank's alone is not."""
    method.zero_grad(set_to_none=True)
    loss, _ = method(views[:strategy.views], strategy.q, strategy.k, progress)
    loss.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    method.load_state_dict(buffers, strict=False)                     # undo BN / centre updates
    return all_reduce_mean(grad) if rank_world()[1] > 1 else grad


def print_table(result, out=sys.stdout):
    world = result.get("world", 1)
    signal = (f"‖g‖² = {result['ref_norm2_corrected']:.3e}"
              + (" (clipped: the reference is mostly noise)" if result["ref_norm2_clipped"] else "")
              if "ref_norm2_corrected" in result else "")
    print(f"progress {result['progress']:.0%} | batch {result['batch_size']}"
          f"{f' × {world} processes' if world > 1 else ''} | K={result['batches']} "
          f"K_ref={result['ref_batches']} | reference: {result.get('views') or '?'} views | "
          f"‖g*‖² = {result['ref_norm2']:.3e}{', ' + signal if signal else ''} | "
          f"{result['seconds']:.0f} s, {result['units_spent']:,.0f} units", file=out)
    w = max([28] + [len(r["strategy"]) for r in result["rows"]])
    print(f"{'strategy':<{w}} {'views':>5} {'units':>6} {'bias²':>9} {'CA-var':>9} {'CA-MSE':>9}",
          file=out)
    for r in sorted(result["rows"], key=lambda r: r["ca_mse"]):
        print(f"{r['strategy']:<{w}} {r.get('views') or '-':>5} {r['units']:6.2f} "
              f"{r['bias2']:9.4f} {r['ca_var']:9.4f} {r['ca_mse']:9.4f}", file=out)


# ================================================================================ CLI
def checkpoint_args(saved):
    """A checkpoint's train.py flags, with the defaults for flags added since it was written;
    the run's schedule is replaced by the probe's grid (probed as an auto run would)."""
    args = options.build_parser().parse_args([])
    vars(args).update(saved)
    return args


def probe_checkpoint(args):
    """probe() of ``args.grid`` at a train.py checkpoint, the run rebuilt from its flags."""
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: --ckpt {args.ckpt}: no such checkpoint")
    try:
        ckpt = load_checked(args.ckpt, args.trust_checkpoint)     # weights only, checksum
    except UntrustedCheckpoint as e:
        raise SystemExit(f"error: {e}") from None
    except BadCheckpoint as e:
        raise SystemExit(f"error: --ckpt {args.ckpt}: {e}") from None
    if "method" not in ckpt or "args" not in ckpt:
        raise SystemExit(f"error: {args.ckpt} is not a train.py checkpoint (no 'method'/'args')")
    targs = checkpoint_args(ckpt["args"])
    targs.accel, targs.auto_grid = "auto", args.grid      # the grid sets the views per batch
    try:
        run = build_run(targs, train=False)
    except BadRun as e:
        raise SystemExit(f"error: --grid / {args.ckpt}: {e}")
    run.method.load_state_dict(ckpt["method"])
    progress = ckpt["state"]["spent"] / targs.budget
    # The run's own (global) batch unless told otherwise: the variance term scales with 1/b,
    # so a probe at another batch would weigh bias against variance for another run.
    batch_size = targs.batch_size if args.batch_size is None else args.batch_size
    result = probe(run.method, run.view_set(), run.grid, targs.method, run.cost, progress,
                   args.batches, args.ref_batches, batch_size, args.seed, views=targs.views,
                   local_size=run.local_size)
    result["ckpt"] = args.ckpt
    print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    png = args.png or (os.path.splitext(args.out)[0] + ".png" if args.out else None)
    if png and save_heatmaps([result], png):
        print(f"heatmaps → {png}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="bias², cost-adjusted variance and CA-MSE of "
                                 "compression strategies at a train.py checkpoint (paper §5)")
    ap.add_argument("--ckpt", required=True, help="a train.py checkpoint, e.g. runs/simclr/ckpt_25.pt")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load a checkpoint that holds more than tensors and plain types by "
                         "unpickling it fully, which runs any code it carries: only a file you "
                         "trust (without it such a file is refused)")
    ap.add_argument("--grid", default="drop=0,0.25,0.5,0.75 patch=4,6,8",
                    help="strategies: drop=…, patch=…, roles=paper|q|qk, views=2,4 (product of "
                         "the lists; views unset = the run's own)")
    ap.add_argument("--batches", type=int, default=8, help="K gradients per strategy")
    ap.add_argument("--ref-batches", type=int, default=8, help="K_ref uncompressed gradients for g*")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per gradient; default: the checkpoint's run's (global) batch, "
                         "since the variance term scales with 1/b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON")
    ap.add_argument("--png", default=None, help="heatmaps of CA-MSE, bias², CA-var (Fig. 4; needs "
                    "matplotlib); default: the --out path with .png")
    args = ap.parse_args(argv)
    if args.batches < 2 or args.ref_batches < 2:
        ap.error("--batches and --ref-batches must be ≥ 2 (a variance needs two samples)")
    if args.batch_size is not None and args.batch_size < 2:
        ap.error(f"--batch-size {args.batch_size} must be ≥ 2 (contrastive losses need negatives)")
    return probe_checkpoint(args)


if __name__ == "__main__":
    main()
