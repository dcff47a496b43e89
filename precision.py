"""The number format a step computes in, by card: bf16 where the GPU has it, fp16 with a loss
scale where it has only fp16 tensor cores, float32 elsewhere; and TF32 for the float32 islands.

Concern: the precision of the training step, the probe and the evaluations as a function of
the device (run.py, train.py, protocols.py ask here; nothing else picks a dtype).

* **bf16 on compute capability ≥ 8.0** (A100, H100, L4, RTX 30xx/40xx): bf16 tensor cores, and
  bf16's float32 exponent range, so no loss scale. ``torch.cuda.is_bf16_supported()`` is not
  the test: it is True on a T4 (7.5) too, because it counts emulation, and there
  convolutions, matmuls and SDPA's fused kernels fall off their fast paths.
* **fp16 with a loss scale on 7.x** (V100 7.0, T4 7.5): fp16 is their only tensor-core format
  (125 and 65 TFLOPS against 15.7 and 8.1 in float32), so float32 would run 8× below the
  card; and fp16 with a GradScaler is what the official DINO and MoCo-v3 code train in (DINO
  on V100s). The price is fp16's range: the loss is multiplied by a scale s before the backward
  (gradients that would underflow in fp16 survive), divided out before clipping and AdamW,
  and a step whose gradients overflow is skipped while s halves (``torch.amp.GradScaler``).
  The scale is part of a run's state: checkpoints save it, a resume restores it.
* **float32 below 7.0** (P100 and older): no tensor cores, so fp16 would buy at most 2×
  (P100) for a loss scale and its skipped steps.
* On the CPU: float32 (bf16 is emulated on most CPUs, slower than float32).

The float32 islands (the losses, the heads' last layers, DINO's prototypes: heads.py) run
under autocast in float32 because bf16's 8 significant bits put ~1 % into their gradients.
Where the step is bf16 the card has TF32 tensor cores, and those islands' matmuls run in TF32
(``use_tf32``): 11 significant bits, float32's range and accumulation. Emulated on the CPU
(tests/test_precision.py), with the operands truncated to TF32 (the worse of the two
roundings), the error of the gradient is 0.05 % for NT-Xent and 0.2 % for DINO (its teacher
divides by 0.04), against 0.45 % and 0.9 % with bf16 matmuls; rounded to nearest, 0.05 % for
both: fp16's precision, in which the official codes computed their heads. Strict float32
would cost more than that is worth: DINO's 65536-prototype layer is ~1 % of a ViT-S/16 step's
FLOPs (2 global + 8 local crops), but at an H100's peak rates it would take ~12 % of the step
in float32 (67 TFLOPS), ~2 % in TF32 (495). The flag is process-wide (the backward runs
outside any context), so every float32 matmul of a training process is TF32, the k-NN
similarities of its evaluations included (eval.py's are float32).

    import torch, precision
    p = precision.precision_for((7, 5))             # "fp16": a T4
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.autocast("cpu", p):              # on a GPU, its device
        loss = model(torch.randn(8, 4)).float().pow(2).mean()
    scaler = precision.loss_scaler("cpu", p)        # a GradScaler for fp16, else a passthrough
    scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()
"""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}   # None: no autocast


def precision_for(capability):
    """"bf16" | "fp16" | "fp32" for a CUDA compute capability (major, minor) (module docstring)."""
    if tuple(capability) >= (8, 0):
        return "bf16"
    if tuple(capability) >= (7, 0):
        return "fp16"
    return "fp32"


def device_precision(device):
    """The precision of a step on ``device``: its card's (``precision_for``); float32 off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return precision_for(torch.cuda.get_device_capability(device))


def autocast(device, precision):
    """Autocast to ``precision``'s dtype on ``device``'s type; nothing for "fp32"."""
    if DTYPES[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def loss_scaler(device, precision):
    """A GradScaler for fp16; for bf16 and float32 a disabled one, whose scale, unscale_, step
    and update pass through (one code path for the step)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def use_tf32(precision):
    """TF32 for float32 matmuls in this process where the step is bf16 (module docstring)."""
    if precision == "bf16":
        torch.backends.cuda.matmul.allow_tf32 = True
