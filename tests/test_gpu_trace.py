"""Every method's step, traced on fake CUDA tensors: no CPU tensor goes to the device, nothing
comes back to the host.

torch's ``FakeTensorMode`` runs ops on tensors that have a device (here "cuda", on a machine
without one) and a shape but no data; a dispatch mode beneath it sees every aten op with its
arguments. On a GPU, a CPU tensor mixed with device tensors is a host-to-device copy (a Python
scalar turned into a tensor for ``index_put_``, a position embedding computed on the host), and
``_local_scalar_dense`` (``.item()``, ``bool(t)``) or a copy to the CPU waits for the device:
either one stalls the queue between forward and backward. The trace is of the second step, so
that what a first step builds once (the patch-kernel resize map) is cached.

What runs where: the forward, the loss and the EMA / centre update on fake CUDA; the backward
on the ``meta`` device, because autograd's engine asks the CUDA driver for the device's context
before it runs a CUDA backward ("hasPrimaryContext expects a valid device index"), which a
machine without a GPU cannot answer. Meta tensors have no data either, and the same recorder
sees a CPU tensor mixed into the backward.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_trace.py
"""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import compress  # noqa: E402
import methods  # noqa: E402
import vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

METHODS = ("simclr", "moco", "dino", "multiview")
STRATEGY = "q:drop=0.5,patch=8;k:patch=8"         # token dropout and patch scaling both
READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose"}


class HostTraffic(TorchDispatchMode):
    """Every op that mixes a CPU tensor into ``device`` ops, copies one there, or reads a
    value back: ``found`` lists (op, shapes). A read gets a placeholder answer, so the trace
    goes on and names every offender, not only the first. With ``batches``, a non-blocking
    copy to the device is a batch crossing from the loader's pinned memory: listed in
    ``crossed``, not ``found``."""

    def __init__(self, device, batches=False):
        super().__init__()
        self.device, self.batches, self.found, self.crossed, self.ops = device, batches, [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        kinds = {t.device.type for t in tensors}
        if name in READS:
            self.found.append((name, "read back to the host"))
            return 0 if name == "_local_scalar_dense" else False
        if "cpu" in kinds and self.device in kinds:
            self.found.append((name, [(t.device.type, tuple(t.shape)) for t in tensors]))
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
            src, dst = (args[0], out) if name == "_to_copy" else (args[1], args[0])
            if isinstance(src, torch.Tensor) and {src.device.type, dst.device.type} == \
                    {"cpu", self.device}:
                way = "to the host" if dst.device.type == "cpu" else "from the host"
                asynchronous = kwargs.get("non_blocking") if name == "_to_copy" else \
                    (args[2] if len(args) > 2 else kwargs.get("non_blocking"))
                if self.batches and asynchronous and dst.device.type == self.device:
                    self.crossed.append(tuple(src.shape))
                else:
                    self.found.append((name, f"{tuple(src.shape)} copied {way}"))
        return out


def _method(name, device):
    """A 16-px ViT with the fixed sin-cos position embedding (MoCo-v3's), and the method."""
    torch.manual_seed(0)
    with torch.device(device):
        backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=2, heads=2,
                           pos_embed="sincos")
        return methods.build_method(name, backbone, **methods.head_sizes(name, backbone.dim))


def _on_fake_cuda(module, mode):
    """Every parameter and buffer of ``module`` as a fake CUDA tensor of ``mode``."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                fake = mode.from_tensor(t.detach())
                with mode:
                    fake = fake.to("cuda")
                table[key] = torch.nn.Parameter(fake, t.requires_grad) \
                    if isinstance(t, torch.nn.Parameter) else fake
    return module


def _views(name, device):
    """2 global views of 16 px (+ 2 local crops of 8 px for DINO), made on ``device``."""
    views = [torch.randn(4, 3, 16, 16, device=device) for _ in range(2)]
    if name == "dino":
        views += [torch.randn(4, 3, 8, 8, device=device) for _ in range(2)]
    return views


@pytest.fixture(autouse=True)
def own_map_cache(monkeypatch):
    """Fake and meta maps must not stay in vit's cache of resize maps."""
    monkeypatch.setattr(vit, "_MAPS", {})


@pytest.mark.parametrize("name", METHODS)
def test_forward_loss_and_ema_on_cuda_copy_nothing_from_or_to_the_host(name):
    mode = FakeTensorMode()
    method = _on_fake_cuda(_method(name, "cpu"), mode)
    with mode:
        views = _views(name, "cuda")
        strategy = compress.Strategy.parse(STRATEGY).resolve(len(views))
        for step in range(2):                          # the first fills the caches
            traffic = HostTraffic("cuda")
            with traffic:
                loss, stats = method(views, strategy.q, strategy.k, 0.3)
                method.update_target(0.3)
    assert loss.device.type == "cuda" and traffic.ops > 100, traffic.ops
    assert traffic.found == [], (name, traffic.found)


@pytest.mark.parametrize("name", METHODS)
def test_the_backward_copies_nothing_from_or_to_the_host(name):
    method = _method(name, "meta")
    views = _views(name, "meta")
    strategy = compress.Strategy.parse(STRATEGY).resolve(len(views))
    for step in range(2):
        loss, _ = method(views, strategy.q, strategy.k, 0.3)
        traffic = HostTraffic("meta")
        with traffic:
            loss.backward()
    assert traffic.ops > 50 and traffic.found == [], (name, traffic.found)


def test_a_batch_of_views_crosses_once_and_its_colour_ops_run_on_the_device():
    """train_step's input: the loader's uint8 crops (``--augment-on device``) cross as a
    non-blocking copy, their colour draws stay on the host (they are host values, read there to
    plan the ops) and cross once as colour_on_device's plan, and nothing else crosses."""
    import augment
    import data
    images = data.build_dataset("embedded", split="train", img_size=16, size=8)
    views = data.ViewDataset(images, augment.build_views("simclr", 16), seed=0,
                             colour_on="device")
    batch = torch.utils.data.default_collate([views[i] for i in range(8)])[0]   # 2 × (crops,
    mode = FakeTensorMode()                                                      # draws)
    batch = [(mode.from_tensor(crops), packed) for crops, packed in batch]   # draws: real, host
    with mode:
        for step in range(2):                          # the first makes the normalisers
            traffic = HostTraffic("cuda", batches=True)
            with traffic:
                out = [augment.to_model(view, "cuda") for view in batch]
    assert out[0].device.type == "cuda" and out[0].dtype == torch.float32
    assert traffic.found == [] and len(traffic.crossed) == 4, (traffic.found, traffic.crossed)


def test_the_recorder_sees_a_scalar_index_put_a_host_tensor_and_a_read():
    """The three faults the trace is for, each made on purpose."""
    mode = FakeTensorMode()
    with mode:
        x = torch.zeros(4, 4, device="cuda")
        rows = torch.arange(4, device="cuda")
        with HostTraffic("cuda") as traffic:
            x[rows, rows] = float("-inf")                   # a Python scalar becomes a CPU tensor
            x + torch.ones(4).to("cuda")                    # made on the host, then copied
            x.sum().item()                                  # waits for the device
    names = [name for name, _ in traffic.found]
    assert names[:1] == ["index_put_"] and "_to_copy" in names, traffic.found
    assert "_local_scalar_dense" in names, traffic.found


class Casts(TorchDispatchMode):
    """The dtypes that ``_to_copy`` casts to inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy":
            self.dtypes.append((kwargs or {}).get("dtype"))
        return func(*args, **(kwargs or {}))


def test_the_patch_kernel_is_resized_in_full_precision_under_autocast():
    """The (p², p0²) pseudo-inverse map is not cast to bf16 on every forward: the resized
    kernel comes out in the weights' float32 and equals the resize without autocast."""
    embed = vit.PatchEmbed(4, 3, 8)
    plain = embed.kernel(8)                                   # (fills the map's cache)
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
        under_autocast = embed.kernel(8)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)
    assert torch.bfloat16 not in casts.dtypes, casts.dtypes
