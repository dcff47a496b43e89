"""The heads after the backbone: MoCo-v3's MLP (projector, predictor), DINO's head, and float32
under autocast for their last layers and for the losses (paper §3, §6: each method's head as its
official code builds it).

Usage::

    import torch; from heads import mlp, DINOHead
    proj = mlp(64, 512, 128, layers=3)                    # Linear → BN → ReLU ×2 → Linear → BN
    logits = DINOHead(64, out_dim=1024, hidden_dim=512, bottleneck_dim=128)(torch.randn(8, 64))
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import GlobalBatchNorm1d
from vit import full_precision


def float32(fn):
    """Run ``fn`` in float32 even under autocast: its tensor arguments are cast up and autocast
    is off inside. For the losses and the heads' last layers: measured in bf16, the NT-Xent
    gradient is 1.2 % off and DINO's 1.5 % (its teacher divides by 0.04), while the float32
    cost of a (B, d) projection is negligible next to the backbone's. Float64 stays float64."""
    def wrapper(*args, **kwargs):
        up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32)) \
            if torch.is_tensor(x) and x.is_floating_point() else x             # noqa: E731
        tensors = [x for a in args for x in (a if isinstance(a, list) else [a])
                   if torch.is_tensor(x)]          # the losses take lists of views' embeddings
        device = tensors[0].device if tensors else torch.device("cpu")
        with full_precision(device):
            return fn(*[up(a) if not isinstance(a, list) else [up(x) for x in a] for a in args],
                      **{k: up(v) for k, v in kwargs.items()})
    return functools.update_wrapper(wrapper, fn)


class Float32Linear(nn.Linear):
    """nn.Linear computed in float32 under autocast (a head's last layer; see ``float32``)."""

    def forward(self, x):
        with full_precision(x.device):
            return F.linear(x.to(torch.promote_types(x.dtype, self.weight.dtype)), self.weight,
                            self.bias)


def mlp(in_dim, hidden_dim, out_dim, layers, last_bn=True):
    """MoCo-v3's MLP: [Linear (no bias) → GlobalBN → ReLU] × (layers−1) → Linear (→ BN, no affine).

    No bias before a BN (the BN's β replaces it); the final BN has no affine, as in MoCo-v3.
    """
    if layers < 1:
        raise ValueError(f"an MLP needs layers >= 1, got {layers}")
    blocks = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == layers - 1 else hidden_dim
        blocks.append((nn.Linear if i < layers - 1 else Float32Linear)(d_in, d_out, bias=False))
        if i < layers - 1:
            blocks += [GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*blocks)


class DINOHead(nn.Module):
    """GELU MLP → bottleneck → L2-normalise → weight-normalised Linear to out_dim prototypes.

    The official code's two switches: ``use_bn`` puts a (global) BatchNorm after each hidden
    Linear (its ``--use_bn_in_head``); ``norm_last_layer=False`` lets each prototype's norm g
    learn (its ``--norm_last_layer``: "not normalizing leads to better performance but can make
    the training unstable"; the official README's improved ViT-S run turns it off, "only safe
    with vit_small")."""

    def __init__(self, in_dim, out_dim=4096, hidden_dim=1024, bottleneck_dim=256, layers=3,
                 use_bn=False, norm_last_layer=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks = []
        for i in range(layers):
            blocks.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                if use_bn:
                    blocks.append(GlobalBatchNorm1d(dims[i + 1]))
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        # w = g · v/‖v‖ with g starting at 1: every prototype has unit norm, so the logits are
        # cosines and cannot grow by scaling w. With norm_last_layer (the default) g stays fixed,
        # which stabilises training. original0 is g, original1 is v.
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        x = self.mlp(x)
        # The prototypes' logits in float32 under autocast: the teacher divides them by
        # τ_t = 0.04, which magnifies bf16's 3 significant digits into visible target error.
        with full_precision(x.device):
            x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # (B, bottleneck)
            return self.last_layer(x)                                 # (B, out_dim)
