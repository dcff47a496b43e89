"""The official recipes: DINO's optimisation (frozen last layer, per-parameter clipping, cosine
weight decay, learning-rate floor, teacher temperature, the teacher evaluated), MoCo-v3's frozen
patch projection and sin-cos position embedding, each method's weight-decay groups, float32
losses under bf16 autocast, and the augmentation flags."""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import augment  # noqa: E402
import checkpoint  # noqa: E402
from checkpoint import load_backbone  # noqa: E402
import heads  # noqa: E402
import losses  # noqa: E402
import methods  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from options import get_args  # noqa: E402
from run import weight_decay_groups  # noqa: E402
from schedule import cosine_between, learning_rate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--data-size", "128", "--batch-size", "16", "--log-every", "0", "--eval-every", "0"]


# ============================================================== DINO's optimisation
def test_clip_gradients_clips_each_parameter_to_the_norm_on_its_own():
    """DINO's clip_gradients: a large gradient is scaled to norm 3, a small one is untouched
    (torch's clip_grad_norm_ would scale both by the global norm)."""
    layer = torch.nn.Linear(4, 3)
    layer.weight.grad = torch.full((3, 4), 10.0)                       # norm 34.6
    layer.bias.grad = torch.tensor([0.3, 0.4, 0.0])                    # norm 0.5
    step.clip_gradients(layer, 3.0)
    assert layer.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(layer.weight.grad, torch.full((3, 4), layer.weight.grad[0, 0].item()))
    torch.testing.assert_close(layer.bias.grad, torch.tensor([0.3, 0.4, 0.0]))


def test_weight_decay_rises_on_a_cosine_and_the_rate_decays_to_its_floor():
    assert cosine_between(0.0, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_between(0.5, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_between(1.0, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine_between(0.25, 0.04, 0.4) == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(1.0, 1e-3, 0.1, final_lr=1e-6) == pytest.approx(1e-6)
    assert learning_rate(0.1, 1e-3, 0.1, final_lr=1e-6) == pytest.approx(1e-3)


def test_dino_defaults_are_the_official_recipe_and_others_keep_theirs():
    dino, _ = get_args(["--method", "dino", "--model", "small"])
    assert (dino.clip_grad, dino.weight_decay, dino.weight_decay_end, dino.min_lr) == (3.0, 0.04, 0.4, 1e-6)
    assert (dino.teacher_temp, dino.warmup_teacher_temp, dino.freeze_last_layer) == (0.04, 0.04, 0.01)
    assert dino.local_crops == 8 and not dino.stop_grad_conv1
    moco, _ = get_args(["--method", "moco", "--model", "small"])
    assert (moco.clip_grad, moco.weight_decay_end, moco.min_lr) == (0.0, 0.1, 0.0)
    assert moco.stop_grad_conv1 and moco.local_crops == 0
    assert dino.momentum is None and moco.momentum is None                # the methods' own
    assert not get_args(["--method", "moco"])[0].stop_grad_conv1          # cpu preset: off
    cpu = {m: get_args(["--method", m])[0] for m in ("dino", "moco", "simclr")}
    assert (cpu["dino"].momentum, cpu["moco"].momentum, cpu["simclr"].momentum) == (0.99, 0.9, None)
    assert cpu["dino"].local_crops == 2 and (cpu["dino"].lr, cpu["moco"].lr) == (1.5e-3, 5e-3)


def test_weight_decay_groups_follow_each_official_code():
    """DINO exempts biases and 1-D parameters only (class token and position embedding are
    decayed); MoCo-v3 gives every parameter to AdamW with its weight decay."""
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    dino = methods.build_method("dino", backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    names = {id(p): n for n, p in dino.named_parameters()}
    decay, exempt = weight_decay_groups(dino, exempt_1d=True)
    assert {names[id(p)] for p in exempt} == {n for n, p in dino.named_parameters()
                                             if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.parametrizations.weight.original1"} \
        <= {names[id(p)] for p in decay}
    moco = methods.build_method("moco", vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2),
                               proj_dim=8, hidden_dim=16)
    decay, exempt = weight_decay_groups(moco, exempt_1d=False)
    assert exempt == [] and len(decay) == sum(p.requires_grad for p in moco.parameters())


def test_dino_run_freezes_the_last_layer_clips_and_evaluates_the_teacher(tmp_path, monkeypatch):
    """A tiny DINO run: the prototypes take no step before --freeze-last-layer and do after;
    every step clips; and k-NN is measured on the teacher's backbone."""
    clips, evaluated = [], []
    clip = step.clip_gradients
    monkeypatch.setattr(step, "clip_gradients", lambda m, n: (clips.append(n), clip(m, n)))
    monkeypatch.setattr(train.protocols, "knn_accuracy", lambda net, *a, **k: (
        evaluated.append({k: v.clone() for k, v in net.state_dict().items()}), 0.0)[1])
    out = str(tmp_path / "dino")
    train.main(["--method", "dino", "--budget", "3000", "--out", out, "--freeze-last-layer", "0.5",
                "--ckpt-at", "0,0.25,1", "--out-dim", "32", *TINY])
    ckpt = {p: checkpoint.load(os.path.join(out, f"ckpt_{p}.pt")) for p in (0, 25, 100)}
    key = "head.last_layer.parametrizations.weight.original1"
    torch.testing.assert_close(ckpt[25]["method"][key], ckpt[0]["method"][key], rtol=0, atol=0)
    assert not torch.equal(ckpt[100]["method"][key], ckpt[0]["method"][key])
    assert not torch.equal(ckpt[25]["method"]["head.mlp.0.weight"], ckpt[0]["method"]["head.mlp.0.weight"])
    assert len(clips) == ckpt[100]["state"]["step"] and set(clips) == {3.0}
    # weight decay 0.04 → 0.4 on a cosine of the progress at which each step was taken
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [r for r in map(__import__("json").loads, f) if "wd" in r]
    price = (steps[1]["units"] - steps[0]["units"]) / 3000
    for r in steps:
        assert r["wd"] == pytest.approx(cosine_between(r["progress"] - price, 0.04, 0.4))
    assert steps[0]["wd"] < 0.1 < 0.3 < steps[-1]["wd"]
    teacher = {k[len("teacher.backbone."):]: v for k, v in ckpt[100]["method"].items()
               if k.startswith("teacher.backbone.")}
    assert set(evaluated[-1]) == set(teacher)
    for k, v in teacher.items():
        torch.testing.assert_close(evaluated[-1][k], v)
    assert not torch.equal(teacher["blocks.0.attn.qkv.weight"],
                           vit.run_backbone(ckpt[100], "online")["blocks.0.attn.qkv.weight"])
    # eval.py reports the teacher of a DINO checkpoint by default, as DINO does
    backbone, info = load_backbone(os.path.join(out, "last.pt"))
    assert info["branch"] == "target"
    torch.testing.assert_close(backbone.state_dict()["norm.weight"], teacher["norm.weight"])


# ======================================================================= MoCo-v3 on ViTs
def test_stop_grad_conv1_freezes_the_patch_projection_and_resizes_it_for_patch_scaling():
    torch.manual_seed(0)
    model = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2).freeze_patch_embed()
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (3 * 4 * 4 + 32))
    assert not w.requires_grad and w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert model.patch_embed.proj.bias.abs().sum() == 0
    model(torch.randn(2, 3, 16, 16), patch_size=8).sum().backward()
    assert w.grad is None and model.blocks[0].attn.qkv.weight.grad is not None
    # the kernel at patch 8 is the pseudo-inverse resize of the frozen one
    torch.testing.assert_close(model.patch_embed.kernel(8),
                               (vit.resize_kernel_matrix(4, 8).float() @ w.reshape(32 * 3, 16).T).T
                               .reshape(32, 3, 8, 8))


def test_moco_trains_with_a_frozen_patch_projection(tmp_path):
    out = str(tmp_path / "moco")
    train.main(["--method", "moco", "--budget", "600", "--out", out, "--ckpt-at", "0,1",
                "--stop-grad-conv1", *TINY])
    first, last = (checkpoint.load(os.path.join(out, f"ckpt_{p}.pt")) for p in (0, 100))
    assert first["args"]["stop_grad_conv1"]
    torch.testing.assert_close(vit.run_backbone(first, "online")["patch_embed.proj.weight"],
                               vit.run_backbone(last, "online")["patch_embed.proj.weight"], rtol=0, atol=0)
    assert not torch.equal(vit.run_backbone(first, "online")["blocks.0.mlp.fc1.weight"],
                             vit.run_backbone(last, "online")["blocks.0.mlp.fc1.weight"])


def mocov3_sincos(h, w, dim, temperature=10000.0):
    """MoCo-v3's build_2d_sincos_position_embedding, re-derived: rows then columns."""
    rows = []
    for y in range(h):
        for x in range(w):
            row = []
            for coord in (y, x):
                freqs = [1 / temperature ** (i / (dim // 4)) for i in range(dim // 4)]
                row += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
            rows.append(row)
    return torch.tensor([[0.0] * dim] + rows)[None]


def test_sincos_position_embedding_is_moco_v3s_at_the_base_grid_and_computed_for_others():
    model = vit.ViT(img_size=16, patch_size=4, dim=16, depth=1, heads=2, pos_embed="sincos")
    torch.testing.assert_close(model.pos_embed.detach(), mocov3_sincos(4, 4, 16))
    assert not model.pos_embed.requires_grad and model.config()["pos_embed"] == "sincos"
    # a 2×2 grid of 8-px patches: patch centres at base coordinates 0.5 and 2.5
    coarse = vit.sincos_pos_embed((2, 2), 16, base_grid=4)
    freqs = torch.tensor([1 / 10000 ** (i / 4) for i in range(4)])
    y, x = 2.5, 0.5                                                    # row 1, column 0
    expected = torch.cat([(y * freqs).sin(), (y * freqs).cos(), (x * freqs).sin(), (x * freqs).cos()])
    torch.testing.assert_close(coarse[0, 1 + 2], expected)
    tokens = model.tokens(torch.zeros(1, 3, 16, 16), patch_size=8)      # zero image: bias + position
    bias_cls = torch.cat([model.cls_token[0], model.patch_embed.proj.bias[None].expand(4, -1)])
    torch.testing.assert_close(tokens[0] - bias_cls, coarse[0])


# ==================================================================== float32 losses
@pytest.mark.parametrize("loss", ["nt_xent", "moco", "dino", "multiview"])
def test_losses_are_float32_under_bf16_autocast(loss):
    """Under bf16 autocast the losses still compute in float32: the same value as without."""
    torch.manual_seed(0)
    a, b = torch.randn(16, 64), torch.randn(16, 64)
    fn = {"nt_xent": lambda: losses.nt_xent(a, b, 0.2),
          "moco": lambda: losses.moco_v3_loss(a, b, 0.2),
          "dino": lambda: losses.dino_loss([a, b], [b, a], torch.zeros(1, 64), 0.1, 0.04),
          "multiview": lambda: losses.multiview_loss([a, b])[0]}[loss]
    plain = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fn()
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_heads_end_in_float32_under_autocast():
    torch.manual_seed(0)
    head = heads.DINOHead(32, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    proj = heads.mlp(32, 32, 16, layers=2, last_bn=False)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.float32 and proj(x).dtype == torch.float32


# ===================================================================== augmentation flags
def test_augmentation_flags_override_the_recipe_and_the_embedded_preset_is_a_flag():
    args, _ = get_args(["--method", "moco", "--crop-scale", "0.5,1", "--hue", "0.2", "--grayscale",
                        "0", "--blur", "0.3", "--solarize", "0,0.5", "--jitter-strength", "0.5"])
    assert args.colour == "strong"                                      # embedded set: the preset
    q, k = augment.build_views("moco", 32, **augment.recipe_settings(args))
    assert (q.scale, q.hue, q.grayscale_p, q.blur_p, k.blur_p, q.solarize_p, k.solarize_p) == \
        ((0.5, 1.0), 0.2, 0.0, 0.3, 0.3, 0.0, 0.5)                      # flags beat the preset
    assert (q.brightness, q.saturation) == pytest.approx((0.2, 0.1))
    official = augment.build_views("moco", 32, colour="official")
    assert (official[0].hue, official[0].grayscale_p) == (0.1, 0.2)
    assert augment.build_views("moco", 32, colour="strong")[0].hue == 0.5
    cifar, _ = get_args(["--data", "folder", "--data-root", "x"])
    assert cifar.colour == "official"


def test_dino_local_crop_flags():
    views = augment.build_views("dino", 32, local_crops=2, local_size=12, local_scale=(0.1, 0.3),
                                scale=(0.5, 1.0), blur_p=(1.0, 0.0))
    assert [v.size for v in views] == [32, 32, 12, 12]
    assert [v.scale for v in views] == [(0.5, 1.0)] * 2 + [(0.1, 0.3)] * 2
    assert [v.blur_p for v in views] == [1.0, 0.0, 0.5, 0.5]            # local crops keep theirs


@pytest.mark.parametrize("flags, message", [
    (["--crop-scale", "0.5"], "LO,HI"), (["--crop-scale", "0.9,0.2"], "LO ≤ HI"),
    (["--hue", "0.7"], "--hue 0.7 must be in"), (["--blur", "1.5"], "must be in \\[0, 1\\]"),
    (["--grayscale", "2"], "is a probability"), (["--clip-grad", "-1"], "--clip-grad -1.0"),
    (["--freeze-last-layer", "1"], "--freeze-last-layer 1.0"), (["--teacher-temp", "0"], "positive"),
    (["--out-dim", "1"], "--out-dim 1 must be"), (["--colour", "neon"], "invalid choice")])
def test_bad_recipe_flags_are_refused_naming_the_value(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        get_args(flags)
    assert e.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_the_quick_start_budget_is_per_method_and_a_given_budget_wins():
    budget = {m: get_args(["--method", m])[0].budget for m in ("simclr", "moco", "dino", "multiview")}
    assert budget == {"simclr": 2e5, "moco": 5e5, "dino": 2e5, "multiview": 2e5}
    assert get_args(["--method", "moco", "--budget", "50k"])[0].budget == 5e4
