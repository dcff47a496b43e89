"""Views made where the images live: the training set resident on the training device (§6.1).

Concern: making each step's views without a loader of pixels. The paper's speed-up is time
only if views arrive as fast as the cheapest (most compressed) step consumes them; loader
processes that crop, colour and ship every view cannot keep up with one GPU (docs/speed.md).
So the training images are held as one uint8 (N, 3, H, W) tensor on the training device
(``ResidentImages``: CIFAR/STL's arrays, the embedded set, an image folder's decode-once cache),
and each step's views are made there from the batch's indices, in a few batched ops:

    indices ──▶ gather (B, 3, H, W) ──▶ crop + resize + flip: Wy @ x @ Wxᵀ ──▶ colour ops ──▶ model

The random draws stay exactly those of the loader path: ``augment.draw_params`` from the
generator of (seed, epoch, index) (``ViewDraws``), so a view is pure in those three, ranks
draw their shares as before (data.ResumableSampler) and a resume is bitwise. Drawing is host
Python (~15 µs a view); a DataLoader over ``ViewDraws`` makes it in worker processes when
--workers > 0 (overlapping the step), returning only indices and packed draws (a few hundred
bytes a batch): pixels never leave the device.

    import torch, augment, data, resident
    base = data.build_dataset("embedded", size=256)
    images = resident.place(base, torch.device("cpu"))           # uint8 (256, 3, 32, 32)
    recipes = augment.build_views("simclr", 32)
    sampler = data.ResumableSampler(len(images), batch_size=64)
    loader = resident.build_resident_loader(images, recipes, 64, sampler)
    views, labels = next(iter(loader))            # 2 × uint8 (64, 3, 32, 32), made here
"""
import dataclasses
import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

import augment
import data
from embedded import TensorImages, mix_seed
from imagecache import CachedImages

RESERVE = 0.5       # of the device's memory, left to the model, its activations and optimiser


# ===== crop, resize and flip of a whole batch: two batched matmuls =====
#
# torchvision's resized_crop(antialias=True) (the reference, augment.augment) resamples each axis
# with aten's antialiased bilinear filter (_upsample_bilinear2d_aa). For a box of length L
# resized to s pixels, output pixel i is a weighted mean of the box's source pixels j:
#     scale = L / s,   centre c_i = scale·(i + ½),   support σ = max(scale, 1),
#     w_ij ∝ max(0, 1 − |j + ½ − c_i| / σ)   over 0 ≤ j < L, normalised to sum 1 per i.
# Shrinking (scale > 1), the triangle widens to σ source pixels each side: that is the
# antialiasing DINO's downscaled local crops need. Written as a matrix over the whole image
# axis (zero outside the box), one image's view is  Wy · x · Wxᵀ  per channel, and a flip is
# Wx with its rows reversed. All B images at once: (B,1,s,H) @ (B,3,H,W) @ (B,1,W,s).

def resample_weights(start, length, size, extent):
    """Antialiased bilinear weights of boxes [start, start + length) of an axis of ``extent``
    pixels, resized to ``size``: start, length (B,) on any device → float (B, size, extent)."""
    scale = (length.float() / size)[:, None, None]                             # (B, 1, 1)
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(size, device=start.device) + 0.5)[:, None]   # (B, s, 1)
    j = torch.arange(extent, device=start.device) - start[:, None, None]        # (B, 1, extent)
    w = (1 - (j + 0.5 - centre).abs() / support).clamp(min=0)
    w = w * ((j >= 0) & (j < length[:, None, None]))                            # inside the box
    return w / w.sum(-1, keepdim=True)


def crop_flip_matmul(images, boxes, flips, size):
    """RandomResizedCrop's crop + resize and the flip, for a batch: uint8 images (B, 3, H, W),
    boxes (B, 4) long (top, left, height, width), flips (B,) bool, all on one device → float
    (B, 3, size, size) in [0, 1], the reference's resized_crop to float rounding."""
    top, left, height, width = boxes.unbind(1)
    wy = resample_weights(top, height, size, images.shape[-2]) / 255          # (B, s, H)
    wx = resample_weights(left, width, size, images.shape[-1])                # (B, s, W)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx)                    # mirrored columns
    return wy[:, None] @ images.float() @ wx[:, None].transpose(-1, -2)      # (B, 3, s, s)


# ===== the images, where the model is =====

class NotResident(ValueError):
    """The training images cannot be held where the views are made; the message says why, the
    bytes, and the alternatives."""


@dataclasses.dataclass
class ResidentImages:
    """The training split as one uint8 (N, 3, H, W) tensor and its labels (N,): on ``device``,
    or, where it does not fit there, pinned in host memory, of which each step copies only its
    batch's images over (asynchronously)."""
    images: torch.Tensor
    labels: torch.Tensor
    device: torch.device

    def __len__(self):
        return len(self.images)

    @property
    def on_device(self):
        return self.images.device.type == self.device.type

    def gather(self, indices):
        """indices (B,) long on the host → uint8 (B, 3, H, W) on the device."""
        if self.on_device:
            return self.images[indices.to(self.device, non_blocking=True)]
        batch = torch.empty((len(indices), *self.images.shape[1:]), dtype=torch.uint8,
                            pin_memory=self.device.type == "cuda")
        torch.index_select(self.images, 0, indices, out=batch)
        return batch.to(self.device, non_blocking=True)


def array_shape(base):
    """(N, 3, H, W) of a dataset that is one array — TensorImages (CIFAR, STL, the embedded
    set) or an image cache (imagecache.CachedImages) — else NotResident."""
    if isinstance(base, TensorImages):
        return tuple(base.images.shape)
    if isinstance(base, CachedImages):
        return (len(base.index), 3, base.size, base.size)
    root = getattr(base, "root", "ROOT")
    raise NotResident(
        f"the image folder '{root}' is not one array of decoded images: decoding it once at "
        f"every start would take longer than many steps. Decode it once into a cache, "
        f"'python imagecache.py --data-root {root} --out CACHE --size 256', and train with "
        f"--data-cache CACHE; or keep --data-path workers")


def load_array(base, device, chunk=2**30):
    """The images of ``base`` (array_shape's kinds) as one uint8 tensor on ``device``. A cache
    is copied from its memory map ``chunk`` bytes at a time, so that a 25-GB cache bound for a
    GPU never needs 25 GB of host memory (nor 8× that for 8 ranks on a node)."""
    if isinstance(base, TensorImages):
        return base.images.to(device)
    cache = np.load(base.path, mmap_mode="r")                                  # (N, 3, S, S)
    out = torch.empty(array_shape(base), dtype=torch.uint8, device=device)
    step = max(1, chunk // out[0].numel())
    for i in range(0, len(out), step):
        out[i:i + step] = torch.from_numpy(cache[base.index[i:i + step].numpy()])
    return out


def free_bytes(device):
    """(bytes free on ``device``, its total); for the CPU, the available host memory twice."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free, free


def placement(nbytes, device, in_host_memory):
    """Where ``nbytes`` of images go: "device", "host" (pinned; CUDA only), or NotResident,
    naming the bytes and the alternatives. A device keeps ``RESERVE`` of its memory for the
    model; host memory, half of what is available (an array already there costs nothing)."""
    free, total = free_bytes(device)
    if device.type == "cuda" and nbytes <= free - RESERVE * total:
        return "device"
    host_free = free_bytes(torch.device("cpu"))[0]
    if in_host_memory or nbytes <= host_free / 2:
        return "host"
    gb = lambda b: f"{b / 1e9:.1f} GB"                                      # noqa: E731
    where = (f"{gb(free)} free on {device} (of which {gb(RESERVE * total)} is kept for the "
             f"model) and " if device.type == "cuda" else "")
    raise NotResident(
        f"the training images take {nbytes:,} bytes ({gb(nbytes)}): more than {where}half of "
        f"the {gb(host_free)} of available host memory. Train with --data-path workers (loader "
        f"processes read the images as they go), or a smaller cache (imagecache.py --size)")


def place(base, device):
    """The training images ``base`` as ResidentImages on ``device`` (or pinned on the host),
    or NotResident saying why not."""
    nbytes = int(np.prod(array_shape(base)))
    where = placement(nbytes, device, isinstance(base, TensorImages))
    labels = base.labels                      # (a cache's: already those of its index)
    if where == "device" or device.type == "cpu":
        return ResidentImages(load_array(base, device), labels, device)
    return ResidentImages(load_array(base, torch.device("cpu")).pin_memory(), labels, device)


# ===== the draws: exactly those of the loader path =====

class Draws(NamedTuple):
    """One batch's draws, host tensors: what a draw worker sends (~100 bytes an image)."""
    indices: torch.Tensor       # (B,) long
    labels: torch.Tensor        # (B,) long
    boxes: torch.Tensor         # (V, B, 4) long: top, left, height, width
    flips: torch.Tensor         # (V, B) bool
    colour: tuple               # V × (B, 13) float: augment.pack_colour (the colour ops plan
    #                             their passes from these host numbers)


class ViewDraws(Dataset):
    """The draws of data.ViewDataset without its pixels: item i's generator in epoch e is
    seeded by mix_seed(seed, e, i) and draws view after view with augment.draw_params, so the
    boxes, flips and colour factors are the loader path's. A batch (``__getitems__``) → Draws.
    It holds no image, so DataLoader workers receive a few numbers, not the dataset."""

    def __init__(self, images, recipes, seed=0):
        self.n, self.labels = len(images), images.labels.cpu()
        self.height, self.width = images.images.shape[-2:]
        self.recipes, self.seed = list(recipes), seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def __len__(self):
        return self.n

    def _generator(self, i):
        return torch.Generator().manual_seed(mix_seed(self.seed, int(self._epoch), i))

    def __getitems__(self, indices):
        params = [[augment.draw_params(self.height, self.width, r, g) for r in self.recipes]
                  for g in map(self._generator, indices)]                   # B × V, as ViewDataset
        by_view = list(zip(*params))                                        # V × B ViewParams
        return Draws(torch.tensor(indices), self.labels[indices],
                     torch.tensor([[p.box for p in ps] for ps in by_view]),
                     torch.tensor([[p.flip for p in ps] for ps in by_view]),
                     tuple(augment.pack_colour(ps) for ps in by_view))


def same_batch(draws):
    """DataLoader's collate for ViewDraws: a batch is already one Draws."""
    return draws


# ===== the views =====

MATMUL_MAX_SIDE = 64    # on a CPU, images up to this side are cropped by matmuls (see below)


def make_views(images, draws, recipes):
    """The batch's views, made on the images' device: V × uint8 (B, 3, s, s). The only copies
    to the device are the indices, boxes and flips (and, inside the colour ops, their plan).

    The crop: two batched matmuls (``crop_flip_matmul``; augment.crop_flip is the image-by-
    image one) on a GPU, where arithmetic is cheap and each call costs a launch. A CPU has it
    the other way round: the matmuls multiply every source
    pixel by a weight that is mostly zero (H·W·s products a channel, where the antialiased
    filter needs a few taps), so above MATMUL_MAX_SIDE it crops image by image with the
    reference's own F.interpolate (augment.resized_crops; bench.py --section loader: at 32 px
    the matmuls are ~4× faster than that loop, at 256 → 224 px ~2–4× slower)."""
    x = images.gather(draws.indices)                                         # (B, 3, H, W)
    boxes, flips = (t.to(images.device, non_blocking=True) for t in (draws.boxes, draws.flips))
    per_image = images.device.type == "cpu" and max(x.shape[-2:]) > MATMUL_MAX_SIDE
    views = []
    for v, r in enumerate(recipes):
        if per_image:
            crops = augment.resized_crops(x, draws.boxes[v].tolist(), r.size)  # (B, 3, s, s)
            crops = torch.where(flips[v][:, None, None, None], crops.flip(-1), crops)
        else:
            crops = crop_flip_matmul(x, boxes[v], flips[v], r.size)
        views.append(augment.colour_on_device(crops, draws.colour[v]))
    return views


def build_resident_loader(images, recipes, batch_size, sampler, seed=0, num_workers=0):
    """ResidentLoader over ``sampler`` (a data.ResumableSampler: epochs, ranks, resumes), its
    draws made by ``num_workers`` loader processes (0: here), pinned for an async copy on CUDA."""
    draws = ViewDraws(images, recipes, seed=seed)
    loader = data.build_loader(draws, batch_size, sampler, num_workers=num_workers,
                               pin_memory=images.device.type == "cuda", collate_fn=same_batch)
    return ResidentLoader(images, loader, recipes)


class ResidentLoader:
    """Batches as the loader path yields them, ([V × uint8 (B, 3, s, s)], labels), with the views
    already on the device: a DataLoader of draws (data.build_loader: the sampler, its epochs
    and resumes, workers) followed by make_views here, in the training process."""

    def __init__(self, images, draw_loader, recipes):
        self.images, self.draw_loader, self.recipes = images, draw_loader, recipes

    def __len__(self):
        return len(self.draw_loader)

    def __iter__(self):
        for draws in self.draw_loader:
            yield make_views(self.images, draws, self.recipes), draws.labels
