"""Tests for losses.py: each loss against a loop-by-loop reference, and the methods' claims."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import GlobalBatchNorm1d
from heads import DINOHead, mlp
from compress import ViewCompression as vc
from distributed import all_reduce_mean, gather_no_grad, gather_with_grad
from losses import dino_loss, moco_v3_loss, nt_xent, update_center
from methods import DINO, MoCoV3, SimCLR, build_method, method_kwargs
from options import get_args
from schedule import momentum_schedule, teacher_temperature


class TinyBackbone(nn.Module):
    """Same signature as vit.ViT; records the (patch_size, drop) of every call."""

    def __init__(self, dim=16):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(3 * 4 * 4, dim)
        self.calls = []

    def forward(self, images, patch_size=None, drop=0.0):
        self.calls.append((patch_size, drop, images.shape[-1]))
        return self.proj(F.adaptive_avg_pool2d(images, 4).flatten(1))   # any resolution → (B, dim)


def images(n=6, size=8):
    return torch.randn(n, 3, size, size)


# ============================================================ losses vs loop references
def test_nt_xent_equals_the_per_anchor_definition():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 7).double(), torch.randn(5, 7).double(), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)       # (2N, d): rows 0..N−1 view 1, N..2N−1 view 2
    n, total = 5, 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(2 * n) if b != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / tau) / denom)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / (2 * n), rel=1e-10)


def test_moco_v3_loss_equals_two_tau_cross_entropy():
    torch.manual_seed(0)
    q, k, tau = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(6):
        logits = [float(qn[i] @ kn[j]) / tau for j in range(6)]
        total += -(logits[i] - math.log(sum(math.exp(l) for l in logits)))
    assert moco_v3_loss(q, k, tau).item() == pytest.approx(2 * tau * total / 6, rel=1e-10)


def test_moco_v3_keys_carry_no_gradient():
    q, k = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    moco_v3_loss(q, k).backward()
    assert q.grad is not None and k.grad is None


def test_dino_loss_averages_all_teacher_student_pairs_of_different_crops():
    torch.manual_seed(0)
    K, N, ts, tt = 6, 3, 0.1, 0.05
    student = [torch.randn(N, K, dtype=torch.float64) for _ in range(5)]   # 2 global + 3 local
    teacher = [torch.randn(N, K, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, K, dtype=torch.float64)
    total, terms = 0.0, 0
    for i in range(2):
        for j in range(5):
            if i == j:
                continue
            for b in range(N):
                t = [(float(teacher[i][b, c]) - float(center[0, c])) / tt for c in range(K)]
                s = [float(student[j][b, c]) / ts for c in range(K)]
                pt = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
                log_ps = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
                total += -sum(p * lp for p, lp in zip(pt, log_ps)) / N
            terms += 1
    assert terms == 8
    ours = dino_loss(student, teacher, center, ts, tt).item()
    assert ours == pytest.approx(total / terms, rel=1e-10)


def test_dino_loss_sends_no_gradient_to_the_teacher():
    s = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    dino_loss(s, t, torch.zeros(1, 4)).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


def test_dino_centre_update_is_the_ema_of_the_batch_mean():
    teacher = [torch.randn(4, 3), torch.randn(4, 3)]
    center = torch.randn(1, 3)
    expected = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    out = update_center(center, teacher, momentum=0.9)
    assert out is center                                                   # in place
    torch.testing.assert_close(center, expected)


def test_teacher_temperature_warms_up_linearly_then_stays():
    """DINO's ViT-S recipe, 0.04 → 0.07 over the first 30 % (of 100 epochs), in progress."""
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.3, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(1.0, 0.04, 0.07, 0.3) == pytest.approx(0.07)


def test_teacher_temperature_defaults_to_the_official_constant():
    assert {teacher_temperature(t) for t in (0.0, 0.3, 1.0)} == {0.04}


def test_momentum_rises_from_base_to_one_on_a_cosine():
    assert momentum_schedule(0.0, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(0.5, 0.99) == pytest.approx(0.995)
    assert momentum_schedule(1.0, 0.99) == pytest.approx(1.0)


# ===================================================================== distributed helpers
def test_gathers_are_identities_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(gather_no_grad(x), x) and not gather_no_grad(x).requires_grad
    torch.testing.assert_close(all_reduce_mean(x), x.detach())


@pytest.mark.parametrize("affine", [True, False])
def test_global_batchnorm_equals_batchnorm1d_on_one_process(affine):
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm1d(5, affine=affine), nn.BatchNorm1d(5, affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2), ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    for _ in range(3):                                                    # running stats accumulate
        x = (torch.randn(8, 5) * 3 + 1).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(8, 5)
        y, y_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y * g).sum().backward(), (y_ref * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), ref(x))


def test_global_batchnorm_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        GlobalBatchNorm1d(3)(torch.randn(1, 3))


def test_mlp_is_moco_v3_shaped():
    proj = mlp(8, 16, 4, layers=3)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear", "GlobalBatchNorm1d", "ReLU",
                     "Float32Linear", "GlobalBatchNorm1d"]                # the last layer in float32
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert not proj[-1].affine
    assert isinstance(mlp(8, 16, 4, layers=2, last_bn=False)[-1], nn.Linear)


def test_dino_head_prototypes_keep_unit_norm_through_training():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    w = head.last_layer.weight                                            # (10, 4) = g·v/‖v‖
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_switches_reach_the_head_from_the_flags():
    """--use-bn-in-head puts a BatchNorm after each hidden Linear (not after the bottleneck);
    --no-norm-last-layer lets the prototypes' norms g take a step, so they leave 1."""
    args, _ = get_args(["--method", "dino", "--use-bn-in-head", "--no-norm-last-layer"])
    method = build_method("dino", TinyBackbone(), **method_kwargs(args, 16))
    kinds = [type(m).__name__ for m in method.head.mlp]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "GELU"] * 2 + ["Linear"]
    g = method.head.last_layer.parametrizations.weight.original0
    assert g.requires_grad
    opt = torch.optim.SGD([p for p in method.head.parameters() if p.requires_grad], lr=1.0)
    method.head(torch.randn(5, 16)).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(method.head.last_layer.weight.norm(dim=1), torch.ones(len(g)))
    plain, _ = get_args(["--method", "dino"])                      # the official defaults
    assert method_kwargs(plain, 16)["use_bn"] is False
    assert method_kwargs(plain, 16)["norm_last_layer"] is True


# ============================================================================== methods
def test_moco_momentum_encoder_has_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = MoCoV3(TinyBackbone(), proj_dim=8, hidden_dim=16)
    loss, logs = method([images(), images()])
    loss.backward()
    assert all(p.grad is None for p in method.momentum_encoder.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    with torch.no_grad():                                   # as if the optimiser had stepped
        for p in method.backbone.parameters():
            p.add_(1.0)
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    progress = 0.25
    m = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
    method.update_target(progress)
    for p_k, old, p_q in zip(method.momentum_encoder.parameters(), before, online, strict=True):
        torch.testing.assert_close(p_k, m * old + (1 - m) * p_q)


def test_moco_predictor_is_only_on_the_online_branch():
    method = MoCoV3(TinyBackbone(), proj_dim=8, hidden_dim=16)
    n_momentum = sum(p.numel() for p in method.momentum_encoder.parameters())
    online = [*method.backbone.parameters(), *method.projector.parameters()]
    n_online = sum(p.numel() for p in online)
    assert n_momentum == n_online
    assert not any("predictor" in name for name, _ in method.momentum_encoder.named_parameters())


def test_moco_roles_and_the_one_directional_loss_encodes_each_view_once():
    q, k = vc(drop=0.5), vc(patch_size=8)
    sym = MoCoV3(TinyBackbone(), proj_dim=8, hidden_dim=16)
    sym([images(), images()], q, k)
    assert sym.backbone.calls == [(None, 0.5, 8)] * 2                   # online: both views, role q
    assert sym.momentum_encoder.backbone.calls == [(8, 0.0, 8)] * 2     # momentum: both, role k
    one = MoCoV3(TinyBackbone(), proj_dim=8, hidden_dim=16, symmetric=False)
    one([images(), images()], q, k)                                     # 3 + 1 units, not 8
    assert len(one.backbone.calls) == 1 and len(one.momentum_encoder.backbone.calls) == 1


def test_dino_teacher_has_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = DINO(TinyBackbone(), out_dim=12, hidden_dim=16, bottleneck_dim=4)
    loss, logs = method([images(), images(), images(size=4)], progress=0.0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    student = list(method.backbone.parameters()) + list(method.head.parameters())
    with torch.no_grad():
        for p in student:
            p.add_(0.5)
    before = [p.clone() for p in method.teacher.parameters()]
    m = momentum_schedule(0.1, 0.996)
    method.update_target(0.1)
    for p_t, old, p_s in zip(method.teacher.parameters(), before, student, strict=True):
        torch.testing.assert_close(p_t, m * old + (1 - m) * p_s)


def test_dino_forward_uses_the_old_centre_then_updates_it():
    torch.manual_seed(0)
    method = DINO(TinyBackbone(), out_dim=12, hidden_dim=16, bottleneck_dim=4)
    method.center.normal_()
    old = method.center.clone()
    views = [images(), images(), images(size=4), images(size=4)]
    with torch.no_grad():
        student = [method.head(method.backbone(v)) for v in views]
        teacher = [method.teacher(v) for v in views[:2]]
    expected = dino_loss(student, teacher, old, 0.1, teacher_temperature(0.5))
    loss, logs = method(views, progress=0.5)
    torch.testing.assert_close(loss, expected)
    assert logs["teacher_temp"] == pytest.approx(0.04)
    batch_mean = torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(method.center, 0.9 * old + 0.1 * batch_mean)


def test_dino_roles_local_crops_keep_the_base_patch_size():
    method = DINO(TinyBackbone(), out_dim=12, hidden_dim=16, bottleneck_dim=4)
    method([images(), images(), images(size=4), images(size=4)], vc(drop=0.5, patch_size=8),
           vc(patch_size=8))
    # globals batched in one call with q; both locals (same shape) in one call, q's drop only
    assert method.backbone.calls == [(8, 0.5, 8), (None, 0.5, 4)]
    assert method.teacher.backbone.calls == [(8, 0.0, 8)]


def test_simclr_views_alternate_roles_and_all_carry_gradient():
    method = SimCLR(TinyBackbone(), proj_dim=8, hidden_dim=16)
    loss, _ = method([images(), images(), images()], vc(drop=0.25), vc(patch_size=2))
    assert method.backbone.calls == [(None, 0.25, 8), (2, 0.0, 8), (None, 0.25, 8)]
    loss.backward()
    assert method.backbone.proj.weight.grad.abs().sum() > 0
    method.update_target(0.5)                                             # no-op


@pytest.mark.parametrize("name,kwargs", [
    ("simclr", dict(proj_dim=8, hidden_dim=16)),
    ("moco", dict(proj_dim=8, hidden_dim=16)),
    ("moco", dict(proj_dim=8, hidden_dim=16, symmetric=False)),
    ("dino", dict(out_dim=12, hidden_dim=16, bottleneck_dim=4)),
])
def test_one_training_step_is_finite_and_reaches_the_backbone(name, kwargs):
    torch.manual_seed(0)
    method = build_method(name, TinyBackbone(), **kwargs)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, logs = method([images(), images()], progress=0.1)
    assert torch.isfinite(loss) and logs["loss"].item() == pytest.approx(loss.item())
    loss.backward()
    for p in method.backbone.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    opt.step()
    method.update_target(0.1)


def test_build_method_names_the_allowed_methods():
    with pytest.raises(ValueError, match="simclr, moco, dino"):
        build_method("byol", TinyBackbone())


def test_methods_reject_a_single_view():
    with pytest.raises(ValueError, match="at least 2"):
        SimCLR(TinyBackbone(), proj_dim=8, hidden_dim=16)([images()])


def test_dino_runs_on_the_real_vit_with_compressed_views_and_local_crops():
    import vit                                  # the project's own: a broken vit.py fails here
    method = build_method("dino", vit.ViT(img_size=16, patch_size=4, dim=32, depth=2, heads=2),
                          out_dim=16, hidden_dim=32, bottleneck_dim=8)
    loss, _ = method([torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)], vc(drop=0.5),
                     vc(patch_size=8))
    loss.backward()
    assert torch.isfinite(loss) and method.backbone.cls_token.grad is not None
