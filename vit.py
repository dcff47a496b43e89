"""Vision Transformer from scratch, with flexible patch size and randomized token dropout.

Concern: the backbone of every method (paper §3, "ViT background"), including the two
operations that the acceleration framework needs from it (§4):

* **flexible patch size** — the patch-embedding kernel, stored at the base size p0, is
  resized to any patch size p with the FlexiViT pseudo-inverse rule, and the position
  embedding is resized to the new grid, so the *same weights* encode an image as
  (img/p)² tokens instead of (img/p0)²;
* **token dropout** — after the position embedding is added, a random subset of the patch
  tokens of each sample is kept (the class token always is).

Parameter names follow the layout of timm's ``VisionTransformer`` and of the official DINO
and MoCo-v3 checkpoints (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``), so those
backbones load here with ``load_state_dict(..., strict=True)`` and ours load there.
This file imports nothing else of the project, so it can be copied on its own.

Usage::

    import torch, vit
    model = vit.build_vit("cpu")                     # 32 px images, 4 px patches
    x = torch.randn(8, 3, 32, 32)
    feats = model(x)                                 # (8, 64) class token, after the norm
    fast = model(x, patch_size=8, drop=0.5)          # 16 patches, 8 of them kept
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


# ============================================================================ presets
# (dim, depth, heads) as in the ViT / DeiT papers; "cpu" is a small model for the
# embedded 32-px dataset, sized so that a full pre-training run takes minutes on 2 cores.
PRESETS = {
    "tiny": dict(img_size=224, patch_size=16, dim=192, depth=12, heads=3),
    "small": dict(img_size=224, patch_size=16, dim=384, depth=12, heads=6),
    "base": dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12),
    "cpu": dict(img_size=32, patch_size=4, dim=64, depth=4, heads=4),
}


def build_vit(name, **overrides):
    """A ViT from a preset name ("tiny", "small", "base", "cpu"), e.g. img_size overridden."""
    key = name[4:] if name.startswith("vit_") else name
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return ViT(**{**PRESETS[key], **overrides})


def vit_tiny(**kw):
    return build_vit("tiny", **kw)


def vit_small(**kw):
    return build_vit("small", **kw)


def vit_base(**kw):
    return build_vit("base", **kw)


def vit_cpu(**kw):
    return build_vit("cpu", **kw)


# ============================================================ flexible patch size (§4)
def interpolation_matrix(src, dst, mode):
    """The (dst_h·dst_w × src_h·src_w) matrix of resizing a src grid to a dst grid with
    F.interpolate(mode, align_corners=False), in float64.

    Built by resizing each vector of the identity basis: column i is the resized image of the
    grid that is 1 at cell i and 0 elsewhere. Resizing is linear, so resize(x) = M·vec(x)."""
    (sh, sw), (dh, dw) = src, dst
    basis = torch.eye(sh * sw, dtype=torch.float64).reshape(sh * sw, 1, sh, sw)
    resized = F.interpolate(basis, size=(dh, dw), mode=mode, align_corners=False)
    return resized.reshape(sh * sw, dh * dw).T                     # (dh·dw, sh·sw)


def resize_matrix(p0, p):
    """B, the (p²×p0²) matrix of bilinearly resizing a p0×p0 patch to p×p."""
    return interpolation_matrix((p0, p0), (p, p), "bilinear")


_MAPS = {}      # (what, key, device, dtype) -> tensor: built once, then no host copy per call


def cached_map(build, key, device, dtype):
    """``build(*key)`` (a tensor made on the host: a float64 matrix, a sin-cos embedding) cast
    and moved to (device, dtype) once: copying it from the host on every call would cost a
    transfer (and a sync) per forward pass."""
    k = (build.__name__, key, torch.device(device), dtype)
    if k not in _MAPS:
        _MAPS[k] = build(*key).to(device=device, dtype=dtype)
    return _MAPS[k]


def resize_kernel_matrix(p0, p):
    """pinv(Bᵀ), the (p²×p0²) map from a base kernel to the kernel for patch size p.

    We want a kernel ŵ that gives, on a patch B·x upsampled from a base patch x, the same
    token as w gives on x:  ⟨B x, ŵ⟩ = ⟨x, w⟩  for all x  ⇔  Bᵀ ŵ = w.  For p ≥ p0, B has
    full column rank, so ŵ = pinv(Bᵀ)·w solves it exactly (and is the least-norm
    solution); for p < p0 it is the least-squares best. In float64 (``cached_map`` casts).
    """
    return torch.linalg.pinv(resize_matrix(p0, p).T)               # (p², p0²)


class PatchEmbed(nn.Module):
    """Conv patch embedding whose kernel can be resized to any patch size (FlexiViT)."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def kernel(self, p):
        """The kernel for patch size p, a differentiable linear map of the base kernel."""
        w = self.proj.weight                                         # (D, C, p0, p0)
        if p == self.patch_size:
            return w
        m = cached_map(resize_kernel_matrix, (self.patch_size, p), w.device, w.dtype)  # (p², p0²)
        D, C, p0, _ = w.shape
        # In the weights' precision also under autocast, which would otherwise cast the map to
        # bf16 on every forward (a kernel, and 3 significant digits for a pseudo-inverse); the
        # convolution then casts the resized kernel as it casts the base one.
        with full_precision(w.device):
            w_new = m @ w.reshape(D * C, p0 * p0).T                  # (p², D·C)
        return w_new.T.reshape(D, C, p, p)

    def forward(self, x, p):
        x = F.conv2d(x, self.kernel(p), self.proj.bias, stride=p)    # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)                          # (B, N, D)


def full_precision(device):
    """Autocast off on ``device`` (a no-op where it has none, e.g. the meta device)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def interpolate_pos_embed(pos_embed, base_grid, grid):
    """Resize a (1, 1+g0², D) position embedding to a (gh, gw) grid.

    The patch part, a g0×g0 grid of D-vectors, is resized bicubically (align_corners=False,
    as timm and DINO) by a precomputed matrix, M (gh·gw × g0²) = the bicubic resize of the
    identity basis: the same numbers as F.interpolate, but as a matmul, whose backward Mᵀ·g is
    deterministic on CUDA (bicubic upsampling's backward is not, and raises under
    ``torch.use_deterministic_algorithms``) and needs no resize kernel. In float32, also under
    autocast (bicubic weights in half precision are inaccurate); the class-token position is
    kept as it is.
    """
    if tuple(grid) == (base_grid, base_grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]          # (1, 1, D), (1, g0², D)
    m = cached_map(interpolation_matrix, ((base_grid, base_grid), tuple(grid), "bicubic"),
                   pos_embed.device, torch.float32)                   # (gh·gw, g0²)
    with full_precision(pos_embed.device):
        patch_pos = (m @ patch_pos[0].float())[None].to(pos_embed.dtype)   # (1, gh·gw, D)
    return torch.cat([cls_pos, patch_pos], dim=1)                   # (1, 1+gh·gw, D)


def sincos_pos_embed(grid, dim, base_grid=None, temperature=10000.0):
    """MoCo-v3's fixed 2-D sin-cos position embedding for a (gh, gw) grid: (1, 1+gh·gw, dim).

    A token at row y, column x gets [sin(y·ω), cos(y·ω), sin(x·ω), cos(x·ω)] with the D/4
    frequencies ω_i = 1/temperature^(i/(D/4)); the class token's position is 0. Coordinates
    are those of the patch centre on the base grid, y = (r + ½)·g0/gh − ½, so at the base grid
    they are the integers 0..g0−1 (MoCo-v3's embedding exactly), and a coarser grid (patch
    scaling) places each token where its larger patch lies. Computed, not interpolated.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    base_h, base_w = (gh, gw) if base_grid is None else (base_grid, base_grid)
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * base_h / gh - 0.5      # (gh,)
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * base_w / gw - 0.5      # (gw,)
    y, x = torch.meshgrid(ys, xs, indexing="ij")                                # (gh, gw) each
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_y = y.reshape(-1, 1) * omega                                            # (gh·gw, D/4)
    out_x = x.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()[None]


# ====================================================================== token dropout
def kept_tokens(n, drop):
    """How many of n patch tokens token dropout keeps: round((1 − drop)·n), at least one."""
    return max(1, round((1.0 - drop) * n))


def token_dropout(x, drop):
    """Keep the class token and a random round((1−drop)·N) of the N patch tokens per sample.

    x: (B, 1+N, D), position embeddings already added, so a kept token still carries
    where it came from. Each sample draws its own subset: argsort of uniform noise is a
    uniformly random permutation, and its first n_keep entries a uniform random subset.
    The kept tokens come out in random order; attention does not care about order.
    """
    if drop == 0.0:
        return x
    B, L, D = x.shape
    n = L - 1
    n_keep = kept_tokens(n, drop)
    noise = torch.rand(B, n, device=x.device)
    keep = noise.argsort(dim=1)[:, :n_keep]                          # (B, n_keep)
    patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(B, n_keep, D))
    return torch.cat([x[:, :1], patches], dim=1)                     # (B, 1+n_keep, D)


# ============================================================================== blocks
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                         # 3 × (B, H, L, D/H)
        # softmax(q kᵀ / sqrt(D/H)) v, through the fused kernels (flash / memory-efficient
        # on GPU, a fused CPU kernel otherwise).
        x = F.scaled_dot_product_attention(q, k, v)                  # (B, H, L, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ================================================================================= ViT
class ViT(nn.Module):
    """Pre-norm ViT; ``forward(images, patch_size=None, drop=0.0, all_tokens=False)``.

    Image sizes: the base size ``img_size`` must be a multiple of the base ``patch_size``
    (the stored position embedding is for that grid). At run time an image of any size is
    accepted; for a patch size p that does not divide a side of length S, the image is
    first resized (bilinear) to g·p along that side with g = max(1, round(S/p)), so all of
    the image is seen and the token count is g² — e.g. 224 px at p = 30 → 7×7 tokens of a
    210-px resize. This is the rule the cost model (compress.py) counts with.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=192, depth=12, heads=3,
                 mlp_ratio=4.0, pos_embed="learned"):
        super().__init__()
        if patch_size < 1 or img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} must be a positive multiple of "
                             f"patch_size {patch_size} (the base grid of the position embedding)")
        if dim % heads != 0:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed {pos_embed!r}; allowed: learned, sincos")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.base_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pos_embed_kind = pos_embed
        self._init_weights()
        if pos_embed == "sincos":        # fixed: kept as a frozen parameter, as MoCo-v3 does,
            with torch.no_grad():        # so the state-dict layout is the same either way
                self.pos_embed.copy_(sincos_pos_embed((self.base_grid,) * 2, dim))
            self.pos_embed.requires_grad_(False)

    def config(self):
        """Everything needed to rebuild this model: ``ViT(**model.config())``."""
        cfg = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                   dim=self.dim, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio)
        if self.pos_embed_kind != "learned":        # older checkpoints have no such key
            cfg["pos_embed"] = self.pos_embed_kind
        return cfg

    def freeze_patch_embed(self):
        """MoCo-v3's stop-grad-conv1: the patch projection stays at a random initialisation,
        uniform(±√(6/(3·p0² + D))) with zero bias, and is never trained. Its paper traces the
        loss spikes of ViT self-supervised training to sudden gradient changes in this first
        layer; a fixed random projection removes them. Patch scaling still works: the kernel
        for another patch size is the pseudo-inverse resize of the frozen base kernel."""
        w = self.patch_embed.proj.weight
        bound = (6.0 / (w.shape[1] * w.shape[2] * w.shape[3] + self.dim)) ** 0.5
        with torch.no_grad():
            nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(self.patch_embed.proj.bias)
        self.patch_embed.proj.requires_grad_(False)
        return self

    def _init_weights(self):
        # timm / DeiT initialisation: truncated normal (std 0.02) for the embeddings and
        # linear layers, zero biases, unit LayerNorm.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid(self, size, p):
        """Tokens along one side of length ``size`` at patch size p (see the class docstring)."""
        return max(1, round(size / p))

    def tokens(self, images, patch_size=None):
        """Patch tokens plus class token, with position embeddings: (B, 1+N, D)."""
        p = self.patch_size if patch_size is None else int(patch_size)
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), "
                             f"got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if p < 1 or p > min(H, W):
            raise ValueError(f"patch_size {p} must be in [1, {min(H, W)}] for {H}×{W} images")
        gh, gw = self.grid(H, p), self.grid(W, p)
        if (gh * p, gw * p) != (H, W):
            images = F.interpolate(images, size=(gh * p, gw * p), mode="bilinear",
                                   align_corners=False, antialias=False)
        x = self.patch_embed(images, p)                              # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed_kind == "sincos" and (gh, gw) != (self.base_grid,) * 2:
            pos = cached_map(sincos_pos_embed, ((gh, gw), self.dim, self.base_grid),
                             x.device, x.dtype)                      # (1, 1+gh·gw, D), once
        else:
            pos = interpolate_pos_embed(self.pos_embed, self.base_grid, (gh, gw))
        return x + pos

    def forward(self, images, patch_size=None, drop=0.0, all_tokens=False):
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop {drop} must be in [0, 1)")
        x = self.tokens(images, patch_size)                          # (B, 1+N, D)
        if self.training:                                            # off at evaluation
            x = token_dropout(x, drop)                               # (B, 1+n_keep, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if all_tokens else x[:, 0]                          # (B, 1+L, D) or (B, D)


# ========================================================================= interop
def run_backbone(checkpoint, branch):
    """The backbone of a train.py checkpoint: from the method's state dict (methods.py names),
    the online one under ``backbone.``, the target under ``momentum_encoder.backbone.`` (MoCo-v3)
    or ``teacher.backbone.`` (DINO). Older checkpoints also stored them apart."""
    kept = {"online": "backbone", "target": "target_backbone"}[branch]
    if isinstance(checkpoint.get(kept), dict):
        return checkpoint[kept]
    method = {k.removeprefix("module."): v for k, v in checkpoint.get("method", {}).items()}
    prefixes = ("backbone.",) if branch == "online" else ("momentum_encoder.backbone.",
                                                          "teacher.backbone.")
    sd = {k[len(p):]: v for k, v in method.items() for p in prefixes if k.startswith(p)}
    if not sd:
        raise ValueError(f"the checkpoint holds no {branch} backbone"
                         + ("; use --branch online" if branch == "target" else ""))
    return sd


def backbone_state_dict(checkpoint, branch="online"):
    """Extract a backbone state dict in the layout above from a published checkpoint.

    Accepts a plain timm ``VisionTransformer`` state dict, an official DINO checkpoint
    (``{"student": ..., "teacher": ...}`` with ``module.backbone.`` prefixes), an official
    MoCo-v3 checkpoint (``{"state_dict": ...}`` with ``module.base_encoder.`` /
    ``module.momentum_encoder.`` prefixes) or a checkpoint written by train.py
    (``run_backbone``). ``branch`` picks the online (student / base encoder) or the target
    (teacher / momentum encoder) weights where a checkpoint holds both. Heads (``head.*``,
    ``fc_norm.*``, projectors) are dropped.
    """
    if branch not in ("online", "target"):
        raise ValueError(f"branch {branch!r} must be 'online' or 'target'")
    sd = checkpoint
    if isinstance(sd.get("method"), dict) or isinstance(sd.get("backbone"), dict):  # train.py
        sd = run_backbone(sd, branch)
    elif "teacher" in sd and "student" in sd:                                 # DINO
        sd = sd["teacher" if branch == "target" else "student"]
    elif "state_dict" in sd:                                                  # MoCo-v3
        sd = sd["state_dict"]
    elif "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    want = "momentum_encoder." if branch == "target" else "base_encoder."
    out = {}
    for key, value in sd.items():
        k = key
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.startswith(("base_encoder.", "momentum_encoder.")):
            if not k.startswith(want):
                continue
            k = k[len(want):]
        k = k[len("backbone."):] if k.startswith("backbone.") else k
        if k.startswith(("head.", "head_dist.", "fc_norm.", "predictor.")):
            continue
        out[k] = value
    if not any(k.startswith("blocks.") for k in out):
        raise ValueError("no ViT backbone weights ('blocks.N...') found in the checkpoint; "
                         f"its top-level keys are {sorted(checkpoint)[:10]}")
    return out
