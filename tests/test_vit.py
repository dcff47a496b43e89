"""Claims of vit.py: shapes, the FlexiViT pseudo-inverse resize, position-embedding
interpolation, token dropout, gradients, the timm / DINO / MoCo-v3 state-dict layout and
the error messages. Small models on CPU; the whole file runs in a few seconds."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E402,E702

import re

import pytest
import torch
import torch.nn.functional as F

import vit


def small_vit(img_size=32, patch_size=4, dim=32, depth=2, heads=2, **kw):
    torch.manual_seed(0)
    return vit.ViT(img_size=img_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                   **kw)


def n_kept(n, drop):
    """The paper's count: round((1 − drop)·N) patch tokens, at least one."""
    return n if drop == 0 else max(1, round((1 - drop) * n))


# ====================================================================== shapes
@pytest.mark.parametrize("hw, p", [
    ((32, 32), 4),      # base grid
    ((32, 32), 8),      # patch scaling, divides
    ((32, 32), 5),      # does not divide: 32/5 → 6 tokens a side (resized to 30 px)
    ((32, 32), 7),      # 32/7 = 4.57 → 5 a side
    ((32, 48), 4),      # non-square image
    ((40, 24), 6),      # non-square, 40/6 = 6.67 → 7, 24/6 = 4
    ((32, 32), 32),     # one patch for the whole image
    ((48, 48), 4),      # larger image than the base size: a larger grid
])
def test_output_shapes_follow_the_grid_and_the_drop_rate(hw, p):
    model = small_vit().train()
    gh, gw = (max(1, round(s / p)) for s in hw)
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, *hw)
        for drop in (0.0, 0.25, 0.5, 0.9):
            feats = model(x, patch_size=p, drop=drop)
            tokens = model(x, patch_size=p, drop=drop, all_tokens=True)
            assert feats.shape == (batch, 32)
            assert tokens.shape == (batch, 1 + n_kept(gh * gw, drop), 32), (batch, drop)


def test_drop_keeps_at_least_one_patch_token():
    model = small_vit().train()
    x = torch.randn(2, 3, 32, 32)
    # 4 patches at p = 16; 5 % of 4 rounds to 0, so one is kept.
    assert model(x, patch_size=16, drop=0.95, all_tokens=True).shape == (2, 2, 32)


def test_patch_size_that_does_not_divide_the_image_resizes_it_first():
    # The class docstring's example: 224 px at p = 30 → a 7×7 grid of a 210-px resize.
    model = vit.ViT(img_size=224, patch_size=16, dim=16, depth=1, heads=2).eval()
    x = torch.randn(1, 3, 224, 224)
    out = model(x, patch_size=30, all_tokens=True)
    assert out.shape == (1, 1 + 49, 16)
    x210 = F.interpolate(x, size=(210, 210), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, model(x210, patch_size=30, all_tokens=True))


def test_presets_have_the_published_sizes():
    for name, (dim, depth, heads) in {"tiny": (192, 12, 3), "small": (384, 12, 6),
                                      "base": (768, 12, 12)}.items():
        assert vit.PRESETS[name] == dict(img_size=224, patch_size=16, dim=dim, depth=depth,
                                         heads=heads)
    m = vit.build_vit("vit_cpu", img_size=64)           # "vit_" prefix and overrides accepted
    assert (m.img_size, m.patch_size, m.dim) == (64, 4, vit.PRESETS["cpu"]["dim"])
    assert vit.ViT(**m.config()).config() == m.config()


# ============================================================ flexible patch size
def upsample_every_patch(x, p0, p):
    """Replace each p0×p0 patch x of the image by B·x, its p×p resize (B = vit.resize_matrix)."""
    B_, C, H, W = x.shape
    gh, gw = H // p0, W // p0
    patches = x.reshape(B_, C, gh, p0, gw, p0).permute(0, 1, 2, 4, 3, 5)   # (B, C, gh, gw, p0, p0)
    B = vit.resize_matrix(p0, p).to(x.dtype)                                 # (p², p0²)
    up = patches.reshape(B_, C, gh, gw, p0 * p0) @ B.T                      # (B, C, gh, gw, p²)
    up = up.reshape(B_, C, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5)          # (B, C, gh, p, gw, p)
    return up.reshape(B_, C, gh * p, gw * p)


@pytest.mark.parametrize("p", [4, 5, 6, 8, 12])
def test_upsampled_base_patch_gives_the_base_token(p):
    model = small_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    x_up = upsample_every_patch(x, 4, p)                 # same 8×8 grid, at patch size p
    assert x_up.shape[-1] == 8 * p
    torch.testing.assert_close(model.tokens(x_up, p), model.tokens(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(model(x_up, patch_size=p, all_tokens=True),
                               model(x, all_tokens=True), atol=1e-4, rtol=0)


@pytest.mark.parametrize("p0, p", [(4, 4), (4, 6), (4, 9), (8, 12), (8, 16)])
def test_resized_kernel_solves_bt_w_hat_equals_w(p0, p):
    # ⟨B x, ŵ⟩ = ⟨x, w⟩ for all x  ⇔  Bᵀ ŵ = w; pinv(Bᵀ) is a right inverse of Bᵀ for p ≥ p0.
    B = vit.resize_matrix(p0, p)                              # float64
    assert B.shape == (p * p, p0 * p0)
    M = torch.linalg.pinv(B.T)
    torch.testing.assert_close(B.T @ M, torch.eye(p0 * p0, dtype=B.dtype), atol=1e-9, rtol=0)
    assert vit.resize_kernel_matrix(p0, p).dtype == torch.float64    # cast once per dtype


def test_resize_matrix_is_the_bilinear_resize():
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    ref = F.interpolate(x, size=(7, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close((x.reshape(4, 16) @ vit.resize_matrix(4, 7).T).reshape(4, 1, 7, 7), ref)


def test_base_patch_size_uses_the_stored_kernel_itself():
    model = small_vit()
    assert model.patch_embed.kernel(4) is model.patch_embed.proj.weight
    assert model.patch_embed.kernel(8).shape == (32, 3, 8, 8)


# ============================================================ position embedding
def test_position_embedding_interpolation_is_the_identity_at_the_base_grid():
    model = small_vit()
    pe = model.pos_embed
    assert vit.interpolate_pos_embed(pe, 8, (8, 8)) is pe


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (12, 12), (1, 1)])
def test_position_embedding_is_resized_bicubically_to_the_new_grid(grid):
    """By a matrix (a matmul, deterministic in backward on CUDA): F.interpolate's numbers, to
    float32 rounding (≲ 3e-6 here)."""
    g0, D = 8, 16
    pe = torch.randn(1, 1 + g0 * g0, D)
    out = vit.interpolate_pos_embed(pe, g0, grid)
    img = pe[:, 1:].reshape(1, g0, g0, D).permute(0, 3, 1, 2)                   # (1, D, g0, g0)
    ref = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)   # (1, D, gh, gw)
    ref = ref.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)
    assert out.shape == (1, 1 + grid[0] * grid[1], D)
    torch.testing.assert_close(out[:, :1], pe[:, :1], atol=0, rtol=0)          # class position kept
    torch.testing.assert_close(out[:, 1:], ref, atol=1e-5, rtol=0)       # float32 rounding


# ================================================================= token dropout
@pytest.mark.parametrize("drop", [0.25, 0.5, 0.75, 0.9])
def test_token_dropout_keeps_the_class_token_and_distinct_input_rows(drop):
    torch.manual_seed(1)
    B, N, D = 5, 49, 8
    x = torch.randn(B, 1 + N, D)
    out = vit.token_dropout(x, drop)
    assert out.shape == (B, 1 + n_kept(N, drop), D)
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(B):
        # every kept token is exactly one of the sample's own patch tokens, none twice
        match = (out[b, 1:, None, :] == x[b, None, 1:, :]).all(-1)   # (n_keep, N)
        assert (match.sum(1) == 1).all()
        assert len(set(match.float().argmax(1).tolist())) == out.shape[1] - 1


def test_token_dropout_draws_a_different_subset_for_each_sample():
    torch.manual_seed(2)
    B, N = 6, 64
    # identical samples, so only the subsets can differ
    x = torch.arange(1 + N, dtype=torch.float32).reshape(1, 1 + N, 1).expand(B, -1, -1)
    kept = [frozenset(row.tolist()) for row in vit.token_dropout(x, 0.5)[:, 1:, 0]]
    assert len(set(kept)) == B


def test_token_dropout_with_zero_drop_is_a_no_op():
    x = torch.randn(2, 10, 4)
    assert vit.token_dropout(x, 0.0) is x


def test_model_in_train_mode_drops_tokens_that_carry_their_position_embeddings():
    model = small_vit().train()
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(x, patch_size=8, drop=0.5)
    hook.remove()
    full = model.tokens(x, 8)                          # (3, 1+16, D), position embeddings added
    kept = seen["x"]                                   # what the first block received
    assert kept.shape == (3, 1 + 8, 32)
    assert torch.equal(kept[:, 0], full[:, 0])
    for b in range(3):
        match = (kept[b, 1:, None, :] == full[b, None, 1:, :]).all(-1)
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()


def test_eval_mode_ignores_drop():
    model = small_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x, drop=0.75, all_tokens=True), model(x, all_tokens=True))
    assert torch.equal(model(x, patch_size=8, drop=0.5), model(x, patch_size=8))


def test_zero_drop_in_train_mode_equals_evaluation():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    train_out = model.train()(x, drop=0.0, all_tokens=True)
    assert torch.equal(train_out, model.eval()(x, all_tokens=True))


# ===================================================================== gradients
@pytest.mark.parametrize("img, p", [(32, 8), (48, 4), (40, 6)])
def test_gradients_reach_the_base_kernel_and_position_embedding_through_both_resizes(img, p):
    model = small_vit().train()
    torch.manual_seed(3)
    x = torch.randn(2, 3, img, img)
    # a fixed random projection: the plain sum of LayerNorm outputs has ~zero gradient
    r = torch.randn(32)
    (model(x, patch_size=p, drop=0.25) @ r).sum().backward()
    for param in (model.patch_embed.proj.weight, model.pos_embed, model.cls_token):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert model.pos_embed.grad[0, 1:].abs().sum(-1).gt(0).all()   # every base position moves


# ====================================================================== interop
def timm_keys(depth):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    for i in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    return keys


def test_state_dict_has_exactly_the_timm_layout():
    model = small_vit(depth=3)
    model.train()(torch.randn(1, 3, 32, 32), patch_size=8)   # fills the matrix caches
    assert ("resize_kernel_matrix", (4, 8), torch.device("cpu"), torch.float32) in vit._MAPS
    sd = model.state_dict()
    assert set(sd) == timm_keys(3)
    assert sd["pos_embed"].shape == (1, 1 + 64, 32)
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (128, 32)


def test_state_dict_round_trip_is_strict_and_exact():
    a, b = small_vit(), vit.ViT(**small_vit().config())
    torch.manual_seed(9)
    b._init_weights()                                   # different weights before loading
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.eval()(x, patch_size=8), b.eval()(x, patch_size=8))


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def test_backbone_state_dict_reads_dino_checkpoints():
    student, teacher = small_vit().state_dict(), vit.ViT(**small_vit().config()).state_dict()
    ckpt = {"student": {**prefixed(student, "module.backbone."),
                        "module.head.mlp.0.weight": torch.zeros(4, 32),
                        "module.head.last_layer.weight_g": torch.zeros(4, 1)},
            "teacher": {**prefixed(teacher, "backbone."), "head.mlp.0.weight": torch.zeros(4, 32)},
            "epoch": 100}
    for branch, ref in (("online", student), ("target", teacher)):
        sd = vit.backbone_state_dict(ckpt, branch)
        assert set(sd) == set(ref) and all(sd[k] is ref[k] for k in ref)
        small_vit().load_state_dict(sd, strict=True)


def test_backbone_state_dict_reads_moco_v3_checkpoints():
    base, momentum = small_vit().state_dict(), vit.ViT(**small_vit().config()).state_dict()
    ckpt = {"state_dict": {**prefixed(base, "module.base_encoder."),
                           "module.base_encoder.head.0.weight": torch.zeros(4, 32),
                           **prefixed(momentum, "module.momentum_encoder."),
                           "module.momentum_encoder.head.0.weight": torch.zeros(4, 32),
                           "module.predictor.0.weight": torch.zeros(4, 4)},
            "epoch": 300, "optimizer": {}}
    for branch, ref in (("online", base), ("target", momentum)):
        sd = vit.backbone_state_dict(ckpt, branch)
        assert set(sd) == set(ref) and all(sd[k] is ref[k] for k in ref)
        small_vit().load_state_dict(sd, strict=True)


def test_backbone_state_dict_reads_timm_and_our_own_checkpoints():
    sd = small_vit().state_dict()
    timm_sd = {**sd, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    assert set(vit.backbone_state_dict(timm_sd)) == set(sd)
    assert set(vit.backbone_state_dict({"backbone": sd, "step": 3})) == set(sd)     # older runs
    ours = {"vit_config": {}, "method": {**{f"backbone.{k}": v for k, v in sd.items()},
                                         **{f"teacher.backbone.{k}": v + 1 for k, v in sd.items()},
                                         "head.last_layer.weight": torch.zeros(2, 2)}}
    assert set(vit.backbone_state_dict(ours)) == set(sd)
    target = vit.backbone_state_dict(ours, branch="target")
    assert set(target) == set(sd) and torch.equal(target["cls_token"], sd["cls_token"] + 1)


def test_backbone_state_dict_rejects_a_checkpoint_without_a_backbone_and_a_bad_branch():
    with pytest.raises(ValueError, match="blocks"):
        vit.backbone_state_dict({"head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="'student'"):
        vit.backbone_state_dict(small_vit().state_dict(), branch="student")


@pytest.mark.parametrize("other", [dict(depth=3), dict(dim=48), dict(patch_size=8),
                                   dict(img_size=48)])
def test_loading_a_mismatched_config_fails_strictly(other):
    sd = small_vit().state_dict()
    with pytest.raises(RuntimeError):
        small_vit(**other).load_state_dict(sd, strict=True)


# ====================================================================== errors
@pytest.mark.parametrize("drop", [-0.1, 1.0, 1.5])
def test_drop_outside_zero_one_is_rejected_with_the_range(drop):
    model = small_vit()
    with pytest.raises(ValueError, match=re.escape(str(drop))) as err:
        model(torch.randn(1, 3, 32, 32), drop=drop)
    assert "[0, 1)" in str(err.value)


@pytest.mark.parametrize("p", [0, 33, 100])
def test_patch_size_of_zero_or_larger_than_the_image_is_rejected(p):
    with pytest.raises(ValueError, match=rf"patch_size {p} .*\[1, 32\]"):
        small_vit()(torch.randn(1, 3, 32, 48), patch_size=p)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32)])
def test_wrong_image_shape_is_rejected_naming_the_shape(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))) as err:
        small_vit()(torch.randn(*shape))
    assert "(B, 3, H, W)" in str(err.value)


def test_unknown_preset_is_rejected_listing_the_presets():
    with pytest.raises(ValueError, match="'huge'") as err:
        vit.build_vit("huge")
    assert all(name in str(err.value) for name in vit.PRESETS)


@pytest.mark.parametrize("img, p", [(30, 4), (32, 0), (224, 15)])
def test_base_image_size_must_be_a_multiple_of_the_base_patch_size(img, p):
    with pytest.raises(ValueError, match=rf"img_size {img} .*patch_size {p}"):
        vit.ViT(img_size=img, patch_size=p, dim=32, depth=1, heads=2)


def test_dim_must_split_into_heads():
    with pytest.raises(ValueError, match="dim 30 .*heads 4"):
        vit.ViT(img_size=32, patch_size=4, dim=30, depth=1, heads=4)
