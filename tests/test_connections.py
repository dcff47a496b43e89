"""Where the parts connect: each test recomputes what two modules do together from an
independent derivation, so that a one-line slip in the wiring fails here even when every part
passes its own tests (tests/mutations.py lists those slips and checks that they are caught).

* the probe's rows are the gradients of each strategy, recomputed with torch.autograd.grad on
  the same draws in float64, and its cost-adjusted variance is σ_s² · c_s / c_0;
* one train_step at a given progress is a fresh AdamW step at learning_rate(progress) (the
  exempt group without weight decay), then the teacher's EMA at momentum_schedule(progress);
* attention is softmax(q kᵀ/√d) v per head, with q, k, v in timm's qkv layout;
* MoCo-v3's loss is moco_v3_loss of the predictor's outputs against the momentum keys;
* DINO's local crops are priced at the base patch size, whatever patch the global crops use.
"""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import augment  # noqa: E402
import compress  # noqa: E402
import data  # noqa: E402
import methods  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from losses import moco_v3_loss  # noqa: E402
from probe import SIGNAL_FLOOR, probe  # noqa: E402
from run import build_run  # noqa: E402
from schedule import learning_rate, momentum_schedule  # noqa: E402
from startup import TrainState  # noqa: E402
from test_distributed import Float64Views  # noqa: E402  (views in float64, for a float64 model)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ============================================================ the probe (paper §5)
def _reference_rows(method, view_set, strategies, seed, batch_size, batches, ref_batches):
    """What the probe's docstring defines, written out: draw the same batches (one index
    stream from ``seed``, epochs 1_000_000 + i for the reference and 2_000_000 + k for the
    strategies, token dropout seeded ``seed``), take every gradient with torch.autograd.grad,
    then the statistics in float64 over the stacked gradients (two passes, no streaming)."""
    params = [p for p in method.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)

    def draw(epoch):
        view_set.set_epoch(epoch)
        idx = torch.randint(len(view_set), (batch_size,), generator=g).tolist()
        items = [view_set[i][0] for i in idx]
        return [augment.normalize(torch.stack(v)) for v in zip(*items)]   # views × (b, 3, s, s)

    def gradient(views, s):
        loss, _ = method(views[:s.views], s.q, s.k, 0.4)
        return torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, params)])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = torch.stack([gradient(draw(1_000_000 + i), compress.NONE.resolve(2))
                           for i in range(ref_batches)])                  # (K_ref, P)
        per_strategy = [[] for _ in strategies]
        for k in range(batches):
            views = draw(2_000_000 + k)
            for s, grads in zip(strategies, per_strategy):
                grads.append(gradient(views, s))
    g_star = ref.mean(0)
    var0 = ((ref - g_star) ** 2).sum().item() / (ref_batches - 1)
    signal = max((g_star @ g_star).item() - var0 / ref_batches,
                 SIGNAL_FLOOR * (g_star @ g_star).item())
    rows = []
    for grads in per_strategy:
        G = torch.stack(grads)                                            # (K, P)
        mean = G.mean(0)
        var = ((G - mean) ** 2).sum().item() / (batches - 1)
        bias2_raw = ((mean - g_star) ** 2).sum().item() - var / batches - var0 / ref_batches
        rows.append(dict(var=var / signal, bias2_raw=bias2_raw / signal, mean=mean,
                         var_abs=var))
    return rows, signal


def test_the_probes_rows_are_each_strategys_gradients_recomputed_in_float64():
    """bias² and variance of every row equal those of gradients recomputed under the row's own
    compression (so compressed rows differ from the uncompressed one), and the cost-adjusted
    variance is σ_s² · c_s / c_0: a cheap strategy's variance is discounted, never inflated."""
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=16, depth=1, heads=2)
    method = methods.build_method("simclr", backbone, proj_dim=8, hidden_dim=16).double()
    views = Float64Views(data.ViewDataset(data.build_dataset("embedded", size=32, img_size=16),
                                          augment.build_views("simclr", 16), seed=0))
    strategies = [compress.Strategy.parse(t).resolve(2)
                  for t in ("none", "q:drop=0.5", "qk:patch=8")]
    cost = compress.CostModel(backbone)
    out = probe(method, views, strategies, "simclr", cost, progress=0.4, batches=3,
                ref_batches=3, batch_size=8, seed=5)
    ref_rows, signal = _reference_rows(method, views, strategies, 5, 8, 3, 3)
    assert out["ref_norm2_corrected"] == pytest.approx(signal, rel=1e-9)
    c0 = cost.sample_units("simclr", compress.NONE.resolve(2))
    for row, ref, s in zip(out["rows"], ref_rows, strategies):
        assert row["var"] == pytest.approx(ref["var"], rel=1e-9), row["strategy"]
        assert row["bias2_raw"] == pytest.approx(ref["bias2_raw"], rel=1e-9, abs=1e-12), \
            row["strategy"]
        c_s = cost.sample_units("simclr", s)
        assert row["units"] == pytest.approx(c_s)
        assert row["ca_var"] == pytest.approx(ref["var_abs"] * c_s / c0 / signal, rel=1e-9)
    # not trivially equal: the compressed gradients are other gradients, and cheaper ones
    none, dropped, coarse = ref_rows
    for other in (dropped, coarse):
        assert (other["mean"] - none["mean"]).norm() > 0.05 * none["mean"].norm()
    assert all(cost.sample_units("simclr", s) < c0 for s in strategies[1:])
    assert all(r["ca_var"] < r["var"] for r in out["rows"][1:])


# ========================================================== one training step (§6)
def test_one_train_step_is_an_adamw_step_at_the_scheduled_rate_then_the_ema():
    """DINO at progress 0.6 (after the warm-up, where the rate has decayed well below its
    peak): train_step equals a fresh torch.optim.AdamW step at learning_rate(0.6, …) on the
    same gradients, weight decay on the decayed group only, then the teacher moves to
    m·teacher + (1 − m)·student with m = momentum_schedule(0.6)."""
    args, _ = options.get_args(["--method", "dino", "--model", "cpu", "--img-size", "16",
                                "--data-size", "32", "--batch-size", "8", "--budget", "1k",
                                "--local-crops", "0", "--clip-grad", "0", "--lr", "0.05",
                                "--freeze-last-layer", "0", "--weight-decay", "0.04",
                                "--weight-decay-end", "0.04", "--min-lr", "0"])
    torch.manual_seed(0)
    run = build_run(args)
    progress = 0.6
    state = TrainState(spent=progress * args.budget, prices=[1.0])
    batch, _ = next(iter(run.loader))
    before = copy.deepcopy(run.method)
    with torch.random.fork_rng(devices=[]):
        _, stats = train.train_step(run, state, batch)

    lr = learning_rate(progress, args.lr * args.batch_size / 256, args.warmup, args.lr_schedule,
                       final_lr=0.0)
    assert stats["lr"] == pytest.approx(lr) and lr < 0.5 * run.peak_lr
    ref = copy.deepcopy(before)
    trainable = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    decayed = [p for n, p in trainable if p.ndim > 1]                 # DINO: not biases, norms
    exempt = [p for n, p in trainable if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.04},
                             {"params": exempt, "weight_decay": 0.0}], lr=lr)
    views = [augment.normalize(v) for v in batch[:2]]
    loss, _ = ref(views, progress=progress)
    loss.backward()
    opt.step()
    m = momentum_schedule(progress, args.momentum)
    with torch.no_grad():
        student = dict(ref.backbone.named_parameters(prefix="backbone"))
        student.update(ref.head.named_parameters(prefix="head"))
        for n, p in ref.teacher.named_parameters():
            p.copy_(m * p + (1 - m) * student[n])
    got = dict(run.method.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-7, msg=n)
    moved = got["backbone.blocks.0.attn.qkv.weight"] - before.backbone.blocks[0].attn.qkv.weight
    assert moved.abs().max().item() == pytest.approx(lr, rel=0.05)         # Adam's first step: ±lr
    assert not torch.equal(got["teacher.backbone.cls_token"], before.teacher.backbone.cls_token)


# ======================================================================= attention
def reference_attention(attn, x):
    """Multi-head self-attention written out head by head, in timm's qkv layout: the rows of
    qkv.weight are [W_q; W_k; W_v], and head h owns rows h·d … (h+1)·d − 1 of each."""
    B, L, D = x.shape
    H = attn.heads
    d = D // H
    W, b = attn.qkv.weight, attn.qkv.bias                            # (3D, D), (3D,)
    heads = []
    for h in range(H):
        rows = lambda part: slice(part * D + h * d, part * D + (h + 1) * d)   # noqa: E731
        q, k, v = (x @ W[rows(i)].T + b[rows(i)] for i in range(3))      # (B, L, d) each
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)   # (B, L, L)
        heads.append(weights @ v)                                    # (B, L, d)
    return attn.proj(torch.cat(heads, dim=-1))                      # (B, L, D)


@pytest.mark.parametrize("heads", [2, 3])
def test_attention_is_softmax_of_q_k_over_root_d_times_v_per_head_in_timms_layout(heads):
    torch.manual_seed(0)
    model = vit.ViT(img_size=16, patch_size=4, dim=24, depth=1, heads=heads).double()
    with torch.no_grad():                      # biases too: a bias slice taken wrong shows
        model.blocks[0].attn.qkv.bias.normal_()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-10, atol=1e-12)
    # and in the model: the class token of a one-block ViT, its block written out
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    block = model.blocks[0]
    tokens = model.tokens(images)
    h = tokens + reference_attention(block.attn, block.norm1(tokens))
    h = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(model(images), model.norm(h)[:, 0], rtol=1e-10, atol=1e-12)


def test_class_token_features_equal_timms_vision_transformer_on_the_same_weights():
    timm = pytest.importorskip("timm", reason="timm is not installed (it is not a dependency): "
                                              "the per-head reference above checks attention")
    torch.manual_seed(0)
    ours = vit.ViT(img_size=16, patch_size=4, dim=24, depth=2, heads=3).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=0,
        global_pool="token").eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ========================================================================= MoCo-v3
@pytest.mark.parametrize("symmetric", [True, False])
def test_moco_v3s_loss_is_the_predictors_queries_against_the_momentum_keys(symmetric):
    """Three views. Queries: predictor(projector(backbone(v))) of the online branch; keys: the
    momentum encoder's projector(backbone(v)), which is not the online one here. Symmetric:
    every ordered pair i ≠ j, mean × 2; one-directional: view 1 against views 2 and 3."""
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=16, depth=1, heads=2)
    method = methods.build_method("moco", backbone, proj_dim=8, hidden_dim=16,
                                  symmetric=symmetric)
    with torch.no_grad():                      # the momentum encoder is a copy: move the online
        for p in method.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    views = [torch.randn(6, 3, 16, 16) for _ in range(3)]
    loss, _ = method(views)
    q = [method.predictor(method.projector(method.backbone(v))) for v in views]
    with torch.no_grad():
        enc = method.momentum_encoder
        k = [enc.head(enc.backbone(v)) for v in views]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j] if symmetric else \
        [(0, 1), (0, 2)]
    expected = sum(moco_v3_loss(q[i], k[j], method.temperature) for i, j in pairs) / len(pairs)
    expected = expected * (2 if symmetric else 1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    without = sum(moco_v3_loss(method.projector(method.backbone(views[i])), k[j],
                               method.temperature) for i, j in pairs) / len(pairs)
    assert abs(without.item() * (2 if symmetric else 1) - loss.item()) > 1e-3   # it matters


# ==================================================================== DINO's price
def test_dinos_local_crops_are_priced_at_the_base_patch_whatever_the_global_patch():
    """q:drop=0.5,patch=8 on a 16-px, p0 = 4 backbone with 8-px local crops, no heads:
    global student crop: 2×2 patches of 8 px, 2 kept → 3 tokens; teacher crop: 16 patches →
    17 tokens; a local crop at the base patch 4: 2×2 patches, 2 kept → 3 tokens (at patch 8 it
    would be one patch, 1 token + class token). FLOPs per block 24·L·D² + 4·L²·D, patch
    embedding 2·n·3p²·D, counted here from those numbers."""
    D, depth = 32, 2
    backbone = vit.ViT(img_size=16, patch_size=4, dim=D, depth=depth, heads=2)
    c = compress.CostModel(backbone)

    def f(n_embedded, p, L):
        return 2 * n_embedded * 3 * p * p * D + depth * (24 * L * D * D + 4 * L * L * D)

    f0 = f(16, 4, 17)
    student, teacher, local = f(4, 8, 3), f0, f(4, 4, 3)
    s = compress.Strategy.parse("q:drop=0.5,patch=8").resolve(4)    # 2 global + 2 local crops
    expected = (2 * (3 * student + teacher) + 2 * 3 * local) / f0
    assert c.sample_units("dino", s, local_size=8) == pytest.approx(expected, rel=1e-12)
    assert local != f(1, 8, 2)          # the local crop at the global patch would differ


def test_every_one_line_bug_of_the_mutation_check_still_names_a_line_of_the_code():
    """tests/mutations.py makes each bug by replacing one exact line: a refactor that changes
    the line would leave the entry 'stale' (checking nothing) with no one told, so the suite
    says so here, where it costs nothing."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "mutations", os.path.join(os.path.dirname(os.path.abspath(__file__)), "mutations.py"))
    mutations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutations)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, file, old, new, tests in mutations.MUTATIONS:
        with open(os.path.join(root, file)) as f:
            text = f.read()
        assert text.count(old) == 1, f"{name}: {old!r} is not in {file} exactly once"
        assert new != old and tests, name
