"""Claims of data.py and augment.py: the embedded data is deterministic and balanced, every
augmentation is a pure function of its generator, the batched augmentation makes the
reference's views (to float rounding) and makes each the same in any batch, views replay exactly
after a restart, the sampler splits an epoch across ranks without overlap and resumes
mid-epoch, and bad inputs give clear errors."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import torchvision.transforms.v2.functional as F

import data
import imagecache
from augment import (_brightness, _contrast, _gaussian_blur, _gray, _hue, _saturation,  # the ops
                     resized_crops)                                      # of augment_batch
import augment as augment_module
from augment import MEAN, STD, ViewRecipe, augment, build_views, normalize
from data import (EvalDataset, ResumableSampler, ViewDataset, build_dataset, build_loader,
                  eval_transform)
from embedded import EmbeddedShapes
from imagefolder import ImageFolderDataset, decode


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _save(array, path):
    Image.fromarray(np.asarray(array)).save(path)


# ===== the embedded dataset =====

def test_embedded_shapes_are_deterministic_and_train_differs_from_val():
    a, b = EmbeddedShapes("train", size=300), EmbeddedShapes("train", size=300)
    assert a.images.dtype == torch.uint8 and a.images.shape == (300, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, EmbeddedShapes("val", size=300).images)
    assert not torch.equal(a.images, EmbeddedShapes("train", size=300, seed=1).images)
    # Chunked seeding: a smaller dataset is a prefix of a larger one.
    assert torch.equal(EmbeddedShapes("train", size=1200).images[:300], a.images)


def test_embedded_shapes_classes_are_balanced_and_items_are_uint8_chw():
    ds = EmbeddedShapes("val")
    assert len(ds) == 2000 and len(ds.classes) == 10
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 200))
    img, label = ds[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and isinstance(label, int)
    assert EmbeddedShapes("train", size=20, img_size=48).images.shape == (20, 3, 48, 48)


# ===== augmentations =====

@pytest.mark.parametrize("method", ["simclr", "moco", "dino"])
@pytest.mark.parametrize("every_op", [False, True])
def test_augment_is_a_pure_function_of_the_generator(method, every_op):
    img = EmbeddedShapes("val", size=1).images[0]
    for recipe in build_views(method, 32, local_crops=1):
        if every_op:   # probability 1 for every branch, so every op and every draw is exercised
            recipe = ViewRecipe(**{**recipe.__dict__, "flip_p": 1.0, "jitter_p": 1.0,
                                   "grayscale_p": 1.0, "blur_p": 1.0, "solarize_p": 1.0})
        state = torch.get_rng_state()
        x1 = augment(img, recipe, torch.Generator().manual_seed(5))
        x2 = augment(img, recipe, torch.Generator().manual_seed(5))
        x3 = augment(img, recipe, torch.Generator().manual_seed(6))
        assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be touched"
        assert torch.equal(x1, x2) and not torch.equal(x1, x3)
        assert x1.shape == (3, recipe.size, recipe.size) and x1.dtype == torch.uint8


def test_view_dataset_replays_views_for_the_same_seed_epoch_and_index():
    base = EmbeddedShapes("train", size=16)
    a = ViewDataset(base, build_views("moco", 32), seed=3)
    b = ViewDataset(base, build_views("moco", 32), seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(u, v) for u, v in zip(a[5][0], b[5][0]))
    assert not torch.equal(a[5][0][0], a[5][0][1])          # two different views of one image
    b.set_epoch(3)
    assert not torch.equal(a[5][0][0], b[5][0][0])          # a new epoch draws new views


@pytest.mark.parametrize("method,kw,sizes", [
    ("simclr", {}, [32, 32]),
    ("multiview", {"views": 4}, [32] * 4),
    ("moco", {"views": 3}, [32] * 3),
    ("dino", {"local_crops": 3}, [32, 32, 16, 16, 16]),
    ("dino", {"local_crops": 2, "local_size": 12}, [32, 32, 12, 12]),
])
def test_view_shapes_per_method(method, kw, sizes):
    recipes = build_views(method, 32, **kw)
    assert [r.size for r in recipes] == sizes
    ds = ViewDataset(EmbeddedShapes("train", size=8), recipes)
    views, labels = next(iter(build_loader(ds, 4, ResumableSampler(8, 4))))
    assert [tuple(v.shape) for v in views] == [(4, 3, s, s) for s in sizes] and labels.shape == (4,)


# ===== batched augmentation: the same views, a batch at a time =====

def _every_op(recipes, p=0.5):
    """The recipes with every coin at p (jitter always on), so a batch mixes taken and not
    taken branches, and hue over its whole range."""
    return [ViewRecipe(**{**r.__dict__, "flip_p": p, "jitter_p": 1.0, "grayscale_p": p,
                          "blur_p": p, "solarize_p": p, "hue": 0.5}) for r in recipes]


def test_each_batched_op_matches_torchvision_with_a_factor_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 20, generator=g)
    x[0, :, :5] = 0.5                                        # grey pixels: hue undefined
    f = 0.2 + 1.6 * torch.rand(6, generator=g)               # brightness, contrast, saturation
    h = torch.linspace(-0.5, 0.5, 6)                         # the whole hue range
    sigma = 0.1 + 2 * torch.rand(6, generator=g)
    cases = [(_brightness(x, f), lambda i: F.adjust_brightness(x[i], f[i].item())),
             (_contrast(x, f), lambda i: F.adjust_contrast(x[i], f[i].item())),
             (_saturation(x, f), lambda i: F.adjust_saturation(x[i], f[i].item())),
             (_hue(x, h), lambda i: F.adjust_hue(x[i], h[i].item())),
             (_gray(x).expand(-1, 3, -1, -1), lambda i: F.rgb_to_grayscale(x[i], 3)),
             (_gaussian_blur(x, sigma, 5), lambda i: F.gaussian_blur(x[i], [5, 5],
                                                                     [sigma[i].item()] * 2))]
    for batched, one in cases:
        assert torch.allclose(batched, torch.stack([one(i) for i in range(6)]), atol=1e-5)


def test_batched_crops_are_resized_crop_bit_for_bit_for_images_of_any_size():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in ((32, 32), (20, 48), (96, 64), (7, 9))]
    boxes = [(0, 0, 32, 32), (3, 10, 12, 30), (5, 2, 90, 60), (1, 1, 5, 4)]  # shrink and enlarge
    crops = resized_crops(images, boxes, 24)                                 # (4, 3, 24, 24)
    for img, box, crop in zip(images, boxes, crops):
        ref = F.resized_crop(F.to_dtype(img, torch.float32, scale=True), *box, [24, 24],
                             antialias=True)
        assert torch.equal(crop, ref)


@pytest.mark.parametrize("method", ["simclr", "moco", "dino"])
def test_batched_views_match_the_per_image_reference(method):
    recipes = _every_op(build_views(method, 32, local_crops=2))
    base = EmbeddedShapes("train", size=12)
    batched = ViewDataset(base, recipes, seed=4).__getitems__(list(range(12)))
    reference = ViewDataset(base, recipes, seed=4, batched=False).__getitems__(list(range(12)))
    for (views, label), (ref_views, ref_label) in zip(batched, reference):
        assert label == ref_label
        for v, r in zip(views, ref_views):     # uint8: float rounding moves a level at most
            assert v.shape == r.shape and (v.int() - r.int()).abs().max() <= 1


def test_views_leave_the_loader_as_bytes_and_are_normalised_where_the_model_runs(monkeypatch):
    """uint8 from the loader (a quarter of float32's shared memory); ``normalize`` is
    F.normalize of the bytes to 1e-6; the bytes are the float views the ops compute (what the
    loader shipped before) rounded to the nearest level."""
    recipes = _every_op(build_views("dino", 32, local_crops=1))
    ds = ViewDataset(EmbeddedShapes("train", size=16), recipes, seed=2)
    sampler = ResumableSampler(16, 8)
    views, _ = next(iter(build_loader(ds, 8, sampler)))
    assert [v.dtype for v in views] == [torch.uint8] * 3
    for v in views:
        reference = F.normalize(F.to_dtype(v, torch.float32, scale=True), MEAN, STD)
        assert (normalize(v) - reference).abs().max() <= 1e-6
    monkeypatch.setattr(augment_module, "to_uint8", lambda x: x)        # the float views
    floats = ds.__getitems__(list(sampler)[:8])                           # the same images
    for b, (items, _) in enumerate(floats):
        for v, x in zip(views, items):
            assert x.dtype == torch.float32
            assert (v[b].float() / 255 - x).abs().max() <= 0.5 / 255 + 1e-6


def _coins(recipes, p):
    """The recipes with every coin at p (jitter's too) and hue over its whole range; crops of
    the whole image (scale 1), so that a crop is exact and no rounding of it hides an op's."""
    return [ViewRecipe(**{**r.__dict__, "scale": (1.0, 1.0), "flip_p": p, "jitter_p": p,
                          "grayscale_p": p, "blur_p": p, "solarize_p": p, "hue": 0.5})
            for r in recipes]


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("method", ["simclr", "moco", "dino"])
def test_the_colour_ops_on_the_device_are_the_loaders_ops(method, p):
    """--augment-on device and the resident path: colour_on_device of the uint8 crops and the
    packed draws equals augment_batch of the same draws and the per-image reference (augment,
    torchvision's ops) to one level of 255, with every coin at 0, at 1 (every image takes every
    op) and at 0.5 (each op of each jitter round on some of the images)."""
    g = torch.Generator().manual_seed(1)
    for recipe in _coins(build_views(method, 32, local_crops=1), p):
        s, seeds = recipe.size, range(24)
        images = torch.randint(0, 256, (24, 3, s, s), dtype=torch.uint8, generator=g)
        params = [augment_module.draw_params(s, s, recipe, torch.Generator().manual_seed(i))
                  for i in seeds]
        assert all(q.box == (0, 0, s, s) for q in params)
        crops = augment_module.to_uint8(augment_module.crop_flip(images, recipe, params))
        on_device = augment_module.colour_on_device(crops, augment_module.pack_colour(params))
        in_loader = augment_module.augment_batch(images, recipe, params)
        reference = torch.stack([augment(img, recipe, torch.Generator().manual_seed(i))
                                 for img, i in zip(images, seeds)])
        assert (on_device.int() - in_loader.int()).abs().max() <= 1
        assert (on_device.int() - reference.int()).abs().max() <= 1
        assert p == 0 or (on_device != crops).float().mean() > 0.25       # the ops did act


class _Copies(TorchDispatchMode):
    """Every aten op inside the block, and each copy between devices as (from, to, dtype)."""

    def __init__(self):
        super().__init__()
        self.ops, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in ("_to_copy", "copy_") and args[0].device != out.device:
            source = args[1] if name == "copy_" else args[0]
            self.copies.append((source.device.type, out.device.type, source.dtype))
        return out


def test_the_colour_ops_send_one_plan_to_the_device_and_read_nothing_back():
    """On a (fake) GPU: the host-made plan of the colour ops (image indices and parameters) goes
    over in one float32 copy; no value comes back to the host (no .item(), nonzero or
    device-to-host copy: each would stall the step)."""
    g = torch.Generator().manual_seed(0)
    recipe = _coins(build_views("moco", 32), 0.5)[0]
    packed = augment_module.pack_colour([augment_module.draw_params(32, 32, recipe, g)
                                         for _ in range(16)])
    with FakeTensorMode():
        crops = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="cuda")
        with _Copies() as recorded:
            views = augment_module.colour_on_device(crops, packed)
    assert views.device.type == "cuda" and views.shape == (16, 3, 32, 32)
    assert recorded.copies == [("cpu", "cuda", torch.float32)]
    assert not {"_local_scalar_dense", "item", "nonzero", "equal"} & set(recorded.ops)
    assert {"index_select", "index_copy_"} <= set(recorded.ops)        # ops on their images
    with pytest.raises(ValueError, match="must be on the CPU .* got them on meta"):
        augment_module.colour_on_device(crops, packed.to("meta"))


def test_a_loader_that_leaves_the_colour_to_the_device_ships_crops_and_draws():
    """Through a real loader (2 workers): each view is (uint8 crops, float (B, 13) draws);
    to_model makes of them views within 3 levels of the loader path's (the crop is rounded
    to bytes before the colour ops, as PIL pipelines do; contrast and brightness ≤ 1.4
    amplify that) and within half a level on average."""
    recipes = _every_op(build_views("dino", 32, local_crops=1))
    base = EmbeddedShapes("train", size=16)
    batches = {}
    for colour_on in ("loader", "device"):
        ds = ViewDataset(base, recipes, seed=2, colour_on=colour_on)
        batches[colour_on] = next(iter(build_loader(ds, 8, ResumableSampler(16, 8),
                                                    num_workers=2)))[0]
    for view, (crops, packed) in zip(batches["loader"], batches["device"]):
        assert crops.dtype == torch.uint8 and packed.shape == (8, 13)
        step = (augment_module.to_model((crops, packed), "cpu") - normalize(view)) * \
            torch.tensor(STD)[:, None, None] * 255                   # in levels of 255
        assert step.abs().max() <= 3 + 1e-3 and step.abs().mean() <= 0.5
    with pytest.raises(ValueError, match="colour_on must be 'loader' or 'device', got 'gpu'"):
        ViewDataset(base, recipes, colour_on="gpu")


def test_a_view_is_the_same_in_any_batch_with_any_workers_or_threads():
    # images of two sizes, so that a batch may mix them (as an image folder's do)
    images = EmbeddedShapes("train", size=12, img_size=40).images
    small = EmbeddedShapes("train", size=12).images
    base = [(images[i] if i % 3 else small[i], i) for i in range(12)]
    ds = ViewDataset(base, _every_op(build_views("dino", 32, local_crops=1)), seed=5)
    ds.set_epoch(1)
    alone = [ds[i][0] for i in range(12)]                       # one image at a time
    same = lambda views, i: all(torch.equal(v, a) for v, a in zip(views, alone[i]))
    order = [7, 2, 11, 0, 5, 9, 1, 4, 3, 10, 8, 6]
    assert all(same(item[0], i) for item, i in zip(ds.__getitems__(order), order))
    torch.set_num_threads(2)                                    # restored by the fixture
    assert all(same(item[0], i) for item, i in zip(ds.__getitems__(order[:5]), order[:5]))
    for batch_size, workers in ((3, 0), (4, 2)):
        sampler = ResumableSampler(12, batch_size, shuffle=False)
        sampler.set_epoch(1)
        loader = build_loader(ds, batch_size, sampler, num_workers=workers)
        for j, (views, labels) in enumerate(loader):
            assert all(same([v[b] for v in views], i) for b, i in enumerate(labels.tolist()))
        assert j == 12 // batch_size - 1


def test_recipes_follow_the_official_strengths():
    simclr = build_views("simclr", 224)[0]
    assert simclr.scale == (0.08, 1.0) and (simclr.saturation, simclr.blur_p) == (0.4, 0.5)
    assert build_views("simclr", 32)[0].scale == (0.25, 1.0)  # small images: crops keep the object
    q, k = build_views("moco", 224)
    assert (q.blur_p, q.solarize_p, k.blur_p, k.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    dino = build_views("dino", 224, local_crops=1)
    assert dino[0].scale == (0.4, 1.0) and dino[2].size == 96 and dino[2].scale == (0.05, 0.4)


def test_sampler_set_epoch_reaches_the_views_in_persistent_loader_workers():
    ds = ViewDataset(EmbeddedShapes("train", size=8), build_views("simclr", 32), seed=1)
    sampler = ResumableSampler(8, 8, shuffle=False)
    loader = build_loader(ds, 8, sampler, num_workers=1)    # pairs the sampler with ds
    first = None
    for epoch in range(2):
        sampler.set_epoch(epoch)                             # also sets ds's epoch
        views, _ = next(iter(loader))
        assert torch.equal(views[0], torch.stack([ds[i][0][0] for i in range(8)]))
        first = views[0] if first is None else first
    assert not torch.equal(first, views[0])


def test_cifar10_batch_files_are_read_by_torchvision_into_chw_images(tmp_path, monkeypatch):
    """The real reader on generated files in CIFAR-10's python format (what --download
    unpacks): rows of 3072 bytes, planes R, G, B. Only the md5 check is bypassed, which
    generated files cannot pass."""
    import pickle
    import torchvision.datasets.cifar as cifar
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[name], "labels": [1, 9, 0, 9]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    train = build_dataset("cifar10", root=str(tmp_path), split="train")
    val = build_dataset("cifar10", root=str(tmp_path), split="val")
    assert len(train) == 20 and len(val) == 4 and val.classes[9] == "c9"
    img, label = val[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 9
    assert torch.equal(img, torch.from_numpy(rows["test_batch"][1].reshape(3, 32, 32)))
    assert torch.equal(train[4][0], torch.from_numpy(rows["data_batch_2"][0].reshape(3, 32, 32)))


def test_eval_transform_resizes_and_centre_crops_as_bytes_within_half_a_level():
    t = eval_transform(32)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert t(img) is img                                              # 32² passes unchanged
    big = torch.randint(0, 256, (3, 45, 60), dtype=torch.uint8)
    floats = F.center_crop(F.resize(big / 255, [37], antialias=True), [32, 32])   # 32/0.875
    assert t(big).dtype == torch.uint8
    assert (t(big) / 255 - floats).abs().max() <= 0.5 / 255 + 1e-6   # rounded to the nearest
    assert t(torch.zeros(3, 4, 4, dtype=torch.uint8)).shape == (3, 32, 32)
    assert t(torch.zeros(3, 96, 120, dtype=torch.uint8)).shape == (3, 32, 32)
    assert EvalDataset(EmbeddedShapes("val", size=2), 24)[0][0].shape == (3, 24, 24)


def test_a_knn_bank_is_the_same_subset_of_the_training_set_for_every_run():
    base = EmbeddedShapes("train", size=50)
    bank = EvalDataset(base, 32, subset=20)
    assert len(bank) == 20 and len(set(bank.index)) == 20
    assert bank.index == EvalDataset(EmbeddedShapes("train", size=50, seed=7), 32, subset=20).index
    assert bank[3][1] == base[bank.index[3]][1]
    assert len(EvalDataset(base, 32, subset=500)) == 50          # larger than the set: all


# ===== the sampler =====

def test_ranks_are_disjoint_and_cover_the_truncated_permutation():
    n, B, W = 103, 5, 3                                     # 6 global batches of 15; 13 dropped
    per_rank = []
    for r in range(W):
        s = ResumableSampler(n, B, seed=7, rank=r, world_size=W)
        s.set_epoch(4)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s) == s.batches_per_epoch * B == 30
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + 4))[:90].tolist()
    assert sorted(sum(per_rank, [])) == sorted(perm)
    # Global batch j of W ranks is batch j of one process with batch W·B.
    single = ResumableSampler(n, B * W, seed=7)
    single.set_epoch(4)
    assert list(single) == perm
    for j in range(6):
        step = sum((p[j * B:(j + 1) * B] for p in per_rank), [])
        assert sorted(step) == sorted(perm[j * W * B:(j + 1) * W * B])


def test_set_start_resumes_the_tail_of_the_same_epoch_and_epochs_differ():
    s = ResumableSampler(64, 8, seed=1, rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    s.set_start(2)
    assert list(s) == full[16:] and len(s) == 16
    s.set_epoch(4)                                          # a new epoch starts from batch 0
    assert len(list(s)) == 32 and list(s) != full
    assert list(ResumableSampler(10, 5, shuffle=False)) == list(range(10))


def test_a_resumed_loader_replays_the_rest_of_the_epoch_bit_for_bit():
    ds = ViewDataset(EmbeddedShapes("train", size=16), build_views("simclr", 32), seed=2)
    sampler = ResumableSampler(16, 4, seed=2)
    loader = build_loader(ds, 4, sampler)
    sampler.set_epoch(1)
    full = [views for views, _ in loader]
    sampler.set_epoch(1)                                    # "after the crash": batch 2 of epoch 1
    sampler.set_start(2)
    tail = [views for views, _ in loader]
    assert len(tail) == 2
    assert all(torch.equal(u, v) for a, b in zip(full[2:], tail) for u, v in zip(a, b))


def test_sampler_errors_name_the_bad_values():
    with pytest.raises(ValueError, match="n=10.*batch_size=4.*world_size=3"):
        ResumableSampler(10, 4, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(100, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"\[0, 2\].*got 5"):
        ResumableSampler(16, 8).set_start(5)


# ===== image folders =====

def _write_tree(root):
    """A tiny ImageNet-style tree with every kind of file a real one may hold."""
    rng = np.random.default_rng(0)
    a, b = root / "train" / "ant", root / "train" / "bee"
    a.mkdir(parents=True), b.mkdir(parents=True)
    _save(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), a / "rgb.JPEG")
    _save(rng.integers(0, 256, (9, 9), dtype=np.uint8), a / "gray.png")
    _save(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), a / "rgba.png")
    _save(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8), a / "pic.bmp")       # PIL decodes it
    _save(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), b / "tiny.png")
    _save(np.array([[0, 256, 32768, 65535]], dtype=np.uint16), b / "deep.png")  # mode "I;16"
    good = b / "zz_good.jpg"
    _save(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), good)
    (b / "trunc.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut mid-scan
    (b / "broken.png").write_bytes(b"definitely not a png" * 4)
    (b / "notes.txt").write_text("not an image: ignored")


def test_image_folder_decodes_every_mode_to_uint8_rgb(tmp_path):
    _write_tree(tmp_path)
    ds = build_dataset("folder", root=str(tmp_path), split="train")
    assert ds.classes == ["ant", "bee"] and len(ds) == 9      # notes.txt is not an image
    for i, (path, _) in enumerate(ds.samples):
        if "trunc" not in path and "broken" not in path:
            img, _ = ds[i]
            assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, path
    deep = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("deep.png")][0]
    # 16-bit values are rescaled, not wrapped: 256 → 1 (a wrap would give 0), 65535 → 255.
    assert ds[deep][0][0, 0].tolist() == [0, 1, 128, 255]
    tiny = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("tiny.png")][0]
    assert ds[tiny][0].shape == (3, 4, 4)
    views, _ = ViewDataset(ds, build_views("simclr", 32))[tiny]  # crops of tiny images upsample
    assert views[0].shape == (3, 32, 32)
    # A quick-run subset keeps evenly spaced files, so a class-sorted folder keeps every class.
    assert build_dataset(str(tmp_path), size=3).labels.tolist() == [0, 1, 1]


def test_unreadable_images_are_substituted_counted_and_warned(tmp_path):
    _write_tree(tmp_path)
    ds = ImageFolderDataset(str(tmp_path), "train")
    paths = [p for p, _ in ds.samples]
    for name in ("trunc.jpg", "broken.png"):
        i = [k for k, p in enumerate(paths) if p.endswith(name)][0]
        with pytest.warns(UserWarning, match=name):
            img, label = ds[i]
        assert img.dtype == torch.uint8 and label == 1
    assert {os.path.basename(p) for p in ds.bad_files} == {"trunc.jpg", "broken.png"}


def test_image_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("folder", root=str(tmp_path / "nope"))
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no 'train/' folder.*'images'"):
        build_dataset("folder", root=str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        build_dataset("folder", root=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="'.*cat' has no images"):
        build_dataset(str(tmp_path))                        # a path as the name is a folder


def test_unknown_names_and_offline_downloads_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="imagenet.*embedded.*cifar10"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="byol.*simclr"):
        build_views("byol", 32)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*--download"):
        build_dataset("cifar10", root=str(tmp_path), download=False)
    with pytest.raises(ValueError, match="unlabeled"):
        build_dataset("stl10", root=str(tmp_path), split="extra")


# ===== the decode-once cache =====

def _folder_items(root, split="train"):
    """(path, label) of every readable image of an image folder, in its order."""
    ds = ImageFolderDataset(str(root), split)
    return [(p, y) for p, y in ds.samples if "trunc" not in p and "broken" not in p], ds.classes


def test_the_cache_holds_every_readable_image_as_its_decoded_square(tmp_path):
    _write_tree(tmp_path / "src")
    with pytest.warns(UserWarning, match="left out of the cache") as caught:
        meta = imagecache.build_cache(str(tmp_path / "src"), "train",
                                      str(tmp_path / "c" / "train.npy"), short_side=12)
    # the corrupt files are left out, warned about one by one, and listed in the sidecar
    assert sorted(os.path.basename(p) for p in meta["skipped_files"]) == ["broken.png", "trunc.jpg"]
    assert sum("left out of the cache" in str(w.message) for w in caught) == 2
    cache = imagecache.CachedImages(str(tmp_path / "c" / "train.npy"))
    items, classes = _folder_items(tmp_path / "src")
    assert cache.classes == classes == ["ant", "bee"] and len(cache) == len(items) == 7
    assert cache.labels.tolist() == [y for _, y in items]
    for i, (path, label) in enumerate(items):   # each: the file decoded, resized, centre-cropped
        img, y = cache[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 12) and y == label
        assert torch.equal(img, imagecache.square(decode(path), 12)), path
    # the 20×24 JPEG: its shorter side becomes 12 (12×14), and its central 12 columns are kept
    i = [k for k, (p, _) in enumerate(items) if p.endswith("rgb.JPEG")][0]
    assert torch.equal(cache[i][0], F.resize(decode(items[i][0]), [12])[..., 1:13])
    # on disk: exactly the N × 3 × S² bytes after the .npy header, nothing left behind
    assert np.load(tmp_path / "c" / "train.npy").shape == (7, 3, 12, 12)
    assert sorted(os.listdir(tmp_path / "c")) == ["train.json", "train.npy", "train_labels.npy"]


def test_the_cache_command_decodes_in_a_pool_what_one_process_decodes(tmp_path, capsys):
    _write_tree(tmp_path / "src")
    with pytest.warns(UserWarning, match="left out"):
        imagecache.build_cache(str(tmp_path / "src"), "train", str(tmp_path / "one" / "train.npy"),
                               10)
        imagecache.main(["--data-root", str(tmp_path / "src"), "--out", str(tmp_path / "pool"),
                         "--size", "10", "--split", "train", "--workers", "2"])
    out = capsys.readouterr().out
    assert re.search(r"train: 9/9 images \| [\d,]+ img/s \| ETA 0:00:00", out), out
    assert "7 images of 10²" in out and "2 unreadable file(s) left out" in out
    for name in ("train.npy", "train_labels.npy"):
        assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "pool" / name))


def test_views_of_the_cache_are_the_views_of_a_folder_of_its_squares(tmp_path):
    _write_tree(tmp_path / "src")
    with pytest.warns(UserWarning):
        imagecache.build_cache(str(tmp_path / "src"), "train", str(tmp_path / "c" / "train.npy"),
                               16)
    cache = imagecache.CachedImages(str(tmp_path / "c" / "train.npy"))
    for i in range(len(cache)):                 # the same squares as lossless files, same order
        img, label = cache[i]
        (tmp_path / "sq" / "train" / cache.classes[label]).mkdir(parents=True, exist_ok=True)
        _save(img.permute(1, 2, 0).numpy(), tmp_path / "sq" / "train" / cache.classes[label]
              / f"{i:02d}.png")
    folder = ImageFolderDataset(str(tmp_path / "sq"), "train")
    recipes = _every_op(build_views("dino", 16, local_crops=1))
    a = ViewDataset(cache, recipes, seed=3).__getitems__(list(range(7)))
    b = ViewDataset(folder, recipes, seed=3).__getitems__(list(range(7)))
    for (views, label), (ref_views, ref_label) in zip(a, b):
        assert label == ref_label and all(torch.equal(v, r) for v, r in zip(views, ref_views))
    # and through build_dataset, a quick-run subset of it keeps both classes
    sub = build_dataset("folder", str(tmp_path / "src"), "train", img_size=16, size=3,
                        cache=str(tmp_path / "c"))
    assert sub.labels.tolist() == [0, 0, 1] and torch.equal(sub[1][0], cache[3][0])


def test_a_damaged_or_missing_cache_is_refused_naming_it(tmp_path):
    _write_tree(tmp_path / "src")
    npy, cache_dir = tmp_path / "c" / "train.npy", str(tmp_path / "c")
    with pytest.warns(UserWarning):
        imagecache.build_cache(str(tmp_path / "src"), "train", str(npy), 8)
    full = npy.read_bytes()
    npy.write_bytes(full[:-100])                                # cut short, as by a full disk
    with pytest.raises(ValueError, match=re.escape(str(npy)) + ".*truncated.*python imagecache.py"):
        imagecache.CachedImages(str(npy))
    np.save(npy, np.zeros((6, 3, 8, 8), dtype=np.uint8))        # another cache's array
    with pytest.raises(ValueError, match=re.escape(str(npy)) + r".*\(6, 3, 8, 8\).*\(7, 3, 8, 8\)"):
        build_dataset("folder", str(tmp_path / "src"), cache=cache_dir)
    npy.write_bytes(full)
    (tmp_path / "src" / "train" / "cat").mkdir()                # the folder changed since
    (tmp_path / "src" / "train" / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="built from another folder"):
        build_dataset("folder", str(tmp_path / "src"), cache=cache_dir)
    # no val cache: the error names the path and the command that builds it
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(cache_dir, "val.npy"))
                       + ".*python imagecache.py --data-root .*src --out .* --size 37 --split val"):
        build_dataset("folder", str(tmp_path / "src"), "val", img_size=32, cache=cache_dir)
    with pytest.raises(ValueError, match="needs dataset 'folder', not 'cifar10'"):
        build_dataset("cifar10", cache=cache_dir)


def test_a_killed_rebuild_leaves_the_previous_cache_whole(tmp_path, monkeypatch):
    _write_tree(tmp_path / "src")
    npy = tmp_path / "c" / "train.npy"
    with pytest.warns(UserWarning):
        imagecache.build_cache(str(tmp_path / "src"), "train", str(npy), 8)
    before = [imagecache.CachedImages(str(npy))[i][0] for i in range(7)]
    calls = []

    def dies_on_the_fourth(job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt                            # as a kill would, mid-build
        return imagecache._square_file(job)
    monkeypatch.setattr(imagecache, "_square_file", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        imagecache.build_cache(str(tmp_path / "src"), "train", str(npy), 12)
    assert os.path.exists(str(npy) + ".tmp")                   # the unfinished build, aside
    cache = imagecache.CachedImages(str(npy))                        # the previous one, still whole
    assert cache.size == 8 and all(torch.equal(cache[i][0], before[i]) for i in range(7))
    os.remove(tmp_path / "c" / "train.json")                   # and a first build, killed:
    with pytest.raises(FileNotFoundError, match=re.escape(str(npy)) + ".*killed build"):
        imagecache.CachedImages(str(npy))
