"""Running on several processes: process-group set-up and the cross-rank operations.

Concern: what makes N processes (torchrun, one per GPU; gloo on CPU) compute what one process
would compute on the concatenated batch (paper §6: the methods' negatives, keys, centre and
batch statistics are global). Each operation says why it is needed where it is used:

* ``gather_with_grad`` — SimCLR negatives: every rank's loss must send gradient back to the
  rank that produced each embedding (backward = all-reduce of the incoming gradient).
* ``gather_no_grad`` — MoCo-v3 keys, which come from the momentum encoder (no gradient).
* ``all_reduce_mean`` — DINO's centre, identical on every rank.
* ``GlobalBatchNorm1d`` — SyncBN for the projectors, written with all_gather / all_reduce so
  that it runs on gloo too. Without a process group all of these are identities.

    from distributed import setup_distributed, gather_with_grad
    rank, world, device = setup_distributed("auto")      # RANK / WORLD_SIZE from torchrun
    z_all = gather_with_grad(z)                          # (world·N, d), differentiable
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn


# ============================================================================ set-up
def setup_distributed(device_arg, timeout_minutes=30.0):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python runs as rank 0 of 1.
    A collective that waits longer than ``timeout_minutes`` for a rank (dead, or hanging)
    raises instead of waiting for ever (``is_timeout`` recognises it)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        device = torch.device("cuda", local_device(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Share the cores between the processes of this machine, unless OMP_NUM_THREADS says
        # how many threads to use (on a shared machine the user knows better).
        if not os.environ.get("OMP_NUM_THREADS"):
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=nccl_timeout(timeout))
        else:
            dist.init_process_group("gloo", timeout=timeout)
        global _CPU_GROUP           # small CPU messages beside nccl (every rank creates it)
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" \
            else None
    if (rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        # torchrun's store outlives the workers; a restarted group may read the addresses that
        # its dead predecessors published there and fail to connect (pytorch issue 135712).
        print("warning: restarts may fail to reconnect with torchrun's shared store; launch as "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone (or --rdzv-backend=c10d) "
              "... so that every restart gets a fresh one", flush=True)
    return rank, world, device


NCCL_MARGIN = datetime.timedelta(minutes=2)


def nccl_timeout(timeout):
    """NCCL's timeout: the gloo group's ``timeout`` plus NCCL_MARGIN.

    A hung rank is meant to be caught by the gloo all-reduce after every step (train.py), which
    raises, so that ``lost_rank`` names it and every rank exits 1. But the healthy ranks
    queued the step's NCCL work (gathers, DDP's all-reduce) before they reached that gloo call,
    and NCCL's watchdog counts from then: with equal timeouts it fires first and aborts the
    process (SIGABRT), and the message and the clean exit never run. The margin covers a step
    between the two, and lost_rank's teardown after gloo raises."""
    return timeout + NCCL_MARGIN


def local_device(local_rank, visible):
    """The index of this process's GPU among the ``visible`` ones: its local rank where every
    process sees all of the node's GPUs (torchrun), 0 where the launcher shows each process
    only its own (SLURM's --gpus-per-task, or CUDA_VISIBLE_DEVICES set per process)."""
    if visible < 1:
        raise RuntimeError("--device cuda, but no GPU is visible to this process")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but only {visible} GPUs visible: launch at "
                           f"most {visible} processes per node, or show each process one GPU")
    return local_rank


_CPU_GROUP = None


def cpu_group():
    """The process group for small CPU tensors (a flag per step): the default group under
    gloo; a gloo group of its own under nccl, so that no GPU stream is synchronised."""
    return _CPU_GROUP


def is_lost_rank(error):
    """Whether ``error`` is a collective that lost a rank: it outwaited the process group's
    timeout (a rank hangs) or its connection closed (a rank died). gloo and nccl raise these
    as RuntimeError (DistBackendError) naming one or the other."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("timed out", "timeout", "connection reset", "connection closed",
                            "broken pipe", "socket closed"))


# ================================================================ cross-rank helpers
# All helpers assume every rank holds the same number of samples (DistributedSampler with
# drop_last), which all_gather needs anyway. Without a process group they are identities.
def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradient over ranks, keeps our slice."""

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                       # (W·N, ...)

    @staticmethod
    def backward(ctx, grad):
        # Rank s's loss L_s depends on our rows through its copy of the gathered tensor, so
        # ∂(Σ_s L_s)/∂x_r = Σ_s (grad on rank s)[slice r]. DDP then divides by W, giving the
        # gradient of the mean loss over the global batch.
        rank, world = rank_world()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n]                          # (N, ...)


def gather_with_grad(x):
    """Concatenate x over ranks along dim 0, letting gradients flow back to their producer.

    Why: SimCLR's negatives (and GlobalBatchNorm1d's statistics) on rank s are embeddings
    produced on rank r, so rank s's loss must send gradient back to rank r. Only all_gather +
    all_reduce are used, so it runs on gloo (CPU) as well as nccl.
    """
    return x if rank_world()[1] == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x):
    """Concatenate x over ranks along dim 0, without gradient.

    Why: MoCo keys are targets (stop-gradient) from the momentum encoder, which takes no
    gradient anyway; a plain gather skips gather_with_grad's backward all-reduce.
    """
    rank, world = rank_world()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)                                           # (W·N, ...)


@torch.no_grad()
def all_reduce_mean(x):
    """Mean of x over ranks (a new tensor). Why: DINO's centre and logged values must be the
    same on every rank, i.e. statistics of the global batch, not of one rank's share."""
    world = rank_world()[1]
    x = x.detach().clone()
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics are those of the GLOBAL batch (all ranks).

    The projector / predictor BN of SimCLR and MoCo-v3 (SyncBN in the official code), written
    out with gather_with_grad so that gradient also flows through the mean and variance, and so
    that it runs on gloo. Same parameters and buffers as nn.BatchNorm1d (checkpoints load into
    either); with one process it equals nn.BatchNorm1d; in eval mode it uses the running stats.
    """

    def __init__(self, dim, affine=True, eps=1e-5, momentum=0.1):
        super().__init__(dim, eps=eps, momentum=momentum, affine=affine)

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (B, D) input, got shape {tuple(x.shape)}")
        n = x.shape[0] * rank_world()[1]                             # global batch size
        if n < 2:
            raise ValueError(f"batch statistics need a global batch of at least 2, got {n}")
        # Statistics in at least float32, also when autocast hands us bf16 / fp16 activations.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))       # (B, D)
        # μ = Σ_global x / n: gather each rank's (1, D) partial sum → (W, D) → (D,).
        mean = gather_with_grad(x32.sum(0, keepdim=True)).sum(0) / n
        xc = x32 - mean                                               # (B, D)
        # σ² = Σ_global (x − μ)² / n (biased, as BN normalises with); two passes for stability.
        var = gather_with_grad((xc * xc).sum(0, keepdim=True)).sum(0) / n
        y = xc * torch.rsqrt(var + self.eps)                          # x̂ = (x − μ)/√(σ² + ε)
        if self.affine:
            y = y * self.weight + self.bias                           # γ x̂ + β
        with torch.no_grad():                       # running statistics, as nn.BatchNorm1d
            r_mean, r_var = self.running_mean, self.running_var
            r_mean.lerp_(mean.to(r_mean.dtype), self.momentum)        # r ← (1−m)·r + m·μ
            r_var.lerp_((var * n / (n - 1)).to(r_var.dtype), self.momentum)   # unbiased σ²
            self.num_batches_tracked += 1
        return y.to(x.dtype)
