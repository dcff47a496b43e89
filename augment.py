"""View augmentations of SimCLR, MoCo-v3 and DINO: the recipes, and making views (paper §6.1).

Concern: the family of augmentations the SSL methods learn invariance to, so where their
training signal is defined (paper §3, §6.1: the recipes of SimCLR, BYOL / MoCo-v3 and DINO's
multi-crop). ``build_views`` gives a method's ``ViewRecipe`` for each view, scaled to the image
size. A view is made in two steps: ``draw_params`` takes every random number it needs from an
explicit ``torch.Generator`` (data.ViewDataset seeds it by (seed, epoch, index), so a view is
pure in those three and a resumed run is bit-identical), then the ops apply them: image by
image with torchvision (``augment``, the reference) or a whole batch at once (``augment_batch``:
each op once, a parameter per image, several times faster; what the loader runs). With
``--augment-on device`` the loader stops after the crop and flip (``crop_flip``) and the
colour ops run where the model does (``colour_on_device``: the same ops on packed draws).
Datasets, the loader and sampling are in data.py, which imports this file.

    import torch; from augment import augment, augment_batch, build_views, draw_params
    img, recipe = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), build_views("moco", 32)[0]
    x = augment(img, recipe, torch.Generator().manual_seed(0))          # uint8 (3, 32, 32)
    p = draw_params(40, 40, recipe, torch.Generator().manual_seed(0))   # the draws augment took
    assert (augment_batch([img], recipe, [p])[0].int() - x.int()).abs().max() <= 1
    normalize(x)                                      # float, (x/255 − mean)/std: on the GPU
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics
METHODS = ("simclr", "moco", "dino", "multiview")         # the methods with a view recipe


# ===== augmentations: every draw from an explicit generator =====
#
# A view is made in two steps: ``draw_params`` takes every random number the view needs from the
# item's generator (crop box, flip, jitter factors and their order, grayscale, blur sigma,
# solarize), then the ops apply them. Two implementations of the ops share those draws:
#   augment        one image with torchvision's functional ops: the reference, short and obvious;
#   augment_batch  a whole batch, each op once for all images with per-sample parameters: what
#                  the loader runs; on one CPU thread 4–6× faster at 32 px (~0.12 ms a view
#                  instead of ~0.5) and 2.5–3× at 224 (bench.py --section loader).
# They agree to float rounding (tests/test_data.py). augment_batch computes each image exactly as
# it would alone (no op mixes images), so a view never depends on the batch it was made in.

@dataclass
class ViewRecipe:
    """One view's augmentation parameters: probabilities (_p), strengths and ranges."""
    size: int
    scale: tuple = (0.08, 1.0)              # crop area, as a fraction of the image's
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


@dataclass
class ViewParams:
    """One view's random draws; a branch not taken keeps the identity values."""
    box: tuple                              # crop (top, left, height, width) in the source image
    flip: bool = False
    jitter: bool = False
    factors: tuple = (1.0, 1.0, 1.0, 0.0)   # brightness, contrast, saturation (×); hue (turns)
    order: tuple = (0, 1, 2, 3)             # jitter ops (indices into factors) in applied order
    gray: bool = False
    blur: bool = False
    sigma: float = 1.0
    solarize: bool = False


# draw_params takes all its random numbers in one call (one by one, they cost 20× more): at most
# 22 for the crop (9 misses of 2, then a hit and its position) and 14 for the rest (see below).
_DRAWS = 22 + 14


def _uniform(u, lo, hi):
    return lo + (hi - lo) * next(u)


def _crop_box(h, w, scale, u, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (top, left, height, width): area ~ U(scale)·h·w and
    log(aspect) ~ U(log ratio), at a uniform position; after 10 misses (rare), the whole image.
    u: an iterator of U(0, 1) numbers."""
    for _ in range(10):
        area = h * w * _uniform(u, *scale)
        aspect = math.exp(_uniform(u, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(next(u) * (h - ch + 1)), int(next(u) * (w - cw + 1)), ch, cw
    return 0, 0, h, w


def draw_params(h, w, recipe, g):
    """Every random number of one view of an h×w image, from g, always in the same order."""
    r, u = recipe, iter(torch.rand(_DRAWS, generator=g).tolist())
    coin = lambda p: next(u) < p
    p = ViewParams(_crop_box(h, w, r.scale, u))
    p.flip = coin(r.flip_p)
    if coin(r.jitter_p):  # ColorJitter: factors ~ U(1 ± strength), hue ~ U(±hue), random order
        p.jitter = True
        p.factors = (_uniform(u, 1 - r.brightness, 1 + r.brightness),
                     _uniform(u, 1 - r.contrast, 1 + r.contrast),
                     _uniform(u, 1 - r.saturation, 1 + r.saturation), _uniform(u, -r.hue, r.hue))
        keys = [next(u) for _ in range(4)]        # sorting 4 uniforms: a uniform permutation
        p.order = tuple(sorted(range(4), key=lambda k: keys[k]))
    p.gray = coin(r.grayscale_p)
    if coin(r.blur_p):
        p.blur, p.sigma = True, _uniform(u, *r.blur_sigma)
    p.solarize = coin(r.solarize_p)
    return p


def blur_size(size):
    return max(3, int(0.1 * size) // 2 * 2 + 1)          # ~10 % of the side, odd: 23 at 224


def augment(img, recipe, g):
    """uint8 (3, H, W) → uint8 (3, size, size), in the order of BYOL, MoCo-v3 and DINO: crop,
    flip, colour jitter, grayscale, blur, solarize, then bytes (``to_uint8``; ``normalize``
    runs where the model does). Pure in (img, recipe, g). The reference, one image through
    torchvision; the loader runs augment_batch."""
    p = draw_params(img.shape[-2], img.shape[-1], recipe, g)
    x = F.to_dtype(img, torch.float32, scale=True)
    x = F.resized_crop(x, *p.box, [recipe.size] * 2, antialias=True)  # may upsample
    if p.flip:
        x = F.horizontal_flip(x)
    if p.jitter:
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for k in p.order:
            x = ops[k](x, p.factors[k]).clamp(0, 1)
    if p.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur:
        k = blur_size(recipe.size)
        x = F.gaussian_blur(x, [k, k], [p.sigma, p.sigma])
    if p.solarize:
        x = F.solarize(x, threshold=0.5)                     # PIL's 128 of 255
    return to_uint8(x)


def to_uint8(x):
    """Floats in [0, 1] → uint8, rounded to the nearest of 256 levels (an error ≤ 1/510). Views
    leave the loader as bytes, as the official PIL pipelines hold them before ToTensor: a
    quarter of float32's shared memory and host-to-device traffic (a batch of 128 views at
    224 px: 19 MB instead of 77)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


_NORMALISERS = {}   # device → (mean, std), made once: no host-to-device copy per batch


def normalize(views):
    """uint8 views (..., 3, s, s) → float (x/255 − mean)/std with ImageNet's mean and std, on
    the views' device (train.py: the GPU, after the transfer). Float64 input stays float64."""
    if views.device not in _NORMALISERS:
        _NORMALISERS[views.device] = tuple(torch.tensor(v, device=views.device)[:, None, None]
                                           for v in (MEAN, STD))
    mean, std = _NORMALISERS[views.device]
    x = views.to(torch.promote_types(views.dtype, torch.float32)) / 255
    return (x - mean) / std


# ----- the same ops on a batch: x (n, 3, H, W) floats in [0, 1], a parameter per image -----

def resized_crops(images, boxes, size):
    """Box b of image b resized to size×size: images, B uint8 (3, H_b, W_b) (a list, or a
    (B, 3, H, W) tensor), boxes B (top, left, height, width) → float (B, 3, size, size) in [0, 1].

    One F.interpolate per image, the very call of F.resized_crop(..., antialias=True), so crops
    equal the reference's bit for bit, and images of any sizes can share a batch. The loop is the
    fast way here: a batched version (gathering each output pixel's source rows and columns with
    their antialiasing weights, all images at once) was 1.5× slower at 32 px and 5× at 224,
    since PyTorch's resize does a whole axis in one fused C++ pass."""
    return torch.cat([torch.nn.functional.interpolate(                # (1, 3, size, size) each
        img[None, :, t:t + h, l:l + w].float().mul_(1 / 255),        # = F.to_dtype(scale=True)
        size=(size, size), mode="bilinear", antialias=True) for img, (t, l, h, w) in zip(images, boxes)])


def _gray(x):
    """Luma as torchvision (ITU-R 601): (n, 3, H, W) → (n, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114)[:, None]


def _blend(x, y, f):
    """f·x + (1 − f)·y clamped to [0, 1], torchvision's blend with a factor f (n,) per image."""
    f = f[:, None, None, None]
    return (x * f + y * (1 - f)).clamp(0, 1)


def _brightness(x, f):                                            # a blend with black
    return (x * f[:, None, None, None]).clamp(0, 1)


def _contrast(x, f):
    """A blend with the image's mean luma. The mean is summed in float64 (rows, then their total):
    there the sum of these float32 values is practically exact, so it rounds back to the same
    float32 whatever order threads add it up in, and one image's mean never depends on the batch."""
    m = _gray(x).sum(-1, dtype=torch.float64).sum(-1) / (x.shape[-2] * x.shape[-1])    # (n, 1)
    return _blend(x, m.float()[..., None, None], f)


def _saturation(x, f):                                            # a blend with the luma
    return _blend(x, _gray(x), f)


def _hue(x, f):
    """Rotate the hue by f turns, as F.adjust_hue (HSV). With v = max(r, g, b), Δ = v − min(r, g, b),
    the hue in sixths of a turn is (g − b)/Δ if v is r, 2 + (b − r)/Δ if g, 4 + (r − g)/Δ if b.
    A rotation keeps v and Δ; channel n ∈ (5, 3, 1) for (r, g, b) comes back as
    v − Δ·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6: the six-sector table of hsv→rgb as one
    piecewise-linear function of the hue."""
    r, g, b = x.unbind(1)                                                      # (n, H, W) each
    v = torch.maximum(torch.maximum(r, g), b)        # (elementwise: faster than a reduction)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    h6 = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * delta, r - g + 4 * delta))
    h6 = h6 / delta.clamp(min=1e-12) + 6 * f[:, None, None]   # grey (Δ = 0): any hue will do
    h6 = h6 - 6 * torch.floor(h6 / 6)                                         # mod 6: [0, 6)
    k = h6[:, None] + torch.arange(5.0, 0.0, -2.0, device=x.device)[:, None, None]  # + (5, 3, 1)
    k = torch.where(k >= 6, k - 6, k)                                          # mod 6 again
    return (v[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 1)


def _gaussian_blur(x, sigma, k):
    """Gaussian blur of side k, sigma (n,) per image, reflect padding, as F.gaussian_blur: 1-D
    weights softmax(−t²/2σ²) over offsets t = −(k−1)/2 … (k−1)/2, applied to rows then columns
    (the 2-D kernel is their outer product). All n·3 channels go through one depthwise
    convolution, each channel with its own image's kernel."""
    n, C, H, W = x.shape
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1).repeat_interleave(C, 0)  # (3n, k)
    y = torch.nn.functional.pad(x, [k // 2] * 4, mode="reflect").reshape(1, n * C, H + k - 1, -1)
    y = torch.nn.functional.conv2d(y, kernel[:, None, None, :], groups=n * C)   # (1, 3n, H+k-1, W)
    y = torch.nn.functional.conv2d(y, kernel[:, None, :, None], groups=n * C)   # (1, 3n, H, W)
    return y.reshape(n, C, H, W)


def crop_flip(images, recipe, params):
    """The geometric ops of a batch, done where the images are decoded: → float (B, 3, s, s)."""
    x = resized_crops(images, [p.box for p in params], recipe.size)
    flip = [b for b, p in enumerate(params) if p.flip]
    return _on(x, torch.tensor(flip), lambda y: y.flip(-1)) if flip else x


def augment_batch(images, recipe, params):
    """augment for a batch, each op run once with a parameter per image: B uint8 images (3, H_b,
    W_b) (a list, or a (B, 3, H, W) tensor) and their B ViewParams → uint8 (B, 3, size,
    size): the crop and flip (``crop_flip``), then the colour ops (``apply_colour``), each on
    just the images whose coin came up. Matches augment to float rounding (≲ 1e-5 before
    ``to_uint8``, so at most one level apart after), and each image's result is the same in
    any batch."""
    return to_uint8(apply_colour(crop_flip(images, recipe, params), pack_colour(params)))


# ----- the colour ops, each on just the images whose coin came up -----
#
# All the draws are made on the host (draw_params), so the host knows, without reading anything
# back from the device, which images take which op in which round. ``colour_plan`` lists those
# steps; ``apply_colour`` sends the steps' image indices and parameters to the images' device
# in one copy, then runs each op once on its images only (index_select → op → index_copy_): an
# image whose coin did not come up costs nothing. ColorJitter's random order is four rounds, round j
# applying to each jittered image the op at position j of its order; an image takes exactly one
# op a round, so the jitter is 4 ops an image, not 16 (every op on every image, the rest thrown
# away: 3–5× slower at 224 px, bench.py --section colour).
#
# The loader runs this on the CPU (augment_batch). With --augment-on device the loader stops
# after the crop and flip and ships each view as uint8 with its colour draws packed in 13 floats
# (``pack_colour``), and the step finishes it on the training device (``colour_on_device``).
# Brightness, contrast and saturation are all blends f·x + (1 − f)·y (y = 0, the mean luma, the
# luma image); they stay three ops: one merged pass would compute a luma for every image of it,
# brightness's included, for one kernel launch less.
# No torch.compile: the number of images an op takes changes from batch to batch, so static
# shapes would recompile for nearly every batch; compiled over the whole batch instead (every op
# on every image), the version before gained 2–2.5× on one CPU thread, this one 6× in eager.

def _grayscale(x):
    return _gray(x).expand(-1, 3, -1, -1).contiguous()


def _blur(x, sigma):
    return _gaussian_blur(x, sigma, blur_size(x.shape[-1]))


def _solarize(x):
    return torch.where(x >= 0.5, 1 - x, x)                       # PIL's 128 of 255


_JITTER = (_brightness, _contrast, _saturation, _hue)      # ColorJitter's ops, by index


def pack_colour(params):
    """The colour draws of B ViewParams → float (B, 13): jitter, its 4 factors, its order (4),
    grayscale, blur, sigma, solarize."""
    return torch.tensor([[p.jitter, *p.factors, *p.order, p.gray, p.blur, p.sigma, p.solarize]
                         for p in params], dtype=torch.float32)


def colour_plan(packed):
    """The colour ops of a batch in the order they apply, read from its packed draws on the host:
    packed (B, 13) on the CPU → [(op, images, values)]: the indices of the images that take op
    (all B: None) and op's parameter for each (None for an op without one). Ops no image takes
    are left out."""
    rows = packed.tolist()                                      # a host tensor: no device sync
    takes = lambda taken: [b for b, r in enumerate(rows) if taken(r)]          # noqa: E731
    steps = []
    for j in range(4):                  # round j: op k on the jittered images with order[j] = k
        for k, op in enumerate(_JITTER):
            sel = takes(lambda r: r[0] and r[5 + j] == k)
            steps.append((op, sel, [rows[b][1 + k] for b in sel]))
    steps.append((_grayscale, takes(lambda r: r[9]), None))
    sel = takes(lambda r: r[10])
    steps.append((_blur, sel, [rows[b][11] for b in sel]))
    steps.append((_solarize, takes(lambda r: r[12]), None))
    return [(op, None if len(sel) == len(rows) else sel, values) for op, sel, values in steps
            if sel]


def _to_device(numbers, device):
    """A list of floats as one float32 tensor on ``device``: one host-to-device copy, from pinned
    memory and asynchronous where that is CUDA (the step goes on queuing kernels meanwhile)."""
    t = torch.tensor(numbers, dtype=torch.float32)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def apply_colour(x, packed):
    """The colour ops of ``packed``'s draws on float views x (B, 3, s, s) in [0, 1], on any device,
    each op on just its images (x may change in place). packed: (B, 13) float on the CPU.

    The plan's indices, then its parameters, travel in one float32 tensor (indices below 2²⁴
    are exact in float32), so the device receives one copy per call and sends nothing back."""
    if packed.device.type != "cpu":
        raise ValueError(f"the packed colour draws must be on the CPU (host-known, so that no op "
                         f"waits for the device), got them on {packed.device}")
    if packed.shape != (len(x), 13):
        raise ValueError(f"packed colour draws of shape {tuple(packed.shape)}, expected "
                         f"({len(x)}, 13) for {len(x)} views")
    plan = colour_plan(packed)
    if not plan:                                          # no coin came up: nothing to send
        return x
    indices = [b for _, sel, _ in plan for b in sel or []]
    sent = _to_device(indices + [v for _, _, values in plan for v in values or []], x.device)
    index, values = sent[:len(indices)].long(), sent[len(indices):]            # views of one copy
    i = v = 0
    for op, sel, vals in plan:
        n = len(x) if sel is None else len(sel)
        args = [] if vals is None else [values[v:v + n]]
        x = _on(x, None if sel is None else index[i:i + n], op, *args)
        i, v = i + (0 if sel is None else n), v + (0 if vals is None else n)
    return x


def _on(x, index, op, *args):
    """x with op applied to the images at ``index`` (a tensor on x's device; None: all of
    them), in place; args: op's parameters, one value per image taking it."""
    if index is None:                           # everyone: no need to pick them out
        return op(x, *args)
    return x.index_copy_(0, index, op(x.index_select(0, index), *args))


def colour_on_device(crops, packed):
    """crops uint8 (B, 3, s, s) (or float in [0, 1]) on any device, and ``pack_colour``'s
    (B, 13) float on the CPU → uint8 views on the crops' device: augment_batch's colour ops
    (``apply_colour``: one host-to-device copy of the plan, no value read back), equal to
    augment_batch of the same draws to one level of 255 (the rounding of the shipped crop)."""
    x = crops.float().div_(255) if crops.dtype == torch.uint8 else crops.to(torch.float32,
                                                                           copy=True)
    return to_uint8(apply_colour(x, packed))


def to_model(views, device):
    """One view of a batch as the model takes it, normalised on ``device``: uint8 views
    (B, 3, s, s) as they are, or (crops, packed colour draws) from a loader that left the
    colour ops to the device (data.ViewDataset(colour_on="device")): the crops go to the
    device, the draws stay on the host, and colour_on_device sends the device what it needs."""
    if isinstance(views, (list, tuple)):
        crops, packed = views
        return normalize(colour_on_device(crops.to(device, non_blocking=True), packed))
    return normalize(views.to(device, non_blocking=True))


# ===== the methods' recipes =====

def build_views(method, img_size, views=2, local_crops=0, local_size=None, colour="official",
                **overrides):
    """The official recipes scaled to ``img_size``; ``views`` = M > 2 repeats them cyclically
    (DINO always has its two global crops, plus ``local_crops`` local ones). Blur sigma is
    (0.1, 2.0)·size/224, so at 32 px blur barely acts, like the CIFAR recipes that drop it.

    ``colour``: "official", or "strong" (COLOUR_PRESETS: hue and grayscale fully random).
    ``overrides`` (train.py's augmentation flags; None or absent = the method's own):
    scale (lo, hi) of the global crops, jitter_strength (× brightness, contrast, saturation),
    hue, grayscale_p, blur_p and solarize_p (one value, or one per global view, cycled),
    local_scale (lo, hi), and the preset's fields. Unknown keys raise."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if views < 1 or local_crops < 0:
        raise ValueError(f"need views >= 1 and local_crops >= 0, got {views} and {local_crops}")
    if colour not in COLOUR_PRESETS:
        raise ValueError(f"colour preset {colour!r}; allowed: {', '.join(COLOUR_PRESETS)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(over) - set(OVERRIDES)
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {sorted(unknown)}; allowed: {OVERRIDES}")
    small = img_size < 96
    # On a small image a crop of 8 % of the area (9×9 px of 32×32) often misses the object, and
    # the two views of a positive pair would share nothing: the lower bound rises to 25 %.
    lo = 0.25 if small else 0.08
    view = lambda size=img_size, **kw: ViewRecipe(size, blur_sigma=(0.1 * size / 224,
                                                                    2.0 * size / 224), **kw)
    if method in ("simclr", "multiview"):  # SimCLR's colour strength 0.5: 0.8·(.4, .4, .4, .1)
        globals_ = [view(scale=(lo, 1.0), saturation=0.4, blur_p=0.5)]
    elif method == "moco":               # the asymmetric pair of BYOL and MoCo-v3
        globals_ = [view(scale=(lo, 1.0), blur_p=1.0),
                    view(scale=(lo, 1.0), blur_p=0.1, solarize_p=0.2)]
    else:
        # DINO: global crops (0.4, 1) with multi-crop, widened to (0.14, 1) without (as its
        # README advises); local crops (0.05, 0.4), (0.15, 0.4) on small images as above, of
        # side 96/224 of the global one rounded to a multiple of 8 (or ``local_size``).
        g_lo = 0.4 if local_crops else max(lo, 0.14)
        globals_ = [view(scale=(g_lo, 1.0), blur_p=1.0),
                    view(scale=(g_lo, 1.0), blur_p=0.1, solarize_p=0.2)]
    globals_ = [_override(r, i, {**COLOUR_PRESETS[colour], **over}) for i, r in enumerate(globals_)]
    if method != "dino":
        return [globals_[v % len(globals_)] for v in range(views)]
    ls = local_size or max(8, round(img_size * 96 / 224 / 8) * 8)
    local = view(ls, scale=over.get("local_scale", (0.15 if small else 0.05, 0.4)), blur_p=0.5)
    local = _override(local, 0, {k: v for k, v in {**COLOUR_PRESETS[colour], **over}.items()
                                 if k not in ("scale", "blur_p", "solarize_p")})
    return globals_ + [local] * local_crops


# Settings a user may override (train.py's flags), and the colour presets. The embedded
# dataset draws every colour (shape and background) at random, so colour is its main
# nuisance, and the recipes' hue ±0.1 leaves enough of it for instance discrimination to key
# on instead of shape: "strong" rotates hue fully and grays half the views (SimCLR on the CPU
# preset, k-NN after 100k units: 19 % → 32 %). On natural images the official recipe is right.
OVERRIDES = ("scale", "jitter_strength", "hue", "grayscale_p", "blur_p", "solarize_p",
             "local_scale")
COLOUR_PRESETS = {"official": {}, "strong": dict(hue=0.5, grayscale_p=0.5)}


def _override(recipe, i, over):
    """recipe with the overrides applied; i picks the value of a per-view list (cycled)."""
    kw = {}
    for key, value in over.items():
        if key == "local_scale":
            continue
        if key == "jitter_strength":
            kw.update(brightness=recipe.brightness * value, contrast=recipe.contrast * value,
                      saturation=recipe.saturation * value)
        elif key in ("blur_p", "solarize_p"):
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            kw[key] = values[i % len(values)]
        else:
            kw[key] = tuple(value) if key == "scale" else value
    return dataclasses.replace(recipe, **kw)


def recipe_settings(args):
    """build_views' keyword arguments from train.py's options (a namespace, or the dict saved
    in a checkpoint: the probe rebuilds the run's own views). Absent or None: the default."""
    a = args if isinstance(args, dict) else vars(args)
    colour = a.get("colour") or ("strong" if a.get("data") == "embedded" else "official")
    return dict(colour=colour, scale=a.get("crop_scale"), jitter_strength=a.get("jitter_strength"),
                hue=a.get("hue"), grayscale_p=a.get("grayscale"), blur_p=a.get("blur"),
                solarize_p=a.get("solarize"), local_scale=a.get("local_crop_scale"),
                local_size=a.get("local_size"))
