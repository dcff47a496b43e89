"""SimCLR, MoCo-v3, DINO and the multi-view loss: heads, losses, momentum / teacher updates.

Concern: turning the features of a sample's views into one scalar loss (paper §3, the three
augmentation-invariance methods it accelerates; §6 for the recipes; and the multi-view,
small-projector loss of the second paper, arXiv 2312.10725). The backbone and the sequence
compression of each view are given: ``q`` (a compress.ViewCompression) compresses the
online / student / first view (it carries gradient), ``k`` the momentum / teacher / second
view; ``views`` is the list of views the step uses (train.py cuts a batch to the strategy's
M views; compress.Strategy.resolve). The statistics a method returns stay on the device:
the caller reads them at its log interval, so a step never waits for the GPU.
Every loss is computed for the LOCAL batch against candidates gathered from ALL ranks, so that
under DDP (which averages gradients over ranks) one step on W processes equals one step of a
single process on the concatenated batch.

    SimCLR     ℓ_a = −1/(M−1) Σ_{p∈P(a)} log exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ)   M views, M−1 positives
    MoCo-v3    L = 2τ · CE(q·kᵀ/τ, key of the same image)              keys: momentum encoder
    DINO       H(p_t, p_s) = −Σ softmax((t − c)/τ_t) · log softmax(s/τ_s)   teacher: EMA copy
    MultiView  Σ_i (C_ii − 1)² + λ·Σ_{i≠j} C_ij²   Barlow Twins over M views (mean embedding)

Usage::

    import torch; from vit import ViT; from losses import build_method
    method = build_method("moco", ViT(img_size=16, patch_size=4, dim=32, depth=2, heads=2),
                          proj_dim=16, hidden_dim=64)
    loss, stats = method([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], progress=0.0)
    loss.backward(); method.update_target(progress=0.0)     # after optimizer.step() in train.py
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import rank_world, all_reduce_mean, gather_no_grad, gather_with_grad  # noqa: F401
from compress import FULL, ViewCompression
from heads import DINOHead, float32, mlp
from schedule import momentum_schedule, teacher_temperature


# ============================================================================ losses
@float32
def nt_xent_multi(zs, temperature=0.2):
    """SimCLR's NT-Xent with M ≥ 2 views and several positives per anchor (multi-positive).

    zs: list of M (N, d) projections, view m of local image n in row n of zs[m]. The anchors
    are the M·N local rows; the candidates are the M·N_g rows of ALL ranks, gathered WITH
    gradient (a negative on rank s is an embedding made on rank r: rank s's loss must send
    gradient back to it). With s_ab = z_a·z_b / (‖z_a‖‖z_b‖) and P(a) the other M−1 views of
    anchor a's image,

        ℓ_a = −1/(M−1) Σ_{p∈P(a)} log( exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ) ),   loss = mean_a ℓ_a,

    so every other row, the other views of the same image included, is in the denominator,
    and the M−1 positives share it. For M = 2 this is SimCLR's loss with 2N_g − 2 negatives.
    """
    if len(zs) < 2:
        raise ValueError(f"NT-Xent needs at least 2 views, got {len(zs)}")
    rank, world = rank_world()
    m, n = len(zs), zs[0].shape[0]                                    # views M, local N
    n_g = n * world
    zs = [F.normalize(z, dim=1) for z in zs]
    anchors = torch.cat(zs)                                           # (M·N, d): view-major
    cands = torch.cat([gather_with_grad(z) for z in zs])              # (M·N_g, d): view-major
    logits = anchors @ cands.T / temperature                          # (M·N, M·N_g)  s_ab/τ
    dev = anchors.device
    idx = torch.arange(n, device=dev) + rank * n                      # our rows in a gathered view
    view = torch.arange(m, device=dev).repeat_interleave(n)           # (M·N,) anchor a's view
    image = idx.repeat(m)                                             # (M·N,) its global image
    rows = torch.arange(m * n, device=dev)
    logits[rows, view * n_g + image] = float("-inf")                  # b ≠ a: no self-similarity
    log_prob = F.log_softmax(logits, dim=1)                           # log exp(s_ab/τ) / Σ_{b≠a}
    # P(a): the columns of the same image in the M−1 other views v+1, …, v+M−1 (mod M),
    # made on the device (a list turned into a tensor would be a host-to-device copy per step)
    others = (view[:, None] + 1 + torch.arange(m - 1, device=dev)) % m          # (M·N, M−1)
    pos_col = others * n_g + image[:, None]
    return -log_prob.gather(1, pos_col).mean()                        # mean over P(a), then over a


def nt_xent(z1, z2, temperature=0.2):
    """SimCLR's two-view NT-Xent (2N_g − 2 negatives per anchor): ``nt_xent_multi`` at M = 2."""
    return nt_xent_multi([z1, z2], temperature)


def standardize(z, eps=1e-5, unbiased=False):
    """z̃ = (z − μ)/√(σ² + ε) per dimension, μ and σ² over the GLOBAL batch (biased, or
    unbiased: Σ/(n − 1), as torch.std, with ``unbiased``).

    The statistics are sums gathered with gradient from every rank, as GlobalBatchNorm1d
    computes them, so W processes standardise exactly as one process on the whole batch, and
    the gradient flows through μ and σ² to every rank's rows. (N, d) → (N, d), float32 or wider.
    """
    n = z.shape[0] * rank_world()[1]                                  # global batch size
    if n < 2:
        raise ValueError(f"standardising needs a global batch of at least 2, got {n}")
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    mean = gather_with_grad(z.sum(0, keepdim=True)).sum(0) / n        # μ: (d,)
    zc = z - mean
    var = gather_with_grad((zc * zc).sum(0, keepdim=True)).sum(0) / (n - 1 if unbiased else n)
    return zc * torch.rsqrt(var + eps)


def _correlation(a, b):
    """C = aᵀb / N_g over the GLOBAL batch, (N, d) × (N, d) → (d, d), the same on every rank."""
    n_g = a.shape[0] * rank_world()[1]
    return gather_with_grad((a.T @ b)[None]).sum(0) / n_g


def _off_diagonal(c):
    return c - torch.diag_embed(torch.diagonal(c))                   # C_ij for i ≠ j, 0 on i = j


@float32
def multiview_loss(zs, lambd=0.04, eps=1e-5):
    """Barlow Twins with M views, as the second paper's code computes it (arXiv 2312.10725).

    zs: list of M ≥ 2 (N, d) projections of the same N local images. Each row is first
    L2-normalised; then the M·N rows are standardised TOGETHER per dimension (unbiased σ, over
    the global batch), z̃_m being view m's rows. With C⁽ᵃᵇ⁾ = z̃_aᵀ z̃_b / N_g (d, d):

        M = 2:  L = Σ_i (C⁽¹²⁾_ii − 1)²  +  λ · Σ_{i≠j} (C⁽¹²⁾_ij)²              (Barlow Twins)
        M > 2:  z̄ = (1/M) Σ_m z̃_m,   L = (1/M) Σ_m Σ_i (C⁽ᵐᶻ̄⁾_ii − 1)²  +  λ · Σ_{i≠j} (C⁽ᶻ̄ᶻ̄⁾_ij)²

    The on-diagonal term makes every view agree with the others (with the mean embedding,
    itself included, for M > 2); the off-diagonal term decorrelates the dimensions of the
    shared embedding, which keeps it from collapsing. The authors special-case M = 2 because
    the mean includes the view itself: the M > 2 form at M = 2 is not Barlow Twins. Their
    recommendation — a small projector d with a strong λ — is why λ·d is large here (2.5–5 in
    their CIFAR-10 sweeps) where Barlow Twins' own λ = 0.005 at d = 8192 gives λ·d ≈ 41 with
    far more, far weaker pair terms. (ε: the authors divide by σ alone; a dead dimension
    would give NaN.) Returns (loss, on-diagonal term, λ·off-diagonal term).
    """
    m = len(zs)
    if m < 2:
        raise ValueError(f"the multi-view loss needs at least 2 views, got {m}")
    n = zs[0].shape[0]
    z = F.normalize(torch.cat(zs).to(torch.promote_types(zs[0].dtype, torch.float32)), dim=1)
    zt = standardize(z, eps, unbiased=True).split(n)                  # M × (N, d), joint stats
    if m == 2:
        c = _correlation(zt[0], zt[1])                                # (d, d) cross-correlation
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = _off_diagonal(c).pow(2).sum()
    else:
        z_bar = torch.stack(zt).mean(0)                               # (N, d) mean embedding
        on = sum((torch.diagonal(_correlation(v, z_bar)) - 1).pow(2).sum() for v in zt) / m
        off = _off_diagonal(_correlation(z_bar, z_bar)).pow(2).sum()
    return on + lambd * off, on, lambd * off


@float32
def moco_v3_loss(q, k, temperature=0.2):
    """MoCo-v3's contrastive loss of local predictions q against the keys k of ALL ranks."""
    rank, _ = rank_world()
    q = F.normalize(q, dim=1)                                         # (N, d)
    k = gather_no_grad(F.normalize(k, dim=1))                         # (N_g, d), no gradient
    logits = q @ k.T / temperature                                    # (N, N_g)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    # L = 2τ · CE(q·kᵀ/τ, labels). CE's gradient in q scales as 1/τ; the official code's 2τ
    # factor makes the gradient scale (and so the learning rate) roughly independent of τ.
    return F.cross_entropy(logits, labels) * (2 * temperature)


@float32
def dino_loss(student_out, teacher_out, center, student_temp=0.1, teacher_temp=0.04):
    """DINO's cross-entropy between every teacher crop i and every student crop j ≠ i.

    student_out: list of (N, K) logits, global crops first; teacher_out: list of (N, K) logits
    for the global crops only (teacher crop i is the same image as student crop i).
    """
    if not 1 <= len(teacher_out) <= len(student_out):
        raise ValueError(f"need 1 <= teacher crops ({len(teacher_out)}) <= student crops "
                         f"({len(student_out)})")
    with torch.no_grad():                             # the teacher gives targets, takes no gradient
        p_t = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_out]  # (N, K) each
    log_p_s = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    # H(p_t,i, p_s,j) = −Σ_K p_t,i · log p_s,j, mean over the batch, then over pairs i ≠ j
    terms = [(-p_t[i] * log_p_s[j]).sum(-1).mean()
             for i in range(len(p_t)) for j in range(len(log_p_s)) if i != j]
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center, teacher_out, momentum=0.9):
    """c ← m·c + (1−m)·mean of the teacher outputs over the GLOBAL batch, in place.

    The centre is subtracted from the teacher logits so no dimension dominates (avoids collapse
    to one prototype); it must be the same on every rank, hence the all-reduce.
    """
    batch_center = all_reduce_mean(torch.cat(teacher_out).mean(0, keepdim=True))  # (1, K)
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)
    return center


@torch.no_grad()
@torch.no_grad()
def ema_update(target, online, m):
    """θ_target ← m·θ_target + (1−m)·θ_online = θ_target + (1−m)·(θ_online − θ_target), every
    parameter in one fused pass (``_foreach_lerp_``: one kernel launch per group of tensors
    instead of two per parameter); buffers (BN running statistics) are the target's own, as
    in the official MoCo-v3 and DINO."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} parameters, online {len(onlines)}")
    torch._foreach_lerp_(targets, [p.detach() for p in onlines], 1.0 - m)


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
                 teacher_temp_warmup=0.0, center_momentum=0.9, momentum=0.996):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(backbone.dim, out_dim, hidden_dim, bottleneck_dim)
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
