"""The step's precision by card, fp16's loss scale across a resume, and TF32 in the float32
islands (precision.py).

* The precision is a function of the compute capability alone: bf16 from 8.0, fp16 on 7.x
  (whatever ``torch.cuda.is_bf16_supported()`` says: it is True on a T4), float32 below.
* An fp16 run (forced here on the CPU, whose autocast and GradScaler take fp16 too) steps
  through the loss scaler, and a run preempted and resumed ends bitwise where an uninterrupted
  one ends: the scale is saved and restored with the weights.
* TF32, emulated by truncating every float32 matmul operand to 10 mantissa bits: the NT-Xent
  and DINO gradients stay within a fraction of what bf16 matmuls cost them.
"""
import os
import signal
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import losses  # noqa: E402
import precision  # noqa: E402
import protocols  # noqa: E402
import startup  # noqa: E402
import train  # noqa: E402
from options import get_args  # noqa: E402
from run import build_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ======================================================================= by the card
@pytest.mark.parametrize("capability, chosen", [((7, 0), "fp16"), ((7, 5), "fp16"),
                                                ((8, 0), "bf16"), ((9, 0), "bf16"),
                                                ((8, 9), "bf16"), ((6, 1), "fp32")])
def test_the_precision_is_a_function_of_the_compute_capability(capability, chosen):
    assert precision.precision_for(capability) == chosen


def test_a_t4_trains_and_evaluates_in_fp16_though_torch_counts_its_emulated_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert precision.device_precision(torch.device("cuda", 0)) == "fp16"
    assert precision.device_precision("cpu") == "fp32"
    seen = []
    monkeypatch.setattr(precision, "autocast", lambda device, p: seen.append(p))
    protocols._autocast(torch.device("cuda", 0))
    assert seen == ["fp16"]


TINY = ["--method", "moco", "--model", "cpu", "--img-size", "16", "--data-size", "128",
        "--batch-size", "16", "--eval-every", "0", "--log-every", "0"]


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Runs built from here on compute in fp16 with a loss scale that doubles every step (so
    that it overflows and halves within a few steps, and its state matters)."""
    monkeypatch.setattr(precision, "device_precision", lambda device: "fp16")
    monkeypatch.setattr(precision, "loss_scaler", lambda device, p: torch.amp.GradScaler(
        torch.device(device).type, enabled=p == "fp16", growth_interval=1))


def test_an_fp16_run_steps_through_its_loss_scale(fp16_on_cpu, monkeypatch):
    args, _ = get_args([*TINY, "--out", "unused"])
    run = build_run(args)
    assert run.precision == "fp16" and run.scaler.is_enabled() and run.cost.dtype == torch.float16
    calls = []
    for name in ("scale", "unscale_", "step", "update"):
        real = getattr(run.scaler, name)
        monkeypatch.setattr(run.scaler, name, lambda *a, _n=name, _r=real: calls.append(_n)
                            or _r(*a))
    state = startup.TrainState(prices=[args.batch_size * run.price(s) for _, s in run.accel.stages])
    with torch.random.fork_rng(devices=[]):
        train.train_step(run, state, next(iter(run.loader))[0])
    assert calls == ["scale", "unscale_", "step", "update"]       # unscaled before clipping


def test_a_preempted_fp16_run_resumes_bitwise_with_its_loss_scale(fp16_on_cpu, run_main,
                                                                 monkeypatch, tmp_path):
    args = [*TINY, "--budget", "0.8k"]
    code, text, _ = run_main([*args, "--out", str(tmp_path / "ref")])
    assert code == 0, text
    step_once = train.train_step

    def signalled_step(run, state, batch):           # SIGUSR1 (a preemption) after step 3
        out = step_once(run, state, batch)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out
    monkeypatch.setattr(train, "train_step", signalled_step)
    code, text, _ = run_main([*args, "--out", str(tmp_path / "run")])
    assert code == 75 and "preempted by SIGUSR1 after step 3" in text, text
    saved = checkpoint.load(tmp_path / "run" / "last.pt")["scaler"]
    assert saved["scale"] != 2.0 ** 16           # not a fresh scaler's: its restoring matters
    monkeypatch.setattr(train, "train_step", step_once)
    code, text, _ = run_main([*args, "--out", str(tmp_path / "run"), "--resume"])
    assert code == 0 and "resumed from" in text, text
    ref, run = (checkpoint.load(tmp_path / d / "last.pt") for d in ("ref", "run"))
    assert ref["state"]["step"] == run["state"]["step"] > 4
    assert ref["scaler"] == run["scaler"]
    weights = lambda ckpt: ckpt["method"]                                         # noqa: E731
    moments = lambda ckpt: {(i, k): v for i, s in ckpt["optimizer"]["state"].items()  # noqa: E731
                            for k, v in s.items()}
    for part in (weights, moments):
        a, b = part(ref), part(run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================= TF32 in the islands
aten = torch.ops.aten


def tf32(x):
    """x with TF32's 10 explicit mantissa bits: the low 13 of float32's 23 cut (truncated)."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def bf16(x):
    return x.to(torch.bfloat16).float()


class RoundedMatmuls(TorchDispatchMode):
    """Every float32 mm / addmm / bmm with its operands rounded by ``rnd`` (and its result, as
    a bf16 matmul under autocast returns bf16, with ``result``); ``count`` of them."""

    def __init__(self, rnd, result=False):
        super().__init__()
        self.rnd, self.result, self.count = rnd, result, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = func.overloadpacket
        if kind in (aten.mm, aten.addmm, aten.bmm) and args[-1].dtype == torch.float32:
            self.count += 1
            first = 1 if kind is aten.addmm else 0                       # not addmm's bias
            args = [self.rnd(a) if i >= first else a for i, a in enumerate(args)]
            out = func(*args, **(kwargs or {}))
            return self.rnd(out) if self.result else out
        return func(*args, **(kwargs or {}))


def _gradient_error(loss, inputs, mode):
    """‖g − g₆₄‖ / ‖g₆₄‖ of the gradient in float32 under ``mode`` against float64's."""
    def grad(dtype, mode=None):
        xs = [x.detach().to(dtype).clone().requires_grad_() for x in inputs]
        with mode or torch.enable_grad():
            loss(*xs).backward()
        return torch.cat([x.grad.flatten().double() for x in xs])
    ref = grad(torch.float64)
    return float((grad(torch.float32, mode) - ref).norm() / ref.norm())


def _nt_xent_inputs():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(128, 64, generator=g)
    return [z1, z1 + 0.5 * torch.randn(128, 64, generator=g)]          # positives correlated


def _dino_inputs():
    """Bottleneck features of 4 student crops and 4096 prototypes; the teacher's 2 crops
    (fixed, no gradient) near the first 2 student ones."""
    g = torch.Generator().manual_seed(0)
    student, prototypes = torch.randn(4 * 32, 128, generator=g), torch.randn(4096, 128, generator=g)
    teacher = student[:64] + 0.3 * torch.randn(64, 128, generator=g)
    return [student, prototypes], teacher


def _dino(student, prototypes, teacher):
    """Cosines to unit prototypes (DINOHead's last layer), then DINO's loss at τ_t = 0.04."""
    w = torch.nn.functional.normalize(prototypes, dim=1)                 # (K, d)
    s = torch.nn.functional.normalize(student, dim=1) @ w.T              # (4·N, K)
    t = torch.nn.functional.normalize(teacher.to(s.dtype), dim=1) @ w.T  # (2·N, K)
    return losses.dino_loss(list(s.chunk(4)), list(t.detach().chunk(2)),
                            torch.zeros(1, w.shape[0], dtype=s.dtype), 0.1, 0.04)


@pytest.mark.parametrize("name", ["nt_xent", "dino"])
def test_tf32_matmuls_keep_the_islands_gradients_well_within_what_bf16_costs(name):
    if name == "nt_xent":
        loss, inputs = (lambda a, b: losses.nt_xent(a, b, 0.2)), _nt_xent_inputs()
    else:
        inputs, teacher = _dino_inputs()
        loss = lambda s, w: _dino(s, w, teacher)                                 # noqa: E731
    as_tf32, as_bf16 = RoundedMatmuls(tf32), RoundedMatmuls(bf16, result=True)
    exact = _gradient_error(loss, inputs, None)
    err_tf32, err_bf16 = (_gradient_error(loss, inputs, m) for m in (as_tf32, as_bf16))
    assert as_tf32.count >= 3 and err_tf32 > 100 * exact           # the rounding took effect
    assert err_tf32 < 0.5 * err_bf16 and err_tf32 < 3e-3, (err_tf32, err_bf16)
