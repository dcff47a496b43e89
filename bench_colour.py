"""Speed of the colour ops on the training device: each op on its images against every op on
every image (bench.py --section colour).

Concern: ``augment.colour_on_device`` (--augment-on device, the resident views) before and
after it ran each op on just the images whose coin came up. Before, every jitter op ran on
every image in each of the four order rounds and ``torch.where`` kept the results of the
images that took it; that version is kept here, only to be timed against. Each is timed on
MoCo-v3's pair of views (view 1 blurs every image, view 2 a tenth and solarizes a fifth: the
recipes' own coins), interleaved, the median of the timed rounds; the aten ops of one call
are counted with a dispatch mode, with the passes over the batch they make (the elements they
write, over the batch's: what a GPU's memory traffic goes by), and the two must agree to one
level of 255.

    python bench.py --section colour --threads 1          # ≈ 20 s on an idle CPU thread
    python bench.py --section colour --device cuda
"""
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import augment
from bench_timing import sync

# (side, batch, timed rounds): the CPU preset's views and 224-px ones; on a GPU also batch 256
# at 224 px (on one CPU thread the version before takes ~10 s for one such view: skipped there)
COLOUR_SHAPES = {"cpu": ((32, 256, 5), (224, 32, 3)),
                 "cuda": ((32, 256, 20), (224, 32, 20), (224, 256, 20))}


def colour_every_op_on_every_image(crops, packed):
    """The colour ops as colour_on_device ran them before (for comparison only): packed on the
    crops' device, every op on the whole batch, kept where the image's coin came up."""
    x, p = crops.float() / 255, packed.to(crops.device)
    on = lambda taken, y, op_y: torch.where(taken[:, None, None, None] > 0, op_y, y)  # noqa: E731
    for j in range(4):
        for k, op in enumerate(augment._JITTER):
            x = on(p[:, 0] * (p[:, 5 + j] == k), x, op(x, p[:, 1 + k]))
    x = on(p[:, 9], x, augment._gray(x).expand(-1, 3, -1, -1))
    x = on(p[:, 10], x, augment._gaussian_blur(x, p[:, 11], augment.blur_size(x.shape[-1])))
    x = on(p[:, 12], x, torch.where(x >= 0.5, 1 - x, x))
    return augment.to_uint8(x)


VERSIONS = {"every op, every image": colour_every_op_on_every_image,
            "each op on its images": augment.colour_on_device}


class _Passes(TorchDispatchMode):
    """Counts the aten ops in the block, and the passes over the batch they make: the elements
    each op writes (views write none; index_copy_ writes its source), over the batch's."""

    def __init__(self, batch_elements):
        super().__init__()
        self.ops, self.passes, self.batch_elements = 0, 0.0, batch_elements

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if not func.is_view:
            written = args[3] if func.overloadpacket.__name__ == "index_copy_" else out
            self.passes += sum(t.numel() for t in torch.utils._pytree.tree_leaves(written)
                               if isinstance(t, torch.Tensor)) / self.batch_elements
        return out


def _pair(side, batch, device, seed=0):
    """MoCo-v3's two views of ``batch`` random uint8 crops: [(crops on device, packed on host)]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g)
             .to(device), augment.pack_colour([augment.draw_params(side, side, r, g)
                                               for _ in range(batch)]))
            for r in augment.build_views("moco", side)]


def bench_colour(args, device):
    print(f"# colour ops of MoCo-v3's two views (ms a pair of batches; {device}, "
          f"{torch.get_num_threads()} thread(s)): each op on just its images, against every "
          f"op on every image kept by torch.where")
    print(f"{'side':>5} {'batch':>6} {'every op (ms)':>14} {'its images (ms)':>16} "
          f"{'speed-up':>9} {'aten ops':>11} {'batch passes':>13} {'Δ lvl':>5}")
    results = []
    for side, batch, reps in COLOUR_SHAPES[device.type]:
        pair = _pair(side, batch, device)
        times, outs = {name: [] for name in VERSIONS}, {}
        for r in range(1 + reps):                         # one warm-up round, then timed ones
            for name, fn in VERSIONS.items():
                sync(device)
                t0 = time.perf_counter()
                outs[name] = [fn(crops, packed) for crops, packed in pair]
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - t0)
        counts = {}
        for name, fn in VERSIONS.items():             # view 1 (blur on every image)
            with _Passes(batch * 3 * side * side) as counts[name]:
                fn(*pair[0])
        diff = max(int((a.int() - b.int()).abs().max()) for a, b in zip(*outs.values()))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        (before, after), (c0, c1) = ms.values(), counts.values()
        row = dict(side=side, batch=batch, ms=ms, speedup=before / after, levels=diff,
                   ops={k: c.ops for k, c in counts.items()},
                   passes={k: c.passes for k, c in counts.items()})
        results.append(row)
        print(f"{side:>5} {batch:>6} {before:>14.1f} {after:>16.1f} {before / after:>8.1f}× "
              f"{c0.ops:>5}/{c1.ops:<5} {c0.passes:>6.0f}/{c1.passes:<6.1f} {diff:>5}", flush=True)
    return results
