"""Proxies, on a CPU, for what a first run on GPUs would meet: a training step that reads a
value back to the host, an op that raises under ``--deterministic`` on CUDA, device state tied
to the number of visible GPUs.

* Every method's step (forward with token dropout and patch scaling, backward, EMA) runs on
  the ``meta`` device, where tensors have no data: any ``.item()``, any list turned into a
  tensor on the host, any CPU tensor mixed in, fails there.
* The ops of train.train_step, recorded with a dispatch mode on CPU: none of them reads a
  value back (``.item()``, ``nonzero``, ``equal`` ...: a host sync on a GPU), and none is on
  PyTorch's list of ops that raise on CUDA under ``torch.use_deterministic_algorithms``.
* DINO's per-parameter gradient clipping in two fused passes gives the gradients of the loop
  it replaced; NCCL waits longer than the gloo check that is meant to catch a hung rank.
"""
import copy
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import compress  # noqa: E402
import distributed  # noqa: E402
import losses  # noqa: E402
import methods  # noqa: E402
import startup  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from options import get_args  # noqa: E402
from run import build_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

METHODS = ("simclr", "moco", "dino", "multiview")
STRATEGY = "q:drop=0.5,patch=8;k:patch=8"                 # dropout and patch scaling both

# Ops that wait for a device value on the host (aten names, overloads dropped).
SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal",
         "allclose", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive"}
# torch.use_deterministic_algorithms' "will throw a RuntimeError" list (torch 2.14), as the
# aten ops that run on CPU in their place (backward ops where it is their gradient that raises).
NONDETERMINISTIC_ON_CUDA = {
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward", "avg_pool3d_backward", "_adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward", "fractional_max_pool3d_backward", "max_unpool2d",
    "max_unpool3d", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward",
    "_embedding_bag_backward", "put_", "put", "histc", "bincount", "median",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward", "scatter_reduce"}


class OpRecorder(TorchDispatchMode):
    """The aten op names called inside the ``with`` block, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _views(method, device, n=4, size=16, local=8):
    views = [torch.randn(n, 3, size, size, device=device) for _ in range(2)]
    if method == "dino":
        views += [torch.randn(n, 3, local, local, device=device) for _ in range(2)]
    return views


@pytest.mark.parametrize("method", METHODS)
def test_every_methods_step_runs_on_the_meta_device(method):
    with torch.device("meta"):
        backbone = vit.build_vit("cpu", img_size=16)
        model = methods.build_method(method, backbone, **methods.head_sizes(method, backbone.dim))
    views = _views(method, "meta")
    strategy = compress.Strategy.parse(STRATEGY).resolve(len(views))
    loss, stats = model(views, strategy.q, strategy.k, 0.3)
    loss.backward()
    model.update_target(0.3)
    assert loss.device.type == "meta"
    assert all(v.device.type == "meta" for v in stats.values() if torch.is_tensor(v))
    assert all(torch.is_tensor(v) or k == "teacher_temp" for k, v in stats.items())  # a schedule
    assert backbone.blocks[0].attn.qkv.weight.grad.device.type == "meta"


@pytest.fixture(scope="module", params=METHODS)
def recorded(request):
    """The ops of three train.train_step calls of ``method`` (embedded data, batch 8, the
    strategy above, augmentation's colour ops on the device; DINO with its local crops and
    gradient clipping)."""
    method = request.param
    args, _ = get_args(["--method", method, "--model", "cpu", "--img-size", "16", "--data-size",
                        "64", "--batch-size", "8", "--eval-every", "0", "--accel", STRATEGY,
                        "--augment-on", "device", "--data-path", "workers",   # colour ops too
                        "--out", "unused"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # (a module fixture: before ``one_thread``)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        run = build_run(args)
        state = startup.TrainState(prices=[args.batch_size * run.price(s)
                                         for _, s in run.accel.stages])
        loader = iter(run.loader)
        batches = [next(loader)[0] for _ in range(4)]          # (the loader works on the host)
        train.train_step(run, state, batches[0])            # warm-up: caches, optimizer state
        with OpRecorder() as recorder:
            for batch in batches[1:]:
                train.train_step(run, state, batch)
    torch.set_num_threads(threads)
    return method, recorder.ops


def test_a_training_step_never_reads_a_value_back_to_the_host(recorded):
    method, ops = recorded
    assert len(ops) > 100                                      # the recorder saw the step
    assert not [op for op in ops if op in SYNCS], method


def test_no_op_of_a_step_raises_on_cuda_under_deterministic_algorithms(recorded):
    method, ops = recorded
    assert not sorted(set(ops) & NONDETERMINISTIC_ON_CUDA), method
    assert "mm" in ops or "addmm" in ops                       # the position-embedding map, etc.
    assert "round_" in ops and "reflection_pad2d" in ops       # the colour ops ran (blur too)


def test_the_position_embedding_resize_has_no_interpolation_backward():
    """The op the bicubic resize's gradient used to be: it raises on CUDA when deterministic."""
    model = vit.build_vit("cpu", img_size=16)
    with OpRecorder() as recorder:
        (model(torch.randn(2, 3, 16, 16), patch_size=8) @ torch.randn(model.dim)).sum().backward()
    assert "upsample_bicubic2d_backward" not in recorder.ops
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_the_ema_is_one_fused_pass_with_the_momentum_formula():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    before = [p.detach().clone() for p in target.parameters()]
    with OpRecorder() as recorder:
        losses.ema_update(target, online, 0.9)
    for b, p_t, p_o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(p_t, 0.9 * b + 0.1 * p_o.detach(), atol=1e-6, rtol=0)
    assert recorder.ops.count("_foreach_lerp_") == 1 and "add_" not in recorder.ops


# ============================================================ clipping, fused
def _clip_per_parameter(module, max_norm):
    """DINO's utils.clip_gradients as train.py ran it before: ~5 small kernels per parameter."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def test_the_fused_clipping_gives_the_gradients_of_the_per_parameter_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 8), torch.nn.Linear(8, 4, bias=False))
    loop = copy.deepcopy(model)
    for i, (p, q) in enumerate(zip(model.parameters(), loop.parameters())):
        p.grad = torch.randn_like(p) * (10.0 if i % 2 else 0.01)    # above the bound, below
        q.grad = p.grad.clone()
    model[2].bias.grad = loop[2].bias.grad = None            # a parameter without gradient
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert min(norms) < 0.5 < max(norms)
    _clip_per_parameter(loop, 0.5)
    with OpRecorder() as recorder:
        step.clip_gradients(model, 0.5)
    for p, q in zip(model.parameters(), loop.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert recorder.ops.count("_foreach_norm") == recorder.ops.count("_foreach_mul_") == 1
    assert "linalg_vector_norm" not in recorder.ops and len(recorder.ops) < 10, recorder.ops


# ============================================================== NCCL's timeout
def test_nccl_waits_longer_than_the_gloo_check_that_catches_a_hung_rank(monkeypatch):
    """Under nccl, the per-step agreement runs on a gloo group: its timeout must come first
    (distributed.nccl_timeout says why)."""
    made = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: made.append(
        (backend, timeout)))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: made.append(
        (backend, timeout)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "_CPU_GROUP", None)             # put back afterwards
    for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    distributed.setup_distributed("cuda", timeout_minutes=0.5)
    (nccl, t_nccl), (gloo, t_gloo) = made
    assert (nccl, gloo, t_gloo) == ("nccl", "gloo", datetime.timedelta(minutes=0.5))
    assert t_nccl - t_gloo >= datetime.timedelta(minutes=1)
    thirty = datetime.timedelta(minutes=30)
    assert distributed.nccl_timeout(thirty) - thirty == t_nccl - t_gloo     # a margin, any timeout


# ================================================== GPUs that are visible, or not
@pytest.mark.parametrize("local_rank, visible, device", [(0, 8, 0), (5, 8, 5), (5, 1, 0),
                                                         (0, 1, 0)])
def test_each_rank_takes_its_own_gpu_however_many_the_launcher_shows(local_rank, visible,
                                                                    device):
    assert distributed.local_device(local_rank, visible) == device


def test_more_processes_than_visible_gpus_is_refused_naming_both():
    with pytest.raises(RuntimeError, match="local rank 3 but only 2 GPUs visible"):
        distributed.local_device(3, 2)


def test_a_resume_restores_this_ranks_device_stream_whatever_the_saved_count(monkeypatch):
    """A checkpoint written where 8 GPUs were visible (one state each, the old format: rank r
    used GPU r) resumes where each process sees one (SLURM's one GPU per task): local rank 3
    takes entry 3; the new format holds only the rank's own state."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s))
    monkeypatch.setenv("LOCAL_RANK", "3")
    state = checkpoint.rng_state()
    for saved in ([torch.full((8,), i, dtype=torch.uint8) for i in range(8)],     # 8 GPUs
                  torch.full((8,), 7, dtype=torch.uint8)):                        # this one
        checkpoint.set_rng_state({**state, "cuda": saved})
    assert [int(s[0]) for s in restored] == [3, 7]
    monkeypatch.setenv("LOCAL_RANK", "9")                             # not among the saved
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 8})
    assert len(restored) == 2                                        # skipped, no error


# ===================================================== prices in the step's precision
def test_measured_prices_time_the_steps_batch_in_the_steps_precision(monkeypatch):
    """--cost measured times this rank's batch under the step's autocast (bf16 on a GPU; here
    asked for on the CPU), not float32 at a fixed batch of 32."""
    seen = []
    forward = vit.ViT.forward

    def recording_forward(self, images, *args, **kwargs):
        seen.append((images.shape[0], torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return forward(self, images, *args, **kwargs)
    monkeypatch.setattr(vit.ViT, "forward", recording_forward)
    model = vit.build_vit("cpu", img_size=16)
    compress.CostModel(model, "measured", batch=6, reps=1, dtype=torch.bfloat16)
    assert seen and set(seen) == {(6, True, torch.bfloat16)}
    args, _ = get_args(["--method", "moco", "--model", "cpu", "--img-size", "16", "--data-size",
                        "64", "--batch-size", "8", "--cost", "measured", "--out", "unused"])
    run = build_run(args, world=2, train=False)
    assert run.cost.batch == 4 and run.cost.dtype is None         # per rank; float32 on a CPU


def test_the_losses_float32_island_switches_autocast_off_on_their_own_device(monkeypatch):
    """heads.float32 takes its device from the tensors inside a list argument too (the losses
    take lists of embeddings): on a GPU it must switch CUDA's autocast off, not the CPU's."""
    import heads
    seen = []
    monkeypatch.setattr(heads, "full_precision", lambda device: seen.append(device) or
                        vit.full_precision(device))
    loss = heads.float32(lambda zs: sum(z.sum() for z in zs))
    loss([torch.ones(2, 3, device="meta"), torch.ones(2, 3, device="meta")])
    assert seen == [torch.device("meta")]
