"""Data for augmentation-invariance pretraining (paper §6.1): datasets, views, sampling.

Concern: which images a run sees, as what, and in what order. Datasets yield (uint8 (3, H, W),
int label) and have ``classes``: the procedural ``EmbeddedShapes`` (the offline default),
CIFAR-10/100 and STL-10 through torchvision, and ``ImageFolderDataset`` (ImageNet-100).
``ViewDataset`` turns an item into its views with the recipes of augment.py, drawing every random
number from a ``torch.Generator`` seeded by (seed, epoch, index), and ``ResumableSampler`` orders
an epoch by (seed, epoch) alone, so a resumed run is bit-identical. The loader augments a whole
batch at once (``augment_batch``), so compressed steps are not left waiting. ``EvalDataset``:
the deterministic resize and centre crop of evaluation, as bytes. The augmentations themselves
live in augment.py, image files in imagefolder.py.

An image folder can be decoded once into a uint8 cache of squares (imagecache.py, ``python
imagecache.py --data-root ROOT --out CACHE``), which ``build_dataset(..., cache=CACHE)`` then
reads instead of the JPEGs.

    from augment import build_views
    from data import EmbeddedShapes, ViewDataset, ResumableSampler, build_loader
    views = ViewDataset(EmbeddedShapes("train", size=512), build_views("simclr", 32), seed=0)
    loader = build_loader(views, 64, ResumableSampler(len(views), batch_size=64))
    (x1, x2), labels = next(iter(loader))     # x1, x2: (64, 3, 32, 32), normalised floats
"""
import os

import torch
import torchvision
import torchvision.transforms.v2.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from augment import augment, augment_batch, crop_flip, draw_params, pack_colour, to_uint8
from cluster import ignore_preemption_signals
from embedded import EmbeddedShapes, TensorImages, mix_seed
from imagecache import open_cache
from imagefolder import ImageFolderDataset

DATASETS = ("embedded", "cifar10", "cifar100", "stl10", "folder")


# ===== torchvision datasets and image folders =====

def _torchvision_dataset(name, root, split, download):
    """CIFAR-10/100 or STL-10 as TensorImages (their arrays are converted once, up front)."""
    root = root or "data"
    splits = ("train", "val", "unlabeled") if name == "stl10" else ("train", "val")
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {splits} for {name}")
    try:
        if name == "stl10":  # no val split: the 8000-image test split plays that role
            ds = torchvision.datasets.STL10(root, split={"val": "test"}.get(split, split),
                                            download=download)
            images, labels = torch.from_numpy(ds.data), ds.labels   # (N, 3, 96, 96); -1 unlabeled
        else:
            cls = getattr(torchvision.datasets, name.upper())             # CIFAR10, CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW
            labels = ds.targets
    except Exception as e:  # torchvision raises RuntimeError offline, URLError/OSError online
        where, err = os.path.abspath(root), (RuntimeError if download else FileNotFoundError)
        raise err(f"{name} {'download failed' if download else 'was not found'} under root "
                  f"'{where}' ({e}). Pass --download (download=True) when online, or place the "
                  f"extracted dataset files there.") from e
    return TensorImages(images, torch.as_tensor(labels).long(), ds.classes)


def build_dataset(name, root=None, split="train", img_size=32, download=False, seed=0, size=None,
                  cache=None):
    """Dataset by name; items are (uint8 (3, H, W), int). ``img_size`` and ``seed`` only shape
    the generated ``embedded`` data; a folder path given as ``name`` is an image folder.
    ``size`` keeps that many images for quick runs: the embedded prefix, elsewhere evenly
    spaced ones, so that a class-sorted folder keeps all its classes. ``cache``: a folder's
    decode-once cache directory (``imagecache.build_cache``); its ``<split>.npy`` is read
    instead of the image files, and if it is not there the error says the command that builds
    it."""
    if name not in DATASETS and os.path.isdir(name):
        name, root = "folder", name
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of images or None, got {size}")
    if cache is not None and name != "folder":
        raise ValueError(f"an image cache ({cache!r}) holds a decoded image folder: it needs "
                         f"dataset 'folder', not {name!r}")
    if name == "embedded":
        return EmbeddedShapes(split, size=size, img_size=img_size, seed=seed)
    if name in ("cifar10", "cifar100", "stl10"):
        ds = _torchvision_dataset(name, root, split, download)
    elif name == "folder" and cache is not None:
        ds = open_cache(cache, root, split, img_size)
    elif name == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs root=PATH, a folder holding train/ and val/")
        ds = ImageFolderDataset(root, split)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS} or a folder path")
    if size is not None and size < len(ds):
        keep = torch.linspace(0, len(ds) - 1, size).long()
        if isinstance(ds, TensorImages):
            ds.images, ds.labels = ds.images[keep], ds.labels[keep]
        elif cache is not None:                              # an imagecache.CachedImages
            ds.index, ds.labels = ds.index[keep], ds.labels[keep]
        else:
            ds.samples, ds.labels = [ds.samples[k] for k in keep], ds.labels[keep]
    return ds


# ===== views: a dataset seen through augment.py's recipes =====

class ViewDataset(Dataset):
    """A base dataset seen through view recipes: item i is ([uint8 view tensors], label), to be
    normalised where the model runs (augment.normalize: on the GPU, after the transfer). Its
    generator in epoch e is seeded by mix_seed(seed, e, i), so the views depend on nothing else:
    not on worker count, order or batch, nor on the global RNG, and a resumed run replays them.
    The epoch lives in shared memory, so ``set_epoch`` reaches persistent loader workers too.

    DataLoader fetches a batch through ``__getitems__`` when a dataset has one: the batch's
    views are made together by augment_batch, in the worker, and default_collate stacks them
    (into shared memory, which a worker's batch is copied to anyway). ``dataset[i]`` is the
    same code on a batch of one, with the same result. ``batched=False`` makes every view with
    the per-image reference ``augment`` instead (for comparisons: tests, bench.py loader).

    ``colour_on="device"`` leaves the colour ops to the training device: each view is then a
    pair (uint8 crop after crop and flip, its packed colour draws), which
    ``augment.to_model`` finishes where the model runs (train.py --augment-on device): the
    crops go to the device, the draws stay on the host, which plans the ops from them."""

    def __init__(self, base, recipes, seed=0, batched=True, colour_on="loader"):
        if colour_on not in ("loader", "device"):
            raise ValueError(f"colour_on must be 'loader' or 'device', got {colour_on!r}")
        self.base, self.recipes, self.seed, self.batched = base, list(recipes), seed, batched
        self.colour_on = colour_on
        self.classes = getattr(base, "classes", None)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.base)

    def _generator(self, i):
        return torch.Generator().manual_seed(mix_seed(self.seed, int(self._epoch), i))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """[([view tensors], label) for i in indices], all images' views made together."""
        items = [self.base[i] for i in indices]                   # (uint8 (3, H, W), label)
        if not self.batched:
            return [([augment(img, r, g) for r in self.recipes], label)
                    for (img, label), g in zip(items, map(self._generator, indices))]
        # each item's draws, view after view, from its own generator (as augment draws them)
        params = [[draw_params(img.shape[-2], img.shape[-1], r, g) for r in self.recipes]
                  for (img, _), g in zip(items, map(self._generator, indices))]
        images = [img for img, _ in items]                  # any sizes: crops are made one by one
        if self.colour_on == "device":          # V × ((B, 3, s, s) uint8, (B, 13) float)
            views = [(to_uint8(crop_flip(images, r, ps)), pack_colour(ps))
                     for r, ps in zip(self.recipes, zip(*params))]
            return [([(x[b], c[b]) for x, c in views], label) for b, (_, label) in enumerate(items)]
        views = [augment_batch(images, r, [p[v] for p in params])               # V × (B, 3, s, s)
                 for v, r in enumerate(self.recipes)]
        return [([x[b] for x in views], label) for b, (_, label) in enumerate(items)]


def eval_transform(img_size):
    """uint8 (3, h, w) → uint8 (3, img_size, img_size): resize the shorter side to img_size/0.875
    (256 for 224) in float with antialiasing, centre crop, and round back to bytes
    (``to_uint8``: each pixel within half a level of the float resize, so within 0.5/255/std ≲
    0.009 of the float path once normalised); an image already img_size² passes unchanged.
    Normalised where the model runs (augment.normalize), as training's views are."""
    def transform(img):
        if tuple(img.shape[-2:]) == (img_size, img_size):
            return img
        x = F.resize(F.to_dtype(img, torch.float32, scale=True), [round(img_size / 0.875)],
                     antialias=True)
        return to_uint8(F.center_crop(x, [img_size, img_size]))
    return transform


class EvalDataset(Dataset):
    """A base dataset seen through ``eval_transform``: items (uint8 (3, s, s), label), a quarter
    of float32's shared memory through a loader. ``subset=N`` keeps N of its items, a random
    choice fixed by seed 0 (whatever the run's seed, so every run of a comparison is measured
    against the same images). ``as_tensors()``: its images as one tensor, where the base already
    holds them so at the eval size (no loader needed)."""

    def __init__(self, base, img_size, subset=None):
        self.base, self.img_size, self.transform = base, img_size, eval_transform(img_size)
        self.classes = getattr(base, "classes", None)
        self.index = list(range(len(base)))
        if subset is not None and subset < len(base):
            self.index = torch.randperm(len(base), generator=torch.Generator().manual_seed(0))
            self.index = sorted(self.index[:subset].tolist())

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        img, label = self.base[self.index[i]]
        return self.transform(img), label

    def as_tensors(self):
        """(uint8 images (N, 3, s, s), labels (N,)): the items, all at once, where the base holds
        its images as one tensor of the eval size (TensorImages: CIFAR-10/100, the embedded set;
        items are then its images as they are); None otherwise."""
        images = getattr(self.base, "images", None)
        if not torch.is_tensor(images) or tuple(images.shape[-2:]) != (self.img_size,) * 2:
            return None
        if len(self.index) == len(images):
            return images, self.base.labels
        index = torch.tensor(self.index)
        return images[index], self.base.labels[index]


# ===== sampling: resumable and distributed =====

class ResumableSampler(Sampler):
    """Epoch e visits randperm(n) drawn from seed + e (the same on all ranks), cut to a multiple
    of world_size·batch_size so every rank has the same number of full batches. Rank r takes
    the strided share perm[r::W] (as DistributedSampler), so global batch j is exactly
    perm[j·W·B : (j+1)·W·B]: W processes with batch B see what one process with batch W·B sees.
    ``set_start(j)`` skips this rank's first j batches, so a resumed run continues mid-epoch;
    ``set_epoch`` resets it to 0 (call it first) and, once ``build_loader`` has paired them,
    sets the dataset's epoch too."""

    def __init__(self, n, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or n < batch_size * world_size:
            raise ValueError(f"the dataset (n={n}) is smaller than one global batch of batch_size="
                             f"{batch_size} × world_size={world_size}; lower the batch size")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0
        self.dataset = None

    @property
    def batches_per_epoch(self):
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch):
        self.epoch, self.start = epoch, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def set_start(self, batch_index):
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"start batch must be in [0, {self.batches_per_epoch}] (batches per "
                             f"epoch), got {batch_index}")
        self.start = batch_index

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        return iter(order[self.rank :: self.world_size][self.start * self.batch_size :].tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.start) * self.batch_size


def build_loader(dataset, batch_size, sampler, num_workers=0, pin_memory=False, collate_fn=None):
    """DataLoader over ``sampler``, which already drops the ragged tail. Workers persist across
    epochs and prefetch 4 batches each. The sampler learns its dataset, so that
    ``sampler.set_epoch(e)`` also gives a ViewDataset new views, and no caller can forget to.

    The loader gets a generator of its own: without one, every ``iter(loader)`` (each epoch,
    and once more after a resume) draws its worker base seed from the GLOBAL torch RNG, which
    also drives token dropout, so a resumed run would drop different tokens. Workers ignore
    preemption signals: the training process saves, then ends them (cluster.py). ``collate_fn``:
    DataLoader's (default: stack the items), e.g. resident.same_batch for a batch of draws."""
    if isinstance(sampler, ResumableSampler):
        sampler.dataset = dataset
    extra = dict(persistent_workers=True, prefetch_factor=4) if num_workers > 0 else {}
    generator = torch.Generator().manual_seed(getattr(sampler, "seed", 0))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, generator=generator,
                      worker_init_fn=ignore_preemption_signals, collate_fn=collate_fn, **extra)
