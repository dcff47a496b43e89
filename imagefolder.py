"""Image files on disk: decoding any image file to uint8 RGB, and the ImageFolder layout.

Concern: reading images that users keep as files (``root/split/CLASS/*.jpg``, the
ImageNet-100 layout): what a file decodes to, and what happens when one cannot be read.
data.py builds datasets from it, imagecache.py decodes a folder once into a memmap with it.

    from imagefolder import ImageFolderDataset
    ds = ImageFolderDataset("data/cifar10", "train")     # (uint8 (3, H, W), label) items
"""
import os
import warnings

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as F
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def decode(path):
    """Any image file → uint8 RGB (3, H, W). torchvision decodes JPEG/PNG/WebP/GIF, PIL the
    rest (BMP, TIFF). Grayscale, RGBA and palette images become RGB; 16-bit images are
    rescaled (v >> 8, so 65535 → 255), never wrapped modulo 256."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 warns on every call that its decoders
            warnings.filterwarnings("ignore", message=".*decoding .* deprecated")  # are deprecated
            img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image
        with Image.open(path) as im:
            arr = np.asarray(im)
            if arr.dtype == np.uint16 and arr.ndim == 2:                    # 16-bit grayscale
                img = torch.from_numpy(arr.astype(np.int32)).to(torch.uint16).expand(3, -1, -1)
            else:
                img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return F.to_dtype(img, torch.uint8, scale=True).contiguous()


class ImageFolderDataset(Dataset):
    """``root/split/CLASS/*.jpg`` (the ImageNet-100 layout). Classes are the sorted subfolder
    names; files are matched by extension (case-insensitive) and decoded lazily.

    A file that fails to decode (truncated, corrupt) does not stop training: one bad JPEG among
    130k should not kill a multi-day run. Nor is it silent: a warning names the file, its path
    joins ``bad_files`` (per process: each loader worker keeps its own set), and the next
    decodable index (i+1) % n is returned in its place."""

    def __init__(self, root, split="train"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder root '{root}' does not exist")
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no '{split}/' folder under '{root}', which holds "
                                    f"{sorted(os.listdir(root))}; expected {split}/CLASS/images")
        self.classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"'{folder}' has no class subfolders; expected CLASS/images")
        self.samples, self.bad_files = [], set()
        for label, c in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(folder, c))
                           if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise FileNotFoundError(f"class folder '{os.path.join(folder, c)}' has no images "
                                        f"(extensions {', '.join(IMG_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, c, f), label) for f in files]
        self.labels = torch.tensor([label for _, label in self.samples])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            if path in self.bad_files:
                continue
            try:
                return decode(path), label
            except Exception as e:
                self.bad_files.add(path)
                warnings.warn(f"unreadable image '{path}' ({type(e).__name__}: {e}); "
                              f"substituting the next one")
        raise RuntimeError(f"none of the {len(self.samples)} images of the folder can be decoded")
