"""SimCLR, MoCo-v3, DINO and the multi-view method as modules: views in, (loss, statistics) out.

Concern: what each method computes on a sample's views (paper §3, §6 for the recipes; the
multi-view, small-projector method of the second paper, arXiv 2312.10725): which encoder sees
which view, compressed how, and which loss of losses.py joins them. The backbone and the
sequence compression of each view are given: ``q`` (a compress.ViewCompression) compresses the
online / student / first view (it carries gradient), ``k`` the momentum / teacher / second
view; ``views`` is the list of views the step uses (train.py cuts a batch to the strategy's
M views; compress.Strategy.resolve). The statistics a method returns stay on the device: the
caller reads them at its log interval, so a step never waits for the GPU.

Usage::

    import torch; from vit import ViT; from methods import build_method
    method = build_method("moco", ViT(img_size=16, patch_size=4, dim=32, depth=2, heads=2),
                          proj_dim=16, hidden_dim=64)
    loss, stats = method([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], progress=0.0)
    loss.backward(); method.update_target(progress=0.0)     # after optimizer.step() in train.py
"""
import copy

import torch
import torch.nn as nn

from compress import FULL, ViewCompression
from heads import DINOHead, mlp
from losses import dino_loss, ema_update, moco_v3_loss, multiview_loss, nt_xent_multi, update_center
from schedule import momentum_schedule, teacher_temperature


# =========================================================================== methods
def _enc(encoder, x, vc):
    """Encode x under the view compression vc (compress.ViewCompression)."""
    return encoder(x, patch_size=vc.patch_size, drop=vc.drop)


def _check_views(views, least):
    if len(views) < least:
        raise ValueError(f"got {len(views)} views; this method needs at least {least}")


def _project_views(backbone, projector, views, q, k):
    """Every view through backbone and projector, all carrying gradient (SimCLR, multi-view):
    view i compressed with q for even i and k for odd i, as compress.py charges them. One
    projector call on all views, as SimCLR does: BN statistics over the M·N rows.
    → list of M (N, proj) tensors."""
    _check_views(views, 2)
    h = [_enc(backbone, v, q if i % 2 == 0 else k) for i, v in enumerate(views)]   # M × (N, D)
    return list(projector(torch.cat(h)).split([v.shape[0] for v in views]))


class _Encoder(nn.Module):
    """backbone → head; the momentum encoder / teacher is a deepcopy of one of these."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, vc=FULL):
        return self.head(_enc(self.backbone, x, vc))


def _frozen_copy(module):
    target = copy.deepcopy(module)
    target.requires_grad_(False)               # updated only by EMA, never by the optimiser
    return target


class SimCLR(nn.Module):
    """SimCLR: backbone → projector → NT-Xent. Every view carries gradient.

    View i is compressed with q for even i and k for odd i (compress.py's
    cost model counts the same way: M views cost Σ_i 3·f(L_i)/f(L_0) units). With M views the
    loss is the multi-positive NT-Xent (``nt_xent_multi``): each of the M·N rows has the M−1
    other views of its image as positives and every other row of the M·N_g as candidates in
    the denominator; at M = 2 it is SimCLR's own loss.
    """

    def __init__(self, backbone, proj_dim=128, hidden_dim=2048, temperature=0.2):
        super().__init__()
        self.backbone, self.temperature = backbone, temperature
        self.projector = mlp(backbone.dim, hidden_dim, proj_dim, layers=2)  # SimCLR: 1 hidden

    def forward(self, views, q=FULL, k=FULL, progress=0.0):
        z = _project_views(self.backbone, self.projector, views, q, k)   # M × (N, proj)
        loss = nt_xent_multi(z, self.temperature)
        return loss, {"loss": loss.detach()}

    def cost_heads(self):
        """(head after an online view, head after a target view), for compress.CostModel."""
        return self.projector, None

    def update_target(self, progress):
        """No target network in SimCLR."""


class MoCoV3(nn.Module):
    """MoCo-v3: online backbone → projector → predictor; momentum backbone → projector (EMA).

    symmetric=True (official): every view is a query (online, compressed by q) and a key
    (momentum, by k); the loss is ctr(q1, k2) + ctr(q2, k1). symmetric=False: view 1 is only a query
    and view 2 only a key, loss = ctr(q1, k2), half the cost. With M views: queries × keys over
    all pairs i ≠ j, mean over pairs × (2 if symmetric else 1): the above when M = 2. Symmetric,
    every view is encoded once online and once by the momentum encoder (M·(3 + 1) units);
    one-directional, view 1 is the only query and views 2..M are keys (3 + (M − 1) units).
    """

    def __init__(self, backbone, proj_dim=256, hidden_dim=4096, temperature=0.2, symmetric=True,
                 momentum=0.99):
        super().__init__()
        self.backbone, self.temperature, self.symmetric = backbone, temperature, symmetric
        self.momentum = momentum                                      # base of momentum_schedule
        self.projector = mlp(backbone.dim, hidden_dim, proj_dim, layers=3)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim, layers=2, last_bn=False)
        # Only the online branch has a predictor (MoCo-v3, after BYOL): the two branches are
        # deliberately asymmetric, and the predictor is trained only through the queries.
        self.momentum_encoder = _frozen_copy(_Encoder(backbone, self.projector))

    def forward(self, views, q=FULL, k=FULL, progress=0.0):
        _check_views(views, 2)
        m = len(views)
        queries = range(m) if self.symmetric else [0]
        keys = range(m) if self.symmetric else range(1, m)
        z_q = {i: self.predictor(self.projector(_enc(self.backbone, views[i], q)))
               for i in queries}                                      # (N, proj) each
        with torch.no_grad():
            z_k = {j: self.momentum_encoder(views[j], k) for j in keys}   # (N, proj) each
        pairs = [(i, j) for i in queries for j in keys if i != j]
        loss = sum(moco_v3_loss(z_q[i], z_k[j], self.temperature) for i, j in pairs) / len(pairs)
        loss = loss * (2 if self.symmetric else 1)
        return loss, {"loss": loss.detach()}

    def cost_heads(self):
        """(head after an online view, head after a target view), for compress.CostModel."""
        return nn.Sequential(self.projector, self.predictor), self.momentum_encoder.head

    @torch.no_grad()
    def update_momentum(self, m):
        """θ_k ← m·θ_k + (1−m)·θ_q over backbone and projector (called after optimizer.step();
        the official code does it at the start of the next forward, which is the same thing)."""
        ema_update(self.momentum_encoder, _Encoder(self.backbone, self.projector), m)

    def update_target(self, progress):
        self.update_momentum(momentum_schedule(progress, self.momentum))


class DINO(nn.Module):
    """DINO: student backbone → DINOHead; teacher = EMA copy; centred, sharpened teacher targets.

    views[0:2] are the global crops: student compressed by q, teacher by k. Any
    further views are local crops, student only, with q's drop but the base patch size: a local
    crop is already a short sequence (96 px at p=16 is 36 tokens), so patch scaling would leave
    almost nothing. Crops of equal shape share one backbone call (as DINO groups by resolution).
    M views are 2 global + (M − 2) local crops (compress.local_crops); the loss averages H over the 2·(M − 1) (teacher crop, other student crop) pairs.
    """

    def __init__(self, backbone, out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
                 student_temp=0.1, teacher_temp=0.04, teacher_temp_final=0.04,
                 teacher_temp_warmup=0.0, center_momentum=0.9, momentum=0.996, use_bn=False,
                 norm_last_layer=True):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(backbone.dim, out_dim, hidden_dim, bottleneck_dim, use_bn=use_bn,
                             norm_last_layer=norm_last_layer)
        self.teacher = _frozen_copy(_Encoder(backbone, self.head))
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.momentum = momentum                                      # base of momentum_schedule
        self.teacher_temps = (teacher_temp, teacher_temp_final, teacher_temp_warmup)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _student(self, crops, vc):
        """Student logits per crop; consecutive crops of equal shape go through in one call."""
        out, i = [], 0
        while i < len(crops):
            j = i + 1
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            h = self.head(_enc(self.backbone, torch.cat(crops[i:j]), vc))  # ((j−i)·N, K)
            out += h.split([c.shape[0] for c in crops[i:j]])
            i = j
        return out

    def forward(self, views, q=FULL, k=FULL, progress=0.0):
        _check_views(views, 2)
        local = ViewCompression(drop=q.drop)          # local crops: q's drop at the base patch
        student = self._student(views[:2], q) + self._student(views[2:], local)
        with torch.no_grad():
            teacher = self.teacher(torch.cat(views[:2]), k).chunk(2)   # 2 × (N, K)
        temp = teacher_temperature(progress, *self.teacher_temps)
        loss = dino_loss(student, teacher, self.center, self.student_temp, temp)
        update_center(self.center, teacher, self.center_momentum)     # after the loss, as DINO
        return loss, {"loss": loss.detach(), "teacher_temp": temp}

    def cost_heads(self):
        """(head after a student crop, head after a teacher crop), for compress.CostModel."""
        return self.head, self.teacher.head

    def cancel_last_layer_gradients(self):
        """Drop the gradient of the head's last layer (the prototypes), so this step leaves it
        as it is. DINO freezes it for the first epoch: while the backbone is still random,
        the prototypes would follow noise, and the official code found training more stable
        with them fixed. AdamW skips a parameter without gradient (no step, no decay)."""
        for p in self.head.last_layer.parameters():
            p.grad = None

    @torch.no_grad()
    def update_teacher(self, m):
        """θ_t ← m·θ_t + (1−m)·θ_s over backbone and head."""
        ema_update(self.teacher, _Encoder(self.backbone, self.head), m)

    def update_target(self, progress):
        self.update_teacher(momentum_schedule(progress, self.momentum))


class MultiView(nn.Module):
    """Many cheap views, small projector (arXiv 2312.10725): backbone → MLP → ``multiview_loss``.

    Every view carries gradient; view i is compressed with q for even i and k for odd i, as
    in SimCLR (and charged the same by compress.py). The projector is the
    authors': Linear(D → d) → BN → ReLU → Linear(d → d), hidden width = output width d, small
    (128 at most, and no wider than the batch: a d × d correlation from fewer than d rows is
    rank-deficient, and its off-diagonal term could not reach 0), with λ = 0.04. All views go
    through the projector in one call, as the authors' code does: BN statistics over M·N rows.
    """

    def __init__(self, backbone, proj_dim=128, lambd=0.04):
        super().__init__()
        self.backbone, self.lambd = backbone, lambd
        self.projector = mlp(backbone.dim, proj_dim, proj_dim, layers=2, last_bn=False)

    def forward(self, views, q=FULL, k=FULL, progress=0.0):
        z = _project_views(self.backbone, self.projector, views, q, k)   # M × (N, d)
        loss, on, off = multiview_loss(z, self.lambd)
        return loss, {"loss": loss.detach(), "on_diag": on.detach(), "off_diag": off.detach()}

    def cost_heads(self):
        """(head after an online view, head after a target view), for compress.CostModel."""
        return self.projector, None

    def update_target(self, progress):
        """No target network in the multi-view method."""


METHODS = {"simclr": SimCLR, "moco": MoCoV3, "dino": DINO, "multiview": MultiView}


def head_sizes(name, dim):
    """Projector / head sizes: the official ones for ViT-S/B; for a narrow backbone (the CPU
    preset) heads sized to it, since a 4096-wide MLP would cost more than the ViT itself."""
    small = dim < 256
    if name == "simclr":
        return dict(proj_dim=128, hidden_dim=512 if small else 2048)
    if name == "moco":
        return dict(proj_dim=128 if small else 256, hidden_dim=512 if small else 4096)
    if name == "dino":
        return dict(out_dim=4096 if small else 65536, hidden_dim=512 if small else 2048,
                    bottleneck_dim=128 if small else 256)
    if name == "multiview":                       # the second paper: a small projector
        return dict(proj_dim=128)
    raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")


def method_kwargs(args, dim):
    """The constructor arguments of ``args.method`` from train.py's options: head sizes for a
    backbone of width ``dim``, then the flags that override them (saved in every checkpoint,
    so the probe and eval.py rebuild the same model)."""
    kw = head_sizes(args.method, dim)
    if args.method in ("moco", "dino") and args.momentum is not None:
        kw["momentum"] = args.momentum
    if args.method == "moco":
        kw["symmetric"] = args.symmetric
    if args.method == "dino":
        kw.update(teacher_temp=args.warmup_teacher_temp, teacher_temp_final=args.teacher_temp,
                  teacher_temp_warmup=args.warmup_teacher_temp_frac)
        if args.out_dim is not None:
            kw["out_dim"] = args.out_dim
        kw.update(use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer)
    if args.method == "multiview":
        per_view = args.batch_size                     # rows of each view's correlation
        if args.proj_dim is not None and args.proj_dim > per_view:
            raise ValueError(f"--proj-dim {args.proj_dim} is wider than the batch "
                             f"({per_view} images): its d × d correlation would be rank-"
                             f"deficient; use --proj-dim ≤ {per_view}")
        kw["proj_dim"] = args.proj_dim or min(kw["proj_dim"], per_view)
        if args.lambd is not None:
            kw["lambd"] = args.lambd
    return kw


def build_method(name, backbone, **kwargs):
    """``build_method("moco", vit, proj_dim=256)`` → MoCoV3(vit, proj_dim=256)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](backbone, **kwargs)
