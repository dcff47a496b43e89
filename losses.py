"""The losses of SimCLR, MoCo-v3, DINO and the multi-view method, and the target updates.

Concern: turning embeddings into one scalar loss (paper §3; the multi-view, small-projector
loss of the second paper, arXiv 2312.10725), and the EMA / centre updates the losses rely on.
The modules that produce the embeddings (backbone, heads, momentum encoder / teacher) are in
methods.py. Every loss is computed for the LOCAL batch against candidates gathered from ALL
ranks, so that under DDP (which averages gradients over ranks) one step on W processes equals
one step of a single process on the concatenated batch.

    SimCLR     ℓ_a = −1/(M−1) Σ_{p∈P(a)} log exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ)   M views, M−1 positives
    MoCo-v3    L = 2τ · CE(q·kᵀ/τ, key of the same image)              keys: momentum encoder
    DINO       H(p_t, p_s) = −Σ softmax((t − c)/τ_t) · log softmax(s/τ_s)   teacher: EMA copy
    MultiView  Σ_i (C_ii − 1)² + λ·Σ_{i≠j} C_ij²   Barlow Twins over M views (mean embedding)
"""
import torch
import torch.nn.functional as F

from distributed import all_reduce_mean, gather_no_grad, gather_with_grad, rank_world
from heads import float32


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
    # b ≠ a: anchor a's own column set to −∞. A scatter of a scalar, not ``logits[rows, cols] =
    # -inf``: indexing turns the Python scalar into a CPU tensor, copied to the device every step
    logits = logits.scatter(1, (view * n_g + image)[:, None], float("-inf"))
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
def ema_update(target, online, m):
    """θ_target ← m·θ_target + (1−m)·θ_online = θ_target + (1−m)·(θ_online − θ_target), every
    parameter in one fused pass (``_foreach_lerp_``: one kernel launch per group of tensors
    instead of two per parameter); buffers (BN running statistics) are the target's own, as
    in the official MoCo-v3 and DINO."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} parameters, online {len(onlines)}")
    torch._foreach_lerp_(targets, [p.detach() for p in onlines], 1.0 - m)
