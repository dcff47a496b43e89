"""Many cheap views and small projectors (issue 7): the multi-positive NT-Xent, the multi-view
loss of arXiv 2312.10725, the views rule, and a budget charged per view."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compress
import vit
from compress import CostModel, Strategy
from losses import multiview_loss, nt_xent, nt_xent_multi, standardize
from methods import DINO, SimCLR, build_method, head_sizes, method_kwargs


from test_losses import TinyBackbone, images, vc  # noqa: E402  (the same stand-ins as there)


# ======================================================= multi-positive NT-Xent
def test_multi_positive_nt_xent_equals_the_per_anchor_definition():
    torch.manual_seed(0)
    M, N, tau = 3, 5, 0.3
    zs = [torch.randn(N, 7, dtype=torch.float64) for _ in range(M)]
    z = F.normalize(torch.cat(zs), dim=1)            # row m·N + n: view m of image n
    total = 0.0
    for a in range(M * N):
        m, n = divmod(a, N)
        denom = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(M * N) if b != a)
        positives = [p * N + n for p in range(M) if p != m]
        total += sum(-math.log(math.exp(float(z[a] @ z[p]) / tau) / denom)
                     for p in positives) / (M - 1)
    assert nt_xent_multi(zs, tau).item() == pytest.approx(total / (M * N), rel=1e-10)


def test_multi_positive_nt_xent_at_two_views_is_simclrs_loss():
    """M = 2: 2N − 2 negatives, one positive: the former nt_xent, written out here."""
    torch.manual_seed(1)
    z1, z2, tau = torch.randn(6, 8), torch.randn(6, 8), 0.2
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = torch.cat([a, b]) @ torch.cat([a, b]).T / tau               # (2N, 2N)
    logits.fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(6) + 6, torch.arange(6)])
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(nt_xent_multi([z1, z2], tau), expected)
    torch.testing.assert_close(nt_xent(z1, z2, tau), expected)


def test_simclr_with_three_views_uses_the_multi_positive_loss():
    torch.manual_seed(0)
    method = SimCLR(TinyBackbone(), proj_dim=8, hidden_dim=16)
    views = [images(), images(), images()]
    loss, _ = method(views)
    with torch.no_grad():
        z = method.projector(torch.cat([method.backbone(v) for v in views])).split(6)
    torch.testing.assert_close(loss, nt_xent_multi(list(z), method.temperature))


# ========================================================== the multi-view loss
def _joint_standardised(zs):
    """Rows L2-normalised, then the M·N rows standardised together, unbiased σ (numpy)."""
    Z = np.concatenate([z.detach().double().numpy() for z in zs])
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    Z = (Z - Z.mean(0)) / np.sqrt(Z.var(0, ddof=1) + 1e-5)
    return np.split(Z, len(zs))


def barlow_twins_reference(z1, z2, lambd):
    """Barlow Twins (Zbontar et al.), one correlation entry at a time."""
    a, b = _joint_standardised([z1, z2])
    N, d = a.shape
    C = [[sum(a[n, i] * b[n, j] for n in range(N)) / N for j in range(d)] for i in range(d)]
    on = sum((C[i][i] - 1) ** 2 for i in range(d))
    off = sum(C[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def test_two_view_loss_is_barlow_twins():
    torch.manual_seed(0)
    z1, z2 = torch.randn(9, 5, dtype=torch.float64) * 3 + 1, torch.randn(9, 5, dtype=torch.float64)
    loss, on, off = multiview_loss([z1, z2], lambd=0.05)
    assert loss.item() == pytest.approx(barlow_twins_reference(z1, z2, 0.05), rel=1e-10)
    assert loss.item() == pytest.approx((on + off).item(), rel=1e-12)


def test_m_view_loss_pulls_each_view_to_the_mean_and_decorrelates_the_mean():
    """M > 2: (1/M) Σ_m Σ_i (C⁽ᵐᶻ̄⁾_ii − 1)² + λ Σ_{i≠j} (C⁽ᶻ̄ᶻ̄⁾_ij)², written out."""
    torch.manual_seed(1)
    zs = [torch.randn(7, 4, dtype=torch.float64) + m for m in range(4)]
    views = _joint_standardised(zs)
    N, d = views[0].shape
    z_bar = sum(views) / 4
    on = sum((sum(v[n, i] * z_bar[n, i] for n in range(N)) / N - 1) ** 2
             for v in views for i in range(d)) / 4
    C = z_bar.T @ z_bar / N
    off = sum(C[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    assert multiview_loss(zs, lambd=0.3)[0].item() == pytest.approx(on + 0.3 * off, rel=1e-10)


def test_standardize_gives_zero_mean_unit_variance_per_dimension():
    z = torch.randn(32, 4, dtype=torch.float64) * 5 + 2
    for unbiased in (False, True):
        zt = standardize(z, unbiased=unbiased)
        torch.testing.assert_close(zt.mean(0), torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(zt.var(0, unbiased=unbiased), torch.ones(4, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)


def test_the_loss_does_not_change_with_the_scale_of_a_projection():
    """Rows are L2-normalised first, as the authors' projector output is."""
    torch.manual_seed(2)
    zs = [torch.randn(8, 6, dtype=torch.float64) for _ in range(3)]
    scaled = [z * torch.rand(8, 1, dtype=torch.float64).add(0.5) for z in zs]
    torch.testing.assert_close(multiview_loss(zs)[0], multiview_loss(scaled)[0])


def test_multiview_gradients_reach_the_backbone_and_views_alternate_roles():
    torch.manual_seed(0)
    method = build_method("multiview", TinyBackbone(), proj_dim=8)
    loss, logs = method([images(), images(), images()], vc(drop=0.25), vc(patch_size=2))
    assert method.backbone.calls == [(None, 0.25, 8), (2, 0.0, 8), (None, 0.25, 8)]
    assert set(logs) == {"loss", "on_diag", "off_diag"}
    assert logs["loss"].item() == pytest.approx((logs["on_diag"] + logs["off_diag"]).item())
    loss.backward()
    assert method.backbone.proj.weight.grad.abs().sum() > 0
    method.update_target(0.5)                                            # no-op


def test_the_multiview_projector_is_small_and_no_wider_than_the_batch():
    assert head_sizes("multiview", 32) == dict(proj_dim=128)
    args = types.SimpleNamespace(method="multiview", momentum=None, batch_size=64, proj_dim=None,
                                 lambd=None)
    assert method_kwargs(args, 64) == dict(proj_dim=64)               # min(128, batch)
    method = build_method("multiview", vit.ViT(img_size=16, patch_size=4, dim=32, depth=1,
                                               heads=2), **method_kwargs(args, 32))
    assert [m.out_features for m in method.projector if hasattr(m, "out_features")] == [64, 64]
    with pytest.raises(ValueError, match="--proj-dim 128 is wider than the batch"):
        method_kwargs(types.SimpleNamespace(**{**vars(args), "proj_dim": 128}), 32)


# ================================================================== the views rule
def test_the_views_rule_gives_a_strategy_the_runs_views_unless_it_names_its_own():
    assert Strategy().resolve(3).views == 3 and Strategy(views=4).resolve(2).views == 4
    s = Strategy.parse("q:drop=0.5")
    assert s.resolve(2) == Strategy(s.q, s.k, views=2) and s.resolve(2).resolve(5).views == 2
    assert compress.local_crops("dino", 6) == 4 and compress.local_crops("simclr", 6) == 0


def test_dino_views_are_two_globals_then_the_local_crops():
    method = DINO(TinyBackbone(), out_dim=12, hidden_dim=16, bottleneck_dim=4)
    views = [images(), images()] + [images(size=4) for _ in range(4)]
    method(views[:3])                                       # a 3-view step: one local crop
    assert method.backbone.calls == [(None, 0.0, 8), (None, 0.0, 4)]    # globals, one local call
    assert len(method.backbone.calls) == 2 and method.teacher.backbone.calls == [(None, 0.0, 8)]


# ====================================================== the budget is charged per view
@pytest.fixture(scope="module")
def cost():
    with torch.device("meta"):
        model = vit.build_vit("base")
    return CostModel(model)


@pytest.mark.parametrize("method", ["simclr", "multiview"])
def test_every_view_is_charged(cost, method):
    s = Strategy.parse("q:drop=0.75")
    q, k = cost.view_units(s.q), cost.view_units(s.k)
    for m in (2, 3, 4, 8):
        expected = math.ceil(m / 2) * q + (m // 2) * k                 # roles q, k, q, k, ...
        assert cost.sample_units(method, s.resolve(m)) == pytest.approx(expected)
        with_views = Strategy(s.q, s.k, views=m)
        assert cost.sample_units(method, with_views.resolve(2)) == pytest.approx(expected)
    assert cost.sample_units(method, Strategy(views=6).resolve(2)) == pytest.approx(18)  # 6 × 3


def test_moco_and_dino_charge_their_extra_views(cost):
    four = Strategy(views=4).resolve(2)
    assert cost.sample_units("moco", four) == 16                       # 4 × (3 + 1)
    assert cost.sample_units("moco", four, symmetric=False) == 6       # 3 + 3 × 1
    local = cost.view_units(None, img_size=96)
    # views = 6 is 2 globals + 4 local crops
    assert cost.sample_units("dino", Strategy(views=6).resolve(2), local_size=96) == \
        pytest.approx(8 + 4 * local)
    assert cost.sample_units("dino", compress.NONE.resolve(2)) == 8


def test_compress_strategy_views_is_checked():
    with pytest.raises(ValueError, match="views=1"):
        Strategy(views=1)
    assert compress.NONE.views is None
