"""Claims of the resident data path (resident.py): the training images stay on the device and
each step's views are made there, yet they are the loader path's views.

* The same draws: boxes, flips and colour factors of (seed, epoch, index) are the loader's,
  also from a draw worker process, after set_epoch.
* The same pixels: the batched crop (two matmuls of antialiased weights) is torchvision's
  resized_crop to float rounding, shrinking or enlarging; a whole view is the per-image
  reference ``augment.augment`` within one level of 255 (float rounding; > 99.5 % exact).
* No host sync: the view-making records no read back to the host under a fake CUDA device,
  copies only indices and draws (no image) to it, and runs on the ``meta`` device.
* Refusals name the bytes and the alternatives; a resumed run keeps its path and says so,
  and the killed runs of tests/test_resume.py, which resume bitwise, take the resident path.
* Two gloo processes make, between them, the views one process makes of the whole batch.
"""
import json
import os
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import augment  # noqa: E402
import data  # noqa: E402
import resident  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
CPU = torch.device("cpu")


def _every_op(recipes):
    """The recipes with every colour op's probability at 1/2 or more, so each one is drawn."""
    import dataclasses
    return [dataclasses.replace(r, blur_p=max(r.blur_p, 0.5), solarize_p=max(r.solarize_p, 0.5),
                                grayscale_p=max(r.grayscale_p, 0.5)) for r in recipes]


def _resident(n=48, size=24, method="dino", **kw):
    base = data.build_dataset("embedded", size=n, img_size=size)
    recipes = _every_op(augment.build_views(method, size, local_crops=2, **kw))
    return base, recipes, resident.place(base, CPU)


def test_the_resident_path_draws_the_loader_paths_boxes_flips_and_colour():
    base, recipes, images = _resident()
    views, draws = data.ViewDataset(base, recipes, seed=5), resident.ViewDraws(images, recipes, 5)
    for d in (views, draws):
        d.set_epoch(3)
    indices = [7, 0, 31, 47]
    got = draws.__getitems__(indices)
    for b, i in enumerate(indices):
        g = views._generator(i)                  # the loader path's generator of (5, 3, i)
        want = [augment.draw_params(24, 24, r, g) for r in recipes]
        assert got.boxes[:, b].tolist() == [list(p.box) for p in want]
        assert got.flips[:, b].tolist() == [p.flip for p in want]
        assert torch.equal(torch.stack([c[b] for c in got.colour]),
                           torch.stack([augment.pack_colour([p])[0] for p in want]))
    assert got.labels.tolist() == [base[i][1] for i in indices]
    # through a loader with a draw worker, after set_epoch: the same numbers
    sampler = data.ResumableSampler(len(draws), 4, seed=0, shuffle=False)
    loader = data.build_loader(draws, 4, sampler, num_workers=1, collate_fn=resident.same_batch)
    sampler.set_epoch(3)
    first = next(iter(loader))
    assert torch.equal(first.boxes, draws.__getitems__([0, 1, 2, 3]).boxes)
    sampler.set_epoch(4)
    assert not torch.equal(next(iter(loader)).boxes, first.boxes)           # a new epoch


@pytest.mark.parametrize("height,width,size", [(24, 24, 24), (40, 36, 16), (64, 64, 24),
                                               (20, 20, 48)])
def test_batched_crops_are_torchvisions_antialiased_resized_crops(height, width, size):
    """Enlarged and shrunk boxes (64 → 24: up to 2.7× smaller, antialiased), flipped or not."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, height, width), dtype=torch.uint8, generator=g)
    recipe = augment.ViewRecipe(size, scale=(0.05, 1.0))
    params = [augment.draw_params(height, width, recipe, g) for _ in images]
    crops = resident.crop_flip_matmul(images, torch.tensor([p.box for p in params]),
                               torch.tensor([p.flip for p in params]), size)
    for crop, img, p in zip(crops, images, params):
        ref = F.resized_crop(F.to_dtype(img, torch.float32, scale=True), *p.box, [size, size],
                             antialias=True)
        ref = F.horizontal_flip(ref) if p.flip else ref
        assert (crop - ref).abs().max() < 1e-6


@pytest.mark.parametrize("method,size", [("simclr", 24), ("moco", 24), ("dino", 24),
                                         ("moco", resident.MATMUL_MAX_SIDE + 8)])
def test_resident_views_are_the_per_image_reference_within_one_level(method, size):
    """make_views against augment.augment and augment_batch of the same (seed, epoch, index):
    the float rounding of the two computations may put a pixel one level of 255 apart (1 in
    ~3000 here), never more. Larger images are cropped image by image on a CPU (make_views)."""
    base, recipes, images = _resident(size=size, method=method)
    ref_set = data.ViewDataset(base, recipes, seed=2, batched=False)
    batched_set = data.ViewDataset(base, recipes, seed=2)
    draws = resident.ViewDraws(images, recipes, seed=2)
    indices = list(range(0, 48, 3))
    made = resident.make_views(images, draws.__getitems__(indices), recipes)
    for reference in (ref_set.__getitems__(indices), batched_set.__getitems__(indices)):
        for v, view in enumerate(made):
            want = torch.stack([item[0][v] for item in reference])
            diff = (view.int() - want.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.005, (v, diff.float().mean())


def test_the_crops_weights_are_antialiased_and_half_pixel_centred():
    """The weights of a box of 8 shrunk to 4 (scale 2: triangle of support 2, centres at
    1, 3, 5, 7) and of 2 enlarged to 4 (bilinear between the two pixels)."""
    w = resident.resample_weights(torch.tensor([0]), torch.tensor([8]), 4, 8)[0]
    assert torch.allclose(w[0], torch.tensor([3, 3, 1, 0, 0, 0, 0, 0]) / 7.0)
    assert torch.allclose(w[1], torch.tensor([0, 1, 3, 3, 1, 0, 0, 0]) / 8.0)
    w = resident.resample_weights(torch.tensor([3]), torch.tensor([2]), 4, 6)[0]
    assert torch.allclose(w[:, 3:5], torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1.]]))
    assert w[:, :3].abs().sum() == 0 and w[:, 5:].abs().sum() == 0       # nothing outside the box


class OpRecorder(TorchDispatchMode):
    """Every aten op called in the block, with its tensor arguments' devices and sizes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, tensors, kwargs or {}))
        return func(*args, **(kwargs or {}))


SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal",
         "allclose", "unique", "_unique", "_unique2", "unique_consecutive"}


def test_views_are_made_on_a_cuda_device_without_reading_back_or_shipping_an_image():
    base, recipes, host = _resident(n=32, size=16)
    draws = resident.ViewDraws(host, recipes).__getitems__(list(range(8)))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        images = resident.ResidentImages(fake.from_tensor(host.images).to("cuda"), host.labels,
                                         torch.device("cuda"))
        with OpRecorder() as recorder:
            views = resident.make_views(images, draws, recipes)
    assert [v.device.type for v in views] == ["cuda"] * 4 and views[2].shape == (8, 3, 8, 8)
    assert not [op for op, _, _ in recorder.ops if op in SYNCS]
    moves = [(t.device.type, kw.get("device")) for op, ts, kw in recorder.ops
             if op in ("_to_copy", "copy_") for t in ts[:1]]
    assert not [m for m in moves if m[0] == "cuda" and m[1] is not None and m[1].type == "cpu"]
    sent = [t.numel() * t.element_size() for op, ts, kw in recorder.ops if op == "_to_copy"
            and ts[0].device.type == "cpu" and kw.get("device", CPU).type == "cuda" for t in ts[:1]]
    assert sent and sum(sent) < 8 * 3 * 16 * 16          # the draws: less than the batch's images


def test_views_are_made_on_the_meta_device():
    base, recipes, host = _resident(n=32, size=16)
    draws = resident.ViewDraws(host, recipes).__getitems__(list(range(8)))
    meta = resident.ResidentImages(host.images.to("meta"), host.labels, torch.device("meta"))
    views = resident.make_views(meta, draws, recipes)
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    assert all(v.device.type == "meta" and v.dtype == torch.uint8 for v in views)


def test_images_that_fit_nowhere_are_refused_naming_the_bytes_and_the_alternatives(
        monkeypatch):
    monkeypatch.setattr(resident, "free_bytes", lambda device: (10**9, 2 * 10**9))
    with pytest.raises(resident.NotResident, match=r"3,000,000,000 bytes \(3\.0 GB\).*"
                       r"1\.0 GB free on cuda.*--data-path workers.*--size"):
        resident.placement(3 * 10**9, torch.device("cuda"), in_host_memory=False)
    assert resident.placement(4 * 10**8, torch.device("cuda"), False) == "host"   # pinned copy
    monkeypatch.setattr(resident, "free_bytes", lambda device: (10**10, 10**10))
    assert resident.placement(4 * 10**8, torch.device("cuda"), False) == "device"


def _image_folder(root, n=12, side=20):
    import torchvision
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(n):
                torchvision.io.write_png(torch.randint(0, 256, (3, side, side + 4),
                                                       dtype=torch.uint8, generator=g),
                                         str(root / split / c / f"{i}.png"))
    return root


def test_a_cache_is_held_image_for_image_copied_a_chunk_at_a_time(tmp_path):
    import imagecache
    root = _image_folder(tmp_path / "folder")
    imagecache.build_cache(str(root), "train", str(tmp_path / "cache" / "train.npy"), 16,
                           log_every=0)
    base = data.build_dataset("folder", str(root), size=9, cache=str(tmp_path / "cache"))
    held = resident.place(base, CPU)
    assert held.images.shape == (9, 3, 16, 16) and held.labels.tolist() == [
        base[i][1] for i in range(9)] and set(held.labels.tolist()) == {0, 1}
    assert all(torch.equal(held.images[i], base[i][0]) for i in range(9))
    assert torch.equal(resident.load_array(base, CPU, chunk=2 * 3 * 16 * 16), held.images)


def test_an_image_folder_is_refused_naming_the_cache_command_or_left_to_workers(
        tmp_path, run_main):
    _image_folder(tmp_path)
    common = ["--method", "simclr", "--model", "cpu", "--img-size", "16", "--batch-size", "8",
              "--budget", "100", "--eval-every", "0", "--data", str(tmp_path)]
    code, out, _ = run_main([*common, "--data-path", "resident", "--out", str(tmp_path / "r")])
    assert code == 2 and "imagecache.py --data-root" in out and "--data-cache" in out, out
    code, out, _ = run_main([*common, "--out", str(tmp_path / "a")])           # auto
    assert code == 0 and "note: views are made by loader workers" in out, out


def test_on_a_cpu_images_above_64_px_are_left_to_loader_workers_unless_told(tmp_path, run_main):
    tiny = ["--method", "simclr", "--model", "cpu", "--img-size", str(resident.MATMUL_MAX_SIDE + 8),
            "--data-size", "16", "--batch-size", "8", "--budget", "10", "--eval-every", "0"]
    code, out, _ = run_main([*tiny, "--out", str(tmp_path / "auto")])
    assert code == 0 and "views: 0 loader worker(s)" in out and "above 64 px" in out, out
    code, out, _ = run_main([*tiny, "--data-path", "resident", "--out", str(tmp_path / "told")])
    assert code == 0 and "views: resident" in out, out


def test_a_resumed_run_keeps_its_data_path_unless_told(tmp_path, run_main):
    tiny = ["--method", "moco", "--model", "cpu", "--img-size", "16", "--data-size", "64",
            "--batch-size", "16", "--budget", "300", "--eval-every", "0", "--log-every", "0",
            "--out", str(tmp_path / "run")]
    code, out, _ = run_main([*tiny, "--data-path", "workers"])
    assert code == 0 and "views: 0 loader worker(s)" in out, out
    code, out, _ = run_main([*tiny, "--resume"])                           # auto
    assert code == 0 and "keeps its data path 'workers'" in out, out
    code, out, _ = run_main([*tiny, "--resume", "--data-path", "resident"])
    assert code == 0 and "changes its data path from 'workers' to 'resident'" in out, out
    assert "views: resident (0 MB on cpu)" in out


def test_the_killed_runs_of_test_resume_run_on_the_resident_path():
    """tests/test_resume.py kills runs (MoCo, DINO with local crops and dropout, an auto
    schedule, preemptions) and checks that they resume bitwise; its settings take the resident
    path, so those tests are this path's (a run of its own here would repeat them)."""
    from options import get_args
    from run import build_run
    from tests.test_resume import TINY
    args, _ = get_args([*TINY, "--method", "dino", "--budget", "1k", "--out", "unused"])
    with torch.random.fork_rng(devices=[]):
        assert build_run(args).data_path == "resident"


# ========================================== two processes: each rank makes its share's views
def two_ranks_main(out_path):
    """Under torchrun: each rank's resident loader (batch 4 of a global 8); rank 0 writes the
    gathered views of two steps and the views one process makes of the same global batches."""
    import torch.distributed as dist

    import distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base, recipes, images = _resident(n=40, size=16, method="moco")

    def loader(rank, world, batch):
        draws = resident.ViewDraws(images, recipes, seed=1)
        sampler = data.ResumableSampler(len(draws), batch, seed=1, rank=rank, world_size=world)
        sampler.set_epoch(2)
        return resident.ResidentLoader(images, data.build_loader(
            draws, batch, sampler, collate_fn=resident.same_batch), recipes)
    mine = [views for views, _ in loader(rank, world, 4)][:2]
    gathered = [[distributed.gather_no_grad(v) for v in views] for views in mine]  # (8, ...)
    if rank == 0:
        # rank r takes the strided share perm[r::2] of each global batch (ResumableSampler)
        one = [views for views, _ in loader(0, 1, 8)][:2]
        equal = all(torch.equal(g, torch.cat([o[0::2], o[1::2]]))
                    for gs, os_ in zip(gathered, one) for g, o in zip(gs, os_))
        with open(out_path, "w") as f:
            json.dump(dict(equal=equal, steps=len(one), views=len(one[0])), f)
    dist.destroy_process_group()


def test_two_processes_make_the_views_one_process_makes_of_the_whole_batch(tmp_path):
    from tests.test_distributed import finish, torchrun
    out = tmp_path / "views.json"
    finish(torchrun([os.path.abspath(__file__), str(out)]))
    assert json.loads(out.read_text()) == dict(equal=True, steps=2, views=2)


if __name__ == "__main__":
    two_ranks_main(sys.argv[1])
