"""The embedded dataset: ten shapes on random textured backgrounds, generated, not downloaded.

Concern: the offline default dataset of the project (paper §6.1 stands in ImageNet-100 for
it), so that ``python train.py`` runs on a fresh machine. Its design goal: the class (a
shape) survives the SSL augmentations, while nuisances (colour, position, size, rotation,
background texture) dominate pixel space — raw pixels and a random-init ViT classify it
poorly, so whatever k-NN accuracy a run reaches was learned.

    from embedded import EmbeddedShapes
    train = EmbeddedShapes("train")              # 8000 images, uint8 (3, 32, 32), 10 classes
    img, label = train[0]                         # label 0: 'disc'
"""
import math

import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import Dataset


def mix_seed(*values):
    """A 63-bit seed from integers, the same on every machine and run (splitmix64 finaliser per
    value). Python's hash() is salted per process, so it cannot seed what a restart must replay."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TensorImages(Dataset):
    """Images already in memory: ``images`` uint8 (N, 3, H, W), ``labels`` long (N,)."""

    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _sd_box(p, half):
    """Signed distance to a centred box: |max(q, 0)| + min(max(qx, qy), 0) with q = |p| - half."""
    q = p.abs() - torch.tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def _sd_polygon(p, verts):
    """Signed distance to a polygon (negative inside), all K edges at once: the distance to the
    nearest edge, negated when a horizontal ray from p crosses an odd number of edges."""
    v = torch.tensor(verts)                                   # (K, 2) vertices a; edges a → b
    e = v.roll(1, 0) - v                                      # (K, 2) b - a
    w = p[..., None, :] - v                                   # (..., K, 2) p - a
    t = ((w * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)       # nearest point a + t·e on each edge
    d2 = ((w - e * t[..., None]) ** 2).sum(-1).amin(-1)
    # The ray from p towards +x crosses edge a → b iff p_y lies between a_y and b_y and p is on
    # the matching side of the edge (e × w > 0): all three tests true, or all three false.
    py = p[..., 1, None]
    c = torch.stack([py >= v[:, 1], py < v[:, 1].roll(1),
                     e[:, 0] * w[..., 1] > e[:, 1] * w[..., 0]])                  # (3, ..., K)
    inside = (c.all(0) | (~c).all(0)).sum(-1) % 2 == 1                 # (...,) even-odd rule
    return torch.where(inside, -d2.sqrt(), d2.sqrt())


def _star(k, r_out, r_in):  # 2k vertices alternating between two radii, the first one on top
    return [((r_in, r_out)[j % 2 == 0] * math.sin(math.pi * j / k),
             (r_in, r_out)[j % 2 == 0] * math.cos(math.pi * j / k)) for j in range(2 * k)]


# Each shape fits the unit disc of its own frame, so one radius sets its size.
SHAPES = {
    "disc": lambda p: p.norm(dim=-1) - 0.85,
    "ring": lambda p: (p.norm(dim=-1) - 0.7).abs() - 0.25,
    "crescent": lambda p: torch.maximum(p.norm(dim=-1) - 0.9,  # a disc minus an offset disc
                                        0.75 - (p - torch.tensor([0.4, 0.0])).norm(dim=-1)),
    "square": lambda p: _sd_box(p, (0.68, 0.68)),
    "triangle": lambda p: _sd_polygon(p, _star(3, 0.95, 0.475)),  # inner vertices on the edges
    "cross": lambda p: torch.minimum(_sd_box(p, (0.9, 0.27)), _sd_box(p, (0.27, 0.9))),
    "star": lambda p: _sd_polygon(p, _star(5, 0.95, 0.4)),
    "bars": lambda p: _sd_box(p.abs() - torch.tensor([0.45, 0.0]), (0.2, 0.85)),
    "L": lambda p: _sd_polygon(p, [(-.65, -.75), (.65, -.75), (.65, -.35), (-.25, -.35),
                                   (-.25, .75), (-.65, .75)]),
    "arrow": lambda p: _sd_polygon(p, [(-.9, -.15), (.1, -.15), (.1, -.55), (.9, 0), (.1, .55),
                                       (.1, .15), (-.9, .15)]),
}


def _render_shapes(labels, img_size, g):
    """Render one batch: (B,) labels → uint8 (B, 3, S, S). Every nuisance is drawn from g."""
    B, S = len(labels), img_size
    u = lambda *shape: torch.rand(*shape, generator=g)
    xs = (torch.arange(S) + 0.5) / S * 2 - 1              # pixel centres; the side has length 2
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1)           # (S, S, 2) as (x, y)
    # Radius r = the fraction of the side the shape's diameter spans, in [0.35, 0.7]; the
    # centre keeps the whole unit disc of the shape inside the image.
    r = 0.35 + 0.35 * u(B)
    centre = (u(B, 2) * 2 - 1) * (1 - r)[:, None]
    # A rotation θ and a mirror image (flips are augmentations: both chiralities must occur).
    theta, mirror = u(B) * 2 * math.pi, torch.where(u(B) < 0.5, -1.0, 1.0)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    # Into each shape's frame: p = R(-θ)(x - c) / r, then mirror x.          (B, S, S, 2)
    d = (grid[None] - centre[:, None, None]) / r[:, None, None, None]
    p = torch.stack([(cos * d[..., 0] + sin * d[..., 1]) * mirror[:, None, None],
                     -sin * d[..., 0] + cos * d[..., 1]], -1)
    sdf = torch.empty(B, S, S)
    for k, fn in enumerate(SHAPES.values()):
        if (labels == k).any():
            sdf[labels == k] = fn(p[labels == k])
    # Antialiasing: a pixel's coverage is 0.5 - (signed distance in pixels), clipped to [0, 1];
    # one frame unit is r·S/2 pixels.
    alpha = (0.5 - sdf * (r * S / 2)[:, None, None]).clamp(0, 1)[:, None]  # (B, 1, S, S)
    # Background: stripes of random orientation φ, frequency (1-6 cycles per side) and phase
    # between two random colours, plus smooth colour noise (a 4×4 grid upsampled).
    phi, freq, phase = (u(B, 1, 1) * math.pi, 1 + 5 * u(B, 1, 1), u(B, 1, 1) * 2 * math.pi)
    proj = grid[..., 0] * phi.cos() + grid[..., 1] * phi.sin()                      # (B, S, S)
    stripes = 0.5 + 0.5 * torch.sin(math.pi * freq * proj + phase)
    # Polarity: the shape is brighter or darker than the whole background, so it survives
    # grayscale and colour jitter; which one is random, so polarity is a nuisance too. The
    # bands barely overlap ([0.55, 1] vs [0, 0.6] per channel): the outline stays, while the
    # stripes get about the shape's contrast and so dominate pixel distances.
    bright = (u(B) < 0.5)[:, None, None]
    fg = torch.where(bright, 0.55 + 0.45 * u(B, 1, 3), 0.45 * u(B, 1, 3))[:, 0]         # (B, 3)
    c1, c2 = torch.where(bright, 0.6 * u(B, 2, 3), 0.4 + 0.6 * u(B, 2, 3)).unbind(1)   # (B, 3)
    bg = c1[..., None, None] + (c2 - c1)[..., None, None] * stripes[:, None]   # (B, 3, S, S)
    bg = bg + F.resize(u(B, 3, 4, 4) - 0.5, [S, S], antialias=False) * 0.3
    img = bg.clamp(0, 1) * (1 - alpha) + fg[..., None, None] * alpha
    img = img + 0.03 * torch.randn(B, 3, S, S, generator=g)                   # sensor noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class EmbeddedShapes(TensorImages):
    """Ten shapes (disc, ring, crescent, square, triangle, cross, star, bars, L, arrow) drawn
    with antialiased signed-distance functions at a random position, size (35-70 % of the
    side), rotation and mirroring, in a random colour, on a random striped and noisy
    background. The class survives crops, flips, colour jitter, grayscale and blur, while the
    nuisances dominate pixel space. With the defaults, k-NN (k=20) scores about 29 % on
    normalised pixels and 14 % on a random-init ViT, while a small CNN trained with labels on
    these augmentations reaches 95 %: only learned invariances separate the classes. It is the
    offline default: nothing is downloaded, and 10k images at 32 px take about 1.5 s.

    Deterministic: images are made in chunks of 2^20 pixels, the one at j seeded by
    (seed, split, j), so the same arguments give the same bytes and a smaller ``size`` gives a
    prefix of a larger one. Labels cycle 0..9, so the classes are balanced."""

    def __init__(self, split="train", size=None, img_size=32, seed=0):
        n = size if size is not None else (8000 if split == "train" else 2000)
        if split not in ("train", "val") or n < 1 or img_size < 8:
            raise ValueError(f"EmbeddedShapes needs split 'train' or 'val', size >= 1 and "
                             f"img_size >= 8; got {split!r}, {n}, {img_size}")
        chunk, chunks = max(1, 2**20 // img_size**2), []    # 1024 images (1M pixels) at 32 px
        for j in range(0, n, chunk):
            g = torch.Generator().manual_seed(mix_seed(seed, ("train", "val").index(split), j))
            labels = torch.arange(j, j + chunk) % len(SHAPES)
            chunks.append(_render_shapes(labels, img_size, g)[: n - j])
        super().__init__(torch.cat(chunks), torch.arange(n) % len(SHAPES), SHAPES.keys())
