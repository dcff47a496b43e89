"""Decode-once image cache (paper §6.1 at ImageNet scale): an image folder as one uint8 array.

Concern: decoding an ImageNet-sized image folder (``ROOT/<split>/<class>/*.JPEG``) once, into one
uint8 memmap of centre squares (shorter side resized to S, centre-cropped to S × S), so that the
loader only augments: a full-size JPEG costs ~5–10 ms to decode, more than augmenting it.
``build_cache`` writes ``CACHE/<split>.npy`` (+ ``_labels.npy``, ``.json``), ``CachedImages``
reads it (refusing a missing, truncated or inconsistent one with the command that rebuilds it),
and ``data.build_dataset(..., cache=CACHE)`` reads it instead of the JPEGs (via ``open_cache``).
The build is atomic: every file is written as *.tmp and renamed, the JSON sidecar last, so a
killed build never leaves a cache that looks complete, nor damages the previous one.

    python imagecache.py --data-root /data/imagenet100 --out /data/imagenet100_cache --size 256

    from imagecache import build_cache, CachedImages
    build_cache("/data/imagenet100", "val", "/data/imagenet100_cache/val.npy", short_side=256)
    img, label = CachedImages("/data/imagenet100_cache/val.npy")[0]   # uint8 (3, 256, 256)
"""
import argparse
import io
import json
import multiprocessing
import os
import shlex
import shutil
import time
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import Dataset

# data imports this module only inside build_dataset (lazily), so this is no import cycle.
from imagefolder import ImageFolderDataset, decode


# ===== the decode-once cache: an image folder as one uint8 array of S × S squares =====
#
# Once augmentation is batched (augment.augment_batch), decoding a full-size ImageNet JPEG
# (~5–10 ms) is most of the loader's work, and the most compressed strategies, whose steps are
# cheapest, wait for it. ``build_cache`` decodes every image once, resizes its shorter side to
# S and keeps the central S × S square, all in one (N, 3, S, S) uint8 .npy that training reads
# through a memory map: an item is then a copy of 3·S² bytes (196 kB at S = 256). The
# augmentation stays per epoch: RandomResizedCrop draws its crops from that square. Its cost,
# said plainly: the borders of a wide (or tall) image beyond the central square are never
# seen, and crop areas are fractions of the square's area, not of the whole image's.
#
# Files, for out_path = CACHE/train.npy: train.npy (images), train_labels.npy (int64 labels)
# and train.json (classes, S, source root, skipped files). Each is written as *.tmp and
# renamed, the JSON last: it is the mark of a complete cache, so a killed build never leaves
# a cache that looks complete (only *.tmp files, which the next build overwrites).


def square(img, size):
    """uint8 (3, H, W) → uint8 (3, size, size): the shorter side resized to ``size``
    (antialiased bilinear, as eval_transform; small images are enlarged), then the central
    size × size square, as the first steps of eval_transform at img_size = 0.875·size."""
    img = F.resize(img, [size], antialias=True)
    return F.center_crop(img, [size, size]).contiguous()


def _square_file(job):
    """(path, size) → (uint8 array (3, size, size), None), or (None, the error) for a file
    that cannot be decoded. A module-level function, so a multiprocessing Pool can run it."""
    path, size = job
    try:
        return square(decode(path), size).numpy(), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _cache_files(path):
    """CACHE/train.npy → (its labels file, its JSON sidecar)."""
    stem = path[:-4] if path.endswith(".npy") else path
    return stem + "_labels.npy", stem + ".json"


def _build_command(root, cache_dir, size, split):
    return (f"python imagecache.py --data-root {shlex.quote(root or 'ROOT')} "
            f"--out {shlex.quote(cache_dir)} --size {size} --split {split}")


def build_cache(root, split, out_path, short_side=256, workers=0, log_every=10.0):
    """Decode every image of ``root/split`` once into ``out_path`` (a .npy file): shorter side
    resized to ``short_side`` = S and centre-cropped to S × S (``square``), through the same
    decoding as ImageFolderDataset (grayscale, RGBA, 16-bit → 8-bit RGB). A file that cannot be
    decoded is left out with a warning, and listed in the JSON sidecar. ``workers`` > 1 decodes
    in a multiprocessing Pool (in order). Prints progress every ``log_every`` seconds; returns
    the sidecar's contents."""
    if short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    folder = ImageFolderDataset(root, split)               # the classes and files, as training
    n, S = len(folder.samples), short_side
    labels_path, meta_path = _cache_files(out_path)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    need, free = n * 3 * S * S, shutil.disk_usage(out_dir).free
    if need > free:              # a memmap that runs out of disk dies with SIGBUS, hours in
        raise OSError(f"the {split} cache needs {need / 1e9:.1f} GB ({n} images × 3 × {S}²), "
                      f"but '{out_dir}' has {free / 1e9:.1f} GB free")
    images = np.lib.format.open_memmap(out_path + ".tmp", mode="w+", dtype=np.uint8,
                                       shape=(n, 3, S, S))
    labels = np.empty(n, dtype=np.int64)
    t0 = time.time()
    kept, skipped = _decode_into(images, labels, folder.samples, S, workers, log_every, split)
    if kept == 0:
        raise RuntimeError(f"none of the {n} images under '{os.path.join(root, split)}' can be "
                           "decoded")
    images.flush()
    del images
    if kept < n:                                            # drop the unused tail rows
        _shrink_npy(out_path + ".tmp", kept)
    with open(labels_path + ".tmp", "wb") as f:
        np.save(f, labels[:kept])
    meta = dict(root=os.path.abspath(root), split=split, size=S, shape=[kept, 3, S, S],
                images=os.path.basename(out_path), labels=os.path.basename(labels_path),
                classes=folder.classes, skipped=len(skipped), skipped_files=skipped,
                seconds=round(time.time() - t0, 1))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    # Commit: first unmark any previous cache, then move the arrays, then mark this one.
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for tmp, final in ((out_path + ".tmp", out_path), (labels_path + ".tmp", labels_path),
                       (meta_path + ".tmp", meta_path)):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    return meta


def _decode_into(images, labels, samples, S, workers, log_every, split):
    """Decode ``samples`` [(path, label)] in order into the first rows of ``images`` / ``labels``
    (an unreadable file is skipped with a warning); ``workers`` > 1 decodes in a Pool. Prints
    progress every ``log_every`` seconds. Returns (rows written, skipped paths)."""
    n, skipped, kept = len(samples), [], 0
    jobs = [(path, S) for path, _ in samples]
    pool = multiprocessing.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) \
        if workers > 1 else None
    t0 = t_log = time.time()
    try:
        results = pool.imap(_square_file, jobs, chunksize=16) if pool else map(_square_file, jobs)
        for k, ((path, label), (img, error)) in enumerate(zip(samples, results), 1):
            if img is None:
                skipped.append(path)
                warnings.warn(f"unreadable image '{path}' ({error}); left out of the cache")
            else:
                images[kept], labels[kept] = img, label
                kept += 1
            if log_every and (time.time() - t_log >= log_every or k == n):
                t_log = time.time()
                rate = k / max(t_log - t0, 1e-9)
                eta = int((n - k) / rate)
                print(f"{split}: {k:,}/{n:,} images | {rate:,.0f} img/s | ETA "
                      f"{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)
    finally:
        if pool:
            pool.terminate()
    return kept, skipped


def _npy_header(f):
    """An open .npy file → (shape, dtype, version, offset of the data)."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f".npy format version {version} is not one this cache writes")
    shape, _, dtype = read[version](f)
    return shape, dtype, version, f.tell()


def _shrink_npy(path, rows):
    """Keep the first ``rows`` rows of a .npy file: a new header, then truncate. numpy (≥ 1.23)
    pads headers so that the first axis can change without moving the data; if this one cannot
    (the header would change length), the rows are copied to a new file instead."""
    with open(path, "rb+") as f:
        shape, dtype, version, offset = _npy_header(f)
        new_shape, header = (rows, *shape[1:]), io.BytesIO()
        write = {(1, 0): np.lib.format.write_array_header_1_0,
                 (2, 0): np.lib.format.write_array_header_2_0}[version]
        write(header, dict(descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False,
                           shape=new_shape))
        if len(header.getvalue()) == offset:
            f.seek(0)
            f.write(header.getvalue())
            f.truncate(offset + int(np.prod(new_shape)) * dtype.itemsize)
            return
    old = np.load(path, mmap_mode="r")
    new = np.lib.format.open_memmap(path + ".shrink", mode="w+", dtype=dtype, shape=new_shape)
    for a in range(0, rows, 1024):
        new[a:a + 1024] = old[a:min(a + 1024, rows)]
    new.flush()
    del old, new
    os.replace(path + ".shrink", path)


class CachedImages(Dataset):
    """The images of a ``build_cache`` file: items (uint8 (3, S, S), int label), ``classes``.

    The array is memory-mapped read-only, opened on first use in each process (loader
    workers map it themselves; the OS page cache is shared). A missing, truncated or
    inconsistent cache is refused here, with its path and the command that rebuilds it,
    rather than failing (or reading garbage) mid-run."""

    def __init__(self, path):
        self.path = path
        labels_path, meta_path = _cache_files(path)
        if not (os.path.isfile(meta_path) and os.path.isfile(path)):
            split = os.path.basename(path).removesuffix(".npy")
            killed = " (a killed build left *.tmp files)" if os.path.exists(path + ".tmp") else ""
            raise FileNotFoundError(
                f"image cache '{path}' is missing or incomplete: no "
                f"'{path if os.path.isfile(meta_path) else meta_path}'{killed}; build it with "
                f"{_build_command(None, os.path.dirname(path), 256, split)}")
        with open(meta_path) as f:
            meta = json.load(f)
        self.size, self.classes, self.skipped = meta["size"], meta["classes"], meta["skipped_files"]
        shape = tuple(meta["shape"])
        rebuild = "; rebuild it with " + _build_command(meta["root"], os.path.dirname(path),
                                                        self.size, meta["split"])
        try:
            with open(path, "rb") as f:
                file_shape, dtype, _, offset = _npy_header(f)
        except (ValueError, OSError) as e:
            raise ValueError(f"image cache '{path}' is not a readable .npy file ({e})"
                             f"{rebuild}") from e
        if file_shape != shape or dtype != np.uint8:
            raise ValueError(f"image cache '{path}' holds {dtype} {file_shape}, but "
                             f"'{meta_path}' says uint8 {shape}{rebuild}")
        expected, actual = offset + int(np.prod(shape)), os.path.getsize(path)
        if actual != expected:
            raise ValueError(f"image cache '{path}' is truncated or damaged: {actual:,} bytes, "
                             f"its {shape} images need {expected:,}{rebuild}")
        labels = np.load(labels_path) if os.path.isfile(labels_path) else None
        if labels is None or labels.shape != shape[:1] or not (
                0 <= labels.min() and labels.max() < len(self.classes)):
            raise ValueError(f"labels '{labels_path}' of image cache '{path}' are missing or do "
                             f"not match its {shape[0]} images and {len(self.classes)} classes"
                             f"{rebuild}")
        self.labels = torch.from_numpy(labels)
        self.index = torch.arange(shape[0])          # build_dataset's size= keeps a subset
        self._images = None

    def __getstate__(self):                         # loader workers open their own map
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")        # (N, 3, S, S) uint8
        img = np.array(self._images[int(self.index[i])])           # a copy: the map is read-only
        return torch.from_numpy(img), int(self.labels[i])


def open_cache(cache_dir, root, split, img_size):
    """build_dataset's ``cache=``: CachedImages of CACHE/<split>.npy, or an error that says
    how to build it. With the image folder at hand, its classes must be the cache's."""
    path = os.path.join(cache_dir, f"{split}.npy")
    if not os.path.isfile(_cache_files(path)[1]):
        raise FileNotFoundError(
            f"no {split} image cache in '{cache_dir}' (expected '{path}' and its .json); build "
            f"it with: {_build_command(root, cache_dir, round(img_size / 0.875), split)}")
    ds = CachedImages(path)
    folder = os.path.join(root, split) if root else None
    if folder and os.path.isdir(folder):
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if classes != ds.classes:
            raise ValueError(f"image cache '{path}' has {len(ds.classes)} classes that are not "
                             f"those of '{folder}' ({len(classes)}): it was built from "
                             f"another folder; rebuild it or pass the right --data-root")
    if ds.size < img_size:
        warnings.warn(f"image cache '{path}' holds {ds.size}-px squares, smaller than the "
                      f"{img_size}-px views: every crop is enlarged; build one with --size "
                      f"{round(img_size / 0.875)}")
    return ds


# ===== command line: build the decode-once cache =====
#
#     python imagecache.py --data-root ROOT --out CACHE [--size S] [--split train,val]

def main(argv=None):
    ap = argparse.ArgumentParser(description="Decode an image folder once into a uint8 cache of "
                                 "S × S squares (build_cache), which train.py --data-cache reads.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data-root", required=True, help="the image folder: ROOT/<split>/<class>/*")
    ap.add_argument("--out", required=True, help="cache directory: <split>.npy, "
                    "<split>_labels.npy and <split>.json are written there")
    ap.add_argument("--size", type=int, default=256,
                    help="S, the side of the cached squares: 256 = 224 / 0.875, the usual "
                         "ImageNet resize for 224-px training (use round(img_size / 0.875))")
    ap.add_argument("--split", default="train,val", help="comma-separated splits to cache")
    ap.add_argument("--workers", type=int, default=os.cpu_count(),
                    help="decoding processes (≤ 1: decode in this process)")
    args = ap.parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        ap.error(f"--split {args.split!r}: give at least one split, e.g. train,val")
    if args.size < 1:
        ap.error(f"--size {args.size} must be ≥ 1 pixel")
    for split in splits:
        out_path = os.path.join(args.out, f"{split}.npy")
        try:
            meta = build_cache(args.data_root, split, out_path, args.size, workers=args.workers)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            raise SystemExit(f"imagecache.py: error: {e}")
        n, size = meta["shape"][0], os.path.getsize(out_path)
        print(f"{split}: {n:,} images of {args.size}² in '{out_path}' ({size / 1e9:.2f} GB, "
              f"{meta['seconds']:.0f} s)" + (f"; {meta['skipped']} unreadable file(s) left out, "
                                             f"listed in its .json" if meta["skipped"] else ""),
              flush=True)


if __name__ == "__main__":
    main()
