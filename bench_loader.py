"""Speed of the data pipeline: can the loader keep up with a compressed step? (bench.py)

Concern: images/s of each method's augmentation pipeline through data.build_loader — the
per-image reference (``augment.augment``) against the batched one (``augment.augment_batch``),
and the batched one with its colour ops left to the training device (``--augment-on device``:
the loader crops and flips), with N loader workers — and what JPEG decoding costs against a
decode-once cache (imagecache.py). A compressed training step makes images/s several times the uncompressed
one; if the loader cannot match it, the cost model's speed-up never reaches the clock.
``python bench.py --section loader`` runs it; ``bench.py --section methods`` sets these rates
beside each method's step rate.

    import augment, bench_loader, data
    base = bench_loader.loader_base(32, 3 * 64)
    views = data.ViewDataset(base, augment.build_views("simclr", 32, colour="strong"))
    print(bench_loader.loader_rate(views, 64, workers=0, batches=2), "images/s")
"""
import os
import tempfile
import time

import torch

import augment
import data
import imagecache
import resident
from bench_timing import sync
from embedded import TensorImages
from imagefolder import ImageFolderDataset


# ===================================================== data: can the loader keep up?
# Each loader configuration: (method, DINO local crops). DINO's 6 local crops (its 2+6
# multi-crop recipe at 224) make a sample 8 views, most of the loader's work.
LOADER_METHODS = {"simclr": ("simclr", 0), "moco": ("moco", 0), "dino+2": ("dino", 2),
                  "dino+6": ("dino", 6)}


def loader_base(img_size, n):
    """n images of what a loader at ``img_size`` reads. Up to 64 px: the embedded dataset
    rendered at that size (train.py's default data). Above: random uint8 images 8/7 larger than
    the crop (256² for 224, the usual ImageNet resize), already decoded, so that only the
    augmentation is timed (decoding a JPEG costs a few ms more per image, on top)."""
    if img_size <= 64:
        return data.build_dataset("embedded", img_size=img_size, size=n)
    side = round(img_size * 8 / 7)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return TensorImages(images, torch.zeros(n, dtype=torch.long), ["noise"])


def loader_rate(view_set, batch_size, workers, batches, images=None):
    """Images/s of data.build_loader in steady state: ``batches`` timed batch arrivals, after
    skipping the first 1 + 4·workers (start-up, and the batches the workers prefetched while
    the first one was awaited). ``view_set`` must hold (1 + 4·workers + batches)·batch_size
    images: one epoch. With no workers, this process makes the batches on one thread, as a
    worker does (DataLoader gives each one thread): on a busy machine, several threads that
    wait for each other at every small op can be slower than one.

    ``images`` (resident.ResidentImages): the resident path instead, its views made in this
    process on the images' device (on one thread, on a CPU) with ``view_set``'s recipes, the
    draws by ``workers`` processes."""
    skip, threads = 1 + 4 * workers, torch.get_num_threads()
    sampler = data.ResumableSampler(len(view_set), batch_size, shuffle=False)
    if images is None:
        loader = data.build_loader(view_set, batch_size, sampler, num_workers=workers)
    else:
        loader = resident.build_resident_loader(images, view_set.recipes, batch_size, sampler,
                                                num_workers=workers)
    sampler.set_epoch(0)
    arrivals = []
    torch.set_num_threads(1 if workers == 0 or images is not None else threads)
    try:
        for _ in loader:
            if images is not None:
                sync(images.device)                      # made, not just queued
            arrivals.append(time.perf_counter())
            if len(arrivals) == skip + batches:
                break
    finally:
        torch.set_num_threads(threads)
        del loader                              # stops persistent workers
    return batches * batch_size / (arrivals[-1] - arrivals[skip - 1])


def bench_loader(args, device):
    """Augmentation throughput: per-image reference vs batched vs batched with the colour ops
    left to the device, per method, size and workers."""
    rows = []
    print(f"# loader: images/s of data.build_loader, {args.steps} timed batches after "
          f"1 + 4·workers skipped; per-image augment.augment vs augment.augment_batch, and "
          f"augment_batch's crop and flip alone (--augment-on device: the colour ops run on "
          f"the training device); one thread per loader process")
    print("# resident: the views made in this process, on one thread, from the images held in "
          "memory (resident.py, --data-path resident); the draws by the workers")
    print(f"{'size':>5} {'method':<8}{'batch':>6}{'workers':>8}{'per-image':>11}{'batched':>9}"
          f"{'speed-up':>10}{'crop+flip':>11}{'gain':>7}{'resident':>10}{'÷batched':>10}")
    for size in args.loader_sizes:
        batch = args.batch_size or (64 if size <= 64 else 16)
        n = (1 + 4 * max(args.workers) + args.steps) * batch
        base = loader_base(size, n)
        images = resident.place(base, torch.device("cpu"))
        for name, (method, local) in LOADER_METHODS.items():
            if method not in args.methods:
                continue
            recipes = augment.build_views(method, size, local_crops=local,
                                       colour="strong" if size <= 64 else "official")
            for workers in args.workers:
                rate = {kind: loader_rate(data.ViewDataset(base, recipes, seed=0, **kw),
                                          batch, workers, args.steps)
                        for kind, kw in (("per_image", dict(batched=False)), ("batched", {}),
                                         ("crop_flip", dict(colour_on="device")))}
                rate["resident"] = loader_rate(data.ViewDataset(base, recipes, seed=0), batch,
                                               workers, args.steps, images=images)
                rows.append(dict(size=size, method=name, batch=batch, workers=workers, **rate,
                                 speedup=rate["batched"] / rate["per_image"],
                                 colour_on_device_gain=rate["crop_flip"] / rate["batched"],
                                 resident_gain=rate["resident"] / rate["batched"]))
                r = rows[-1]
                print(f"{size:>5} {name:<8}{batch:>6}{workers:>8}{r['per_image']:>11.0f}"
                      f"{r['batched']:>9.0f}{r['speedup']:>9.1f}×{r['crop_flip']:>11.0f}"
                      f"{r['colour_on_device_gain']:>6.1f}×{r['resident']:>10.0f}"
                      f"{r['resident_gain']:>9.1f}×", flush=True)
    if not args.loader_decode:
        return dict(rows=rows)
    print("# decode: the batched simclr loader over 375×500 JPEG files (generated: smooth "
          "colour fields plus noise, quality 90), decoded each time, vs over their decode-once "
          "cache of (8/7·size)² squares")
    print(f"{'size':>5} {'method':<8}{'batch':>6}{'workers':>8}{'JPEG':>11}{'cache':>9}"
          f"{'speed-up':>10}")
    decode = []
    for size in args.loader_sizes:
        batch = args.batch_size or (64 if size <= 64 else 16)
        with tempfile.TemporaryDirectory() as tmp:
            folder = jpeg_folder(tmp, (1 + 4 * max(args.workers) + args.steps) * batch)
            imagecache.build_cache(folder, "train", os.path.join(tmp, "train.npy"),
                                   round(size * 8 / 7), log_every=0)
            bases = dict(jpeg=ImageFolderDataset(folder, "train"),
                         cache=imagecache.CachedImages(os.path.join(tmp, "train.npy")))
            recipes = augment.build_views("simclr", size)
            for workers in args.workers:
                rate = {kind: loader_rate(data.ViewDataset(base, recipes), batch, workers,
                                          args.steps) for kind, base in bases.items()}
                decode.append(dict(size=size, method="simclr", batch=batch, workers=workers,
                                   **rate, speedup=rate["cache"] / rate["jpeg"]))
                print(f"{size:>5} {'simclr':<8}{batch:>6}{workers:>8}{rate['jpeg']:>11.0f}"
                      f"{rate['cache']:>9.0f}{decode[-1]['speedup']:>9.1f}×", flush=True)
    return dict(rows=rows, decode=decode)


def jpeg_folder(tmp, n, h=375, w=500):
    """n JPEG files of h × w (ImageNet's typical photo) in tmp/jpeg/train/x/: a smooth random
    colour field (bicubic from 12 × 16) plus mild noise, so that they compress and decode
    roughly like photographs rather than like pure noise (much slower) or flat colour."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(tmp, "jpeg", "train", "x"))
    for i in range(n):
        field = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 255,
                                                size=(h, w), mode="bicubic")[0]
        img = (field + 8 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
        torchvision.io.write_jpeg(img, os.path.join(tmp, "jpeg", "train", "x", f"{i}.jpg"),
                                  quality=90)
    return os.path.join(tmp, "jpeg")


# ============================================ resident: the views on the training device
def bench_resident(args, device):
    """Images/s of the resident path on ``device`` (views made there from the images held
    there, draws in this process) beside each method's whole training step (bench_methods'
    method_step, bf16 on a GPU) of each of --models at its image size, uncompressed and under
    the most compressed strategy of the schedules (drop 0.75, twice the base patch)."""
    import compress
    import methods
    import vit
    from bench_methods import method_step
    from bench_timing import interleaved_times, make_adamw
    rows = []
    print(f"# resident: images/s of resident.ResidentLoader on {device} (gather, crop + resize + "
          f"flip as two batched matmuls, colour ops), draws in this process, {args.steps} timed "
          f"batches; beside it the training step's images/s ({args.warmup} warm-up + "
          f"{args.steps} timed rounds, interleaved)")
    print(f"{'model':<6}{'method':<8}{'batch':>6}{'views img/s':>13}  {'strategy':<34}"
          f"{'step img/s':>11}  verdict")
    for model_name in args.models:
        p0, size = vit.PRESETS[model_name]["patch_size"], vit.PRESETS[model_name]["img_size"]
        batch = args.batch_size or (64 if size <= 64 else 16)
        base = loader_base(size, (1 + args.steps) * batch)
        images = resident.place(base, device)
        compressed = f"q:drop=0.75,patch={2 * p0};k:patch={2 * p0}"
        strategies = {"none": compress.NONE, compressed: compress.Strategy.parse(compressed)}
        for name in [m for m in ("simclr", "moco", "dino") if m in args.methods]:
            recipes = augment.build_views(name, size, colour="strong" if size <= 64 else "official")
            rate = loader_rate(data.ViewDataset(base, recipes), batch, 0, args.steps, images)
            torch.manual_seed(0)
            backbone = vit.build_vit(model_name)
            method = methods.build_method(name, backbone, **methods.head_sizes(name, backbone.dim))
            method = method.to(device).train()
            opt = make_adamw([p for p in method.parameters() if p.requires_grad])
            views = [torch.randn(batch, 3, r.size, r.size, device=device) for r in recipes]
            times = interleaved_times({s: method_step(method, opt, views, st.resolve(len(views)),
                                                      device) for s, st in strategies.items()},
                                      args.warmup, args.steps)
            for s in strategies:
                step = batch / times[s]["total"]
                verdict = "views keep up" if rate >= step else "views are slower"
                rows.append(dict(model=model_name, method=name, batch=batch, size=size,
                                 views_images_per_s=rate, strategy=s, step_images_per_s=step))
                print(f"{model_name:<6}{name:<8}{batch:>6}{rate:>13.0f}  {s:<34}{step:>11.0f}  "
                      f"{verdict}", flush=True)
            del method, opt
    return dict(rows=rows)
