"""Claims of compress.py: the Strategy CLI form and its round trips, the error messages, and
the cost model (the paper's unit counts, the FLOP formula against a direct count, monotone
savings, the heads on each branch counted by hand, the measured mode)."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E402,E702

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import compress
import methods
import vit
from compress import NONE, CostModel, Strategy, ViewCompression


# ====================================================================== strategy
STRINGS = ["none", "q:drop=0.75", "q:drop=0.5,patch=24;k:patch=24", "qk:patch=32",
           "k:drop=0.25", "q:patch=20;k:drop=0.5", "qk:drop=0.9,patch=48", "q:drop=0.123456789",
           "views=4", "q:drop=0.5;views=4", "views=3;qk:patch=8", "views=2"]


@pytest.mark.parametrize("text", STRINGS)
def test_strategy_survives_str_and_dict_round_trips(text):
    s = Strategy.parse(text)
    assert Strategy.parse(str(s)) == s
    assert Strategy.from_dict(s.to_dict()) == s
    assert Strategy.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_strategy_parse_reads_the_documented_forms():
    assert Strategy.parse("none") == Strategy.parse("") == Strategy.parse("baseline") == Strategy()
    assert str(Strategy()) == "none"
    assert Strategy.parse("q:drop=0.75") == Strategy(q=ViewCompression(drop=0.75))
    assert str(Strategy.parse(" q:drop=0.75 ")) == "q:drop=0.75"
    both = Strategy.parse("qk:patch=32")
    assert both == Strategy(q=ViewCompression(patch_size=32), k=ViewCompression(patch_size=32))
    assert str(both) == "q:patch=32;k:patch=32"
    mixed = Strategy.parse("q:drop=0.5,patch=24;k:patch=24")
    assert (mixed.q.drop, mixed.q.patch_size, mixed.k.drop, mixed.k.patch_size) == (0.5, 24, 0.0, 24)


def test_strategy_views_reads_and_writes_its_own_part():
    assert Strategy.parse("views=4") == Strategy(views=4) and str(Strategy(views=4)) == "views=4"
    s = Strategy.parse("views=3; q:drop=0.5")
    assert (s.q.drop, s.views) == (0.5, 3) and str(s) == "q:drop=0.5;views=3"
    assert str(compress.NONE) == "none" and Strategy.parse("none").views is None
    assert Strategy.from_dict({"q": {"drop": 0.5}}) == Strategy.parse("q:drop=0.5")   # old dicts
    assert Strategy(views=4).to_dict()["views"] == 4


@pytest.mark.parametrize("text, offending", [
    ("x:drop=0.5", "x:drop=0.5"),              # unknown role
    ("drop=0.5", "drop=0.5"),                  # no role at all
    ("q:speed=2", "speed"),                    # unknown key
    ("q:drop", "drop"),                        # missing '='
    ("q:drop0.5", "drop0.5"),                  # missing '=' (read as an unknown key)
    ("q:drop=abc", "drop=abc"),                # non-numeric
    ("q:patch=1.5", "patch=1.5"),              # patch must be an integer
    ("q:drop=1", "drop=1"),                    # drop ≥ 1
    ("q:drop=1.5", "drop=1.5"),
    ("q:drop=-0.1", "drop=-0.1"),
    ("k:patch=0", "patch=0"),                  # patch 0
    ("views=1", "views=1"),                    # views must be an integer ≥ 2
    ("views=2.5", "views=2.5"),
    ("views=abc", "views=abc"),
    ("views", "views"),
    ("q:drop=0.5;views=-2", "views=-2"),
    ("views=2;views=3", "twice"),
    ("q:views=3", "views"),                    # views is not a role setting
])
def test_malformed_strategy_strings_are_rejected_naming_the_bad_part(text, offending):
    with pytest.raises(ValueError) as err:
        Strategy.parse(text)
    assert offending in str(err.value)


def test_view_compression_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"drop 1.0 .*\[0, 1\)"):
        ViewCompression(drop=1.0)
    with pytest.raises(ValueError, match="patch 0"):
        ViewCompression(patch_size=0)
    with pytest.raises(ValueError, match="42"):
        Strategy.parse(42)
    with pytest.raises(ValueError, match=r"views=1 .*integer ≥ 2"):
        Strategy(views=1)
    with pytest.raises(ValueError, match=r"views='4'"):
        Strategy.from_dict({"views": "4"})


def test_the_cost_model_counts_the_tokens_that_token_dropout_keeps():
    m = vit.ViT(img_size=28, patch_size=4, dim=8, depth=2, heads=2)        # 49 patch tokens
    x = torch.zeros(2, 1 + 49, 8)
    embed = compress.forward_flops(m) - m.depth * compress.block_flops(1 + 49, 8)
    for drop in (0.25, 0.5, 0.9, 0.99):
        kept = vit.token_dropout(x, drop).shape[1] - 1
        assert kept == vit.kept_tokens(49, drop)
        assert compress.forward_flops(m, drop=drop) == embed + m.depth * compress.block_flops(1 + kept, 8)


# ==================================================================== cost model
@pytest.fixture(scope="module")
def vit_base_cost():
    # flops mode never runs the model, so ViT-B costs nothing but its construction;
    # build it on the meta device to skip allocating 86M parameters.
    with torch.device("meta"):
        model = vit.build_vit("base")
    return CostModel(model)


def test_uncompressed_sample_costs_match_the_paper(vit_base_cost):
    c = vit_base_cost
    two = NONE.resolve(2)
    assert c.sample_units("moco", two) == 8                  # 2 views × (3 online + 1 momentum)
    assert c.sample_units("moco", two, symmetric=False) == 4  # 3 + 1
    assert c.sample_units("simclr", two) == 6                # 2 views × 3
    assert c.sample_units("dino", two) == 8                  # 2 globals × (3 + 1)
    with pytest.raises(ValueError, match="no view count: resolve it first"):
        c.sample_units("dino", Strategy.parse("none"))       # the views rule is applied first


@pytest.mark.parametrize("local_crops, local_size", [(2, 96), (6, 96), (10, 112)])
def test_each_dino_local_crop_adds_three_forwards_of_its_length(vit_base_cost, local_crops,
                                                                local_size):
    c, m = vit_base_cost, vit_base_cost.model
    f_local = compress.forward_flops(m, img_size=local_size) / compress.forward_flops(m)
    got = c.sample_units("dino", NONE.resolve(2 + local_crops), local_size=local_size)
    assert got == pytest.approx(8 + local_crops * 3 * f_local, rel=1e-12)
    assert f_local < 0.25          # 6×6 (or 7×7) tokens against 14×14


def test_asymmetric_dropout_compresses_only_the_query_view(vit_base_cost):
    c, m = vit_base_cost, vit_base_cost.model
    rel = compress.forward_flops(m, drop=0.75) / compress.forward_flops(m)
    assert c.sample_units("moco", Strategy.parse("q:drop=0.75").resolve(2)) == \
        pytest.approx(2 * (3 * rel + 1))
    assert c.sample_units("simclr", Strategy.parse("qk:drop=0.75").resolve(2)) == \
        pytest.approx(6 * rel)


@pytest.mark.parametrize("L, D", [(1, 8), (17, 64), (197, 192)])
def test_block_flops_equals_a_direct_count_of_one_block(L, D):
    block = vit.Block(D, heads=4 if D % 4 == 0 else 1, mlp_ratio=4.0)
    # the math backend spells attention as two matmuls, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(torch.randn(1, L, D))
    assert counter.get_total_flops() == compress.block_flops(L, D) == 24 * L * D * D + 4 * L * L * D


@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9])
def test_forward_flops_equals_a_direct_count_of_the_model(drop):
    model = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2).train()
    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32), drop=drop)
    assert counter.get_total_flops() == compress.forward_flops(model, drop=drop)


@pytest.mark.parametrize("img, p, drop", [(32, 4, 0.0), (32, 8, 0.5), (32, 5, 0.25), (32, 7, 0.9),
                                          (48, 4, 0.75), (24, 6, 0.0)])
def test_cost_model_counts_the_tokens_the_vit_encodes(img, p, drop):
    model = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2).train()
    L = model(torch.randn(1, 3, img, img), patch_size=p, drop=drop, all_tokens=True).shape[1]
    n = model.grid(img, p) ** 2
    expected = 2 * n * 3 * p * p * 32 + 2 * compress.block_flops(L, 32)
    assert compress.forward_flops(model, img_size=img, patch_size=p, drop=drop) == expected


def test_compressed_units_fall_monotonically_with_drop_and_patch_size(vit_base_cost):
    c = vit_base_cost
    for p in compress.default_patch_grid(16):
        units = [c.view_units(ViewCompression(d, p)) for d in compress.DROP_GRID]
        assert all(a > b for a, b in zip(units, units[1:])), (p, units)
    for d in compress.DROP_GRID:
        units = [c.view_units(ViewCompression(d, p)) for p in compress.default_patch_grid(16)]
        assert all(a > b for a, b in zip(units, units[1:])), (d, units)
    assert c.view_units(None) == 3.0 and c.view_units(None, grad=False) == 1.0


def test_default_patch_grid_is_the_papers_16_to_48():
    assert compress.default_patch_grid(16) == [16, 20, 24, 28, 32, 40, 48]
    assert compress.default_patch_grid(4) == [4, 5, 6, 7, 8, 10, 12]


def test_measured_cost_model_gives_positive_finite_units():
    torch.manual_seed(0)
    model = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2).eval()
    c = CostModel(model, mode="measured", batch=4, reps=2)
    assert c.base > 0 and math.isfinite(c.base)
    assert c.view_units(None, grad=False) == 1.0             # the base setting is the unit
    for vc in (ViewCompression(0.75), ViewCompression(0.0, 8), ViewCompression(0.5, 8)):
        u = c.view_units(vc)
        assert u > 0 and math.isfinite(u)
    assert not model.training                                 # timing restores the mode


# ========================================================================== heads
def _small(method, **sizes):
    """A 2-block ViT of width 32 on 32-px images (64 tokens) and ``method`` with tiny heads."""
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2)
    return backbone, methods.build_method(method, backbone, **sizes)


def _f(backbone, **setting):
    return compress.forward_flops(backbone, **setting)


def test_a_simclr_sample_pays_the_projector_after_every_view_with_gradient():
    backbone, simclr = _small("simclr", proj_dim=16, hidden_dim=64)
    projector = 2 * (32 * 64 + 64 * 16)                     # Linear 32 → 64 → 16, one sample
    c = CostModel(backbone, heads=simclr.cost_heads())
    f0, q, k = _f(backbone), _f(backbone, drop=0.5), _f(backbone, patch_size=8)
    assert c.base == f0                                     # the unit is the backbone alone
    s = Strategy.parse("q:drop=0.5;k:patch=8").resolve(2)
    assert c.sample_units("simclr", s) == pytest.approx(
        (3 * (q + projector) + 3 * (k + projector)) / f0, rel=1e-12)
    assert c.sample_units("simclr", NONE.resolve(2)) == pytest.approx(6 + 6 * projector / f0,
                                                                      rel=1e-12)


def test_a_moco_sample_pays_projector_and_predictor_online_and_the_projector_per_key():
    backbone, moco = _small("moco", proj_dim=16, hidden_dim=64)
    projector = 2 * (32 * 64 + 64 * 64 + 64 * 16)           # Linear 32 → 64 → 64 → 16
    predictor = 2 * (16 * 64 + 64 * 16)                     # Linear 16 → 64 → 16
    online, target = projector + predictor, projector       # the momentum branch: no predictor
    c = CostModel(backbone, heads=moco.cost_heads())
    assert (c.head_flops["online"], c.head_flops["target"]) == (18_432, 14_336) == (online, target)
    f0, q, k = _f(backbone), _f(backbone, patch_size=8, drop=0.9), _f(backbone, patch_size=8)
    s, none = Strategy.parse("q:drop=0.9,patch=8;k:patch=8"), NONE.resolve(2)
    assert c.base == f0
    assert c.sample_units("moco", s.resolve(2)) == pytest.approx(
        2 * (3 * (q + online) + (k + target)) / f0, rel=1e-12)            # symmetric
    assert c.sample_units("moco", s.resolve(3), symmetric=False) == pytest.approx(
        (3 * (q + online) + 2 * (k + target)) / f0, rel=1e-12)            # view 1 → views 2, 3
    assert c.sample_units("moco", none) == pytest.approx(8 + 2 * (3 * online + target) / f0,
                                                         rel=1e-12)
    # the heads do not shrink with the sequence: compression saves less than without them
    bare = CostModel(backbone)
    assert c.sample_units("moco", s.resolve(2)) / c.sample_units("moco", none) > \
        bare.sample_units("moco", s.resolve(2)) / bare.sample_units("moco", none)


def test_a_dino_sample_pays_the_student_head_on_every_crop_and_the_teacher_head_on_globals():
    backbone, dino = _small("dino", out_dim=64, hidden_dim=48, bottleneck_dim=16)
    # MLP 32 → 48 → 48 → 16, then the weight-normalised 16 → 64 prototypes; teacher alike
    head = 2 * (32 * 48 + 48 * 48 + 48 * 16 + 16 * 64)      # 11 264
    c = CostModel(backbone, heads=dino.cost_heads())
    assert c.head_flops == {"online": head, "target": head}
    f0 = _f(backbone)
    g_q, g_k, local = _f(backbone, drop=0.5), f0, _f(backbone, img_size=16, drop=0.5)
    s = Strategy.parse("q:drop=0.5").resolve(4)             # 4 views: 2 global + 2 local crops
    expected = (2 * (3 * (g_q + head) + (g_k + head))       # 2 global crops: student + teacher
                + 2 * 3 * (local + head)) / f0               # 2 local crops: student only
    assert c.sample_units("dino", s, local_size=16) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", ["simclr", "moco", "dino", "multiview"])
def test_head_flops_equal_a_direct_count_of_the_heads_matrix_products(method):
    _, m = _small(method, **methods.head_sizes(method, 32))
    for head in m.cost_heads():
        if head is None:
            continue
        head.eval()                          # BN on running statistics: one sample is enough
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            head(torch.randn(1, 32))
        assert counter.get_total_flops() == compress.head_flops(head) > 0


def test_measured_mode_times_the_head_after_the_backbone_and_keeps_the_backbone_as_the_unit():
    torch.manual_seed(0)
    model = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2).eval()
    # a target head several times the backbone's FLOPs, with BN statistics that must not move
    heavy = nn.Sequential(nn.Linear(32, 4096), nn.BatchNorm1d(4096), nn.Linear(4096, 4096)).train()
    stats = {k: v.clone() for k, v in heavy.state_dict().items()}
    rng = torch.get_rng_state()
    calls = []
    heavy.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    c = CostModel(model, mode="measured", batch=4, reps=3, heads=(None, heavy))
    assert c.forward_cost() == c.base and calls == []         # the unit: the backbone alone
    assert c.view_units(None) == 3.0 and calls == []          # no online head: nothing added
    c.view_units(ViewCompression(0.5), grad=False)            # a target view: the head is timed
    assert calls == [(4, 32)] * 4                             # after the backbone, warm-up + 3
    assert all(torch.equal(stats[k], v) for k, v in heavy.state_dict().items())
    assert heavy.training and not model.training              # modes restored
    assert torch.equal(torch.get_rng_state(), rng)            # timing leaves the RNG alone


def test_bad_heads_are_rejected_naming_what_is_allowed():
    model = vit.ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2)
    with pytest.raises(ValueError, match=r"heads=.*\(online, target\)"):
        CostModel(model, heads=(nn.Linear(32, 8),))
    with pytest.raises(ValueError, match=r"heads=.*\(online, target\)"):
        CostModel(model, heads=("projector", None))
    with pytest.raises(ValueError, match="head 'student'.*online, target"):
        CostModel(model).forward_cost(head="student")


def test_bad_cost_mode_and_method_are_rejected(vit_base_cost):
    with pytest.raises(ValueError, match="'timed'.*flops, measured"):
        CostModel(vit_base_cost.model, mode="timed")
    with pytest.raises(ValueError, match="'byol'.*simclr"):
        vit_base_cost.sample_units("byol", NONE.resolve(2))
