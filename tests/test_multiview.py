"""Many cheap views and small projectors (issue 7): the multi-positive NT-Xent, the multi-view
loss of arXiv 2312.10725, ``strategy.views`` in the methods, and a budget charged per view."""
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
from losses import (DINO, MultiView, SimCLR, build_method, head_sizes, multiview_loss, nt_xent,
                    nt_xent_multi, standardize, use_views)


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
def reference_multiview(zs, beta, eps=1e-5):
    """The loss written out in numpy, one sample and one pair of dimensions at a time."""
    Z = [z.detach().double().numpy() for z in zs]
    M, (N, d) = len(Z), Z[0].shape
    zt = [(z - z.mean(0)) / np.sqrt(z.var(0) + eps) for z in Z]          # np.var: biased
    z_bar = sum(zt) / M
    invariance = 0.0
    for m in range(M):
        for n in range(N):
            invariance += ((zt[m][n] - z_bar[n]) ** 2).sum() / d
    invariance /= M * N
    zh = (z_bar - z_bar.mean(0)) / np.sqrt(z_bar.var(0) + eps)
    C = zh.T @ zh / N                                                    # correlation matrix
    orthogonality = beta * sum(C[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return invariance + orthogonality, invariance, orthogonality


def test_multiview_loss_equals_the_written_out_definition():
    torch.manual_seed(0)
    zs = [torch.randn(9, 5, dtype=torch.float64) * 3 + 1 for _ in range(4)]
    ours = [t.item() for t in multiview_loss(zs, beta=0.05)]
    assert ours == pytest.approx(reference_multiview(zs, 0.05), rel=1e-10)


def test_standardize_gives_zero_mean_unit_variance_per_dimension():
    z = torch.randn(32, 4, dtype=torch.float64) * 5 + 2
    zt = standardize(z)
    torch.testing.assert_close(zt.mean(0), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(zt.var(0, unbiased=False), torch.ones(4, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_at_two_views_the_invariance_is_a_quarter_of_the_squared_distance():
    """z̄ = (z̃1 + z̃2)/2, so ‖z̃_m − z̄‖² = ‖z̃1 − z̃2‖²/4 for both views."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    _, invariance, _ = multiview_loss([z1, z2])
    closed = ((standardize(z1) - standardize(z2)) ** 2).sum(1).mean() / 4 / 6
    torch.testing.assert_close(invariance, closed)


def test_identical_views_have_no_invariance_term():
    torch.manual_seed(0)
    method = MultiView(TinyBackbone(), proj_dim=8, hidden_dim=16)
    x = images()
    loss, logs = method([x, x, x])
    assert logs["invariance"] == pytest.approx(0.0, abs=1e-10)
    assert logs["orthogonality"] > 0 and logs["loss"] == pytest.approx(logs["orthogonality"])


def test_multiview_gradients_reach_the_backbone_and_views_alternate_roles():
    torch.manual_seed(0)
    method = build_method("multiview", TinyBackbone(), proj_dim=8, hidden_dim=16)
    strategy = types.SimpleNamespace(q=vc(drop=0.25), k=vc(patch_size=2))
    loss, logs = method([images(), images(), images()], strategy)
    assert method.backbone.calls == [(None, 0.25, 8), (2, 0.0, 8), (None, 0.25, 8)]
    assert set(logs) == {"loss", "invariance", "orthogonality"}
    assert logs["loss"] == pytest.approx(logs["invariance"] + logs["orthogonality"])
    loss.backward()
    assert method.backbone.proj.weight.grad.abs().sum() > 0
    method.update_target(0.5)                                            # no-op


def test_multiview_heads_are_small():
    assert head_sizes("multiview", 32) == dict(proj_dim=128, hidden_dim=512)
    assert head_sizes("multiview", 384) == dict(proj_dim=256, hidden_dim=2048)
    method = build_method("multiview", vit.ViT(img_size=16, patch_size=4, dim=32, depth=1,
                                               heads=2), **head_sizes("multiview", 32))
    assert method.projector[-1].out_features == 128


# ============================================================ strategy.views in the methods
def test_use_views_keeps_the_first_m_views_and_names_a_shortfall():
    vs = ["a", "b", "c", "d"]
    assert use_views(vs, None) == vs and use_views(vs, Strategy()) == vs
    assert use_views(vs, Strategy(views=3)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="views=5 but the batch holds 4"):
        use_views(vs, Strategy(views=5))


def test_a_strategy_with_fewer_views_is_the_method_on_those_views():
    torch.manual_seed(0)
    method = SimCLR(TinyBackbone(), proj_dim=8, hidden_dim=16)
    views = [images(), images(), images(), images()]
    loss3, _ = method(views, Strategy(views=3))
    loss_ref, _ = method(views[:3])
    torch.testing.assert_close(loss3, loss_ref)


def test_dino_views_are_two_globals_and_the_first_local_crops():
    method = DINO(TinyBackbone(), out_dim=12, hidden_dim=16, bottleneck_dim=4)
    views = [images(), images()] + [images(size=4) for _ in range(4)]
    method(views, Strategy(views=3))
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
        assert cost.sample_units(method, s, views=m) == pytest.approx(expected)
        with_views = Strategy(s.q, s.k, views=m)
        assert cost.sample_units(method, with_views, views=2) == pytest.approx(expected)
    assert cost.sample_units(method, Strategy(views=6)) == pytest.approx(18)   # 6 × 3 units


def test_moco_and_dino_charge_their_extra_views(cost):
    assert cost.sample_units("moco", Strategy(views=4)) == 16                 # 4 × (3 + 1)
    assert cost.sample_units("moco", Strategy(views=4), symmetric=False) == 6  # 3 + 3 × 1
    local = cost.view_units(None, img_size=96)
    # views = 6 is 2 globals + 4 local crops, whatever local_crops says
    assert cost.sample_units("dino", Strategy(views=6), local_crops=10, local_size=96) == \
        pytest.approx(8 + 4 * local)
    assert cost.sample_units("dino", Strategy(views=2), local_crops=10) == 8


def test_compress_strategy_views_is_checked():
    with pytest.raises(ValueError, match="views=1"):
        Strategy(views=1)
    assert compress.NONE.views is None
