import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import random
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import eval as ev
import protocols
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, patch_size=8, dim=32, depth=1, heads=2)


def naive_knn(train, train_labels, test, k, T, C):
    """The weighted vote written out one test point and one neighbour at a time."""
    preds = []
    for x in test:
        sims = [float(torch.dot(x, t) / (x.norm() * t.norm())) for t in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * C
        for i in order:
            votes[int(train_labels[i])] += torch.exp(torch.tensor(sims[i] / T)).item()
        preds.append(max(range(C), key=lambda c: votes[c]))
    return torch.tensor(preds)


def clusters(centres, n_per_class, spread, g):
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=g), labels


# ===================================================================================== k-NN
def test_knn_equals_a_naive_weighted_vote(monkeypatch):
    monkeypatch.setattr(protocols, "KNN_CHUNK_ENTRIES", 1000)          # 8 test rows per chunk
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(120, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (120,), generator=g)
    for k, T in ((1, 0.07), (7, 0.07), (20, 0.5)):
        assert torch.equal(protocols.knn_classify(train, labels, test, k, T, num_classes=5),
                           naive_knn(train, labels, test, k, T, 5))


def test_knn_is_perfect_on_separated_clusters_and_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    centres = 5 * torch.randn(6, 32, generator=g)
    (x, y), (xt, yt) = clusters(centres, 60, 0.5, g), clusters(centres, 20, 0.5, g)
    assert (protocols.knn_classify(x, y, xt) == yt).float().mean() == 1.0
    noise, test = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    acc = (protocols.knn_classify(noise, torch.randint(0, 10, (2000,), generator=g), test)
           == torch.randint(0, 10, (1000,), generator=g)).float().mean()
    assert 0.06 < acc < 0.14                          # chance = 0.10


# ============================================================================= linear probe
def test_linear_probe_separates_linearly_separable_features_deterministically():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 4, generator=g)

    def separable(n):              # labels from a linear map, keeping points with a margin
        x = torch.randn(n, 16, generator=g) * 3 + 1
        top2 = (x @ w).topk(2, dim=1).values
        x = x[top2[:, 0] - top2[:, 1] > 3.0]
        return x, (x @ w).argmax(1)

    (x, y), (xv, yv) = separable(1000), separable(500)
    acc = protocols.linear_probe(x, y, xv, yv, epochs=10)             # lr from the held-out sweep
    assert acc > 95
    lr, sweep = protocols.select_probe_lr(x, y, epochs=10)
    assert lr in protocols.PROBE_LRS and set(sweep) == set(protocols.PROBE_LRS)
    assert protocols.linear_probe(x, y, xv, yv, epochs=10, lr=lr) == acc   # same seed, same result


# ================================================================= features and fine-tuning
def test_extract_features_is_the_eval_class_token_and_restores_the_training_flag():
    model = vit.ViT(**TINY).train()
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10)
    feats, labels = protocols.extract_features(model, protocols.feature_loader(TensorDataset(x, y), 4), "cpu")
    assert model.training and feats.dtype == torch.float32 and torch.equal(labels, y)
    with torch.no_grad():
        assert torch.allclose(feats, model.eval()(x), atol=1e-6)
    model.train()
    assert protocols.knn_accuracy(model, TensorDataset(x, y), TensorDataset(x, y), "cpu", k=1) == 100
    assert model.training                 # each image's nearest neighbour is itself


def test_features_from_uint8_images_are_the_normalised_float_features(monkeypatch):
    """Evaluation images travel as bytes and are normalised where the backbone runs: the
    features equal those of the float images normalised on the host (float noise apart); a set
    already held as one tensor of the eval size gives them with no loader, rank by rank as the
    loader's shards do; any other set goes through a loader of uint8 batches."""
    import torchvision.transforms.v2.functional as F
    import data
    from augment import MEAN, STD
    from embedded import EmbeddedShapes
    model = vit.ViT(**TINY)
    held = data.EvalDataset(EmbeddedShapes("val", size=21), 32, subset=13)    # TensorImages
    images, labels = held.as_tensors()
    assert images.dtype == torch.uint8 and images.shape == (13, 3, 32, 32)
    assert torch.equal(images[4], held[4][0]) and labels[4] == held[4][1]
    floats = F.normalize(images.float() / 255, MEAN, STD)
    reference, _ = protocols.extract_features(
        model, protocols.feature_loader(TensorDataset(floats, labels), 5), "cpu")
    loader = protocols.feature_loader(held, 5)
    assert next(iter(loader))[0].dtype == torch.uint8             # bytes through the loader
    via_loader, _ = protocols.extract_features(model, loader, "cpu")
    monkeypatch.setattr(protocols, "feature_loader", None)          # no loader from here on
    feats, got = protocols.tensor_features(model, images, labels, "cpu", batch_size=5)
    assert torch.equal(got, labels)
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_loader, reference, atol=1e-5, rtol=0)
    share, share_labels = protocols.dataset_features(model, held, "cpu", 4, rank=1, world=2,
                                                     pad=True)
    index = protocols.shard_index(13, 1, 2, pad=True)               # 1, 3, …, 11, then 12
    assert index[-1] == 12 and torch.equal(share_labels, labels[index])
    torch.testing.assert_close(share, reference[index], atol=1e-5, rtol=0)
    larger = data.EvalDataset(EmbeddedShapes("val", size=3, img_size=40), 32)
    assert larger.as_tensors() is None                                 # resized: through a loader
    with pytest.raises(TypeError):
        protocols.dataset_features(model, larger, "cpu")


def test_finetune_learns_an_easy_task_and_leaves_the_backbone_untouched():
    g = torch.Generator().manual_seed(4)
    y = torch.arange(128) % 2
    x = torch.randn(128, 3, 32, 32, generator=g) * 0.3 + (2 * y - 1).float()[:, None, None, None]
    backbone = vit.ViT(**TINY)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    acc = protocols.finetune(backbone, TensorDataset(x, y), TensorDataset(x[:64], y[:64]), 2, "cpu",
                      epochs=2, lr=1e-3, batch_size=32)
    assert acc > 90
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


# ============================================================================= checkpoints
def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_load_backbone_round_trips_ours_dino_moco_and_timm_layouts(tmp_path):
    torch.manual_seed(0)
    online, target = vit.build_vit("cpu"), vit.build_vit("cpu")
    x = torch.randn(4, 3, 32, 32)
    sd, td = online.state_dict(), target.state_dict()
    layouts = {
        "ours": {"vit_config": online.config(), "backbone": sd, "args": {"data": "embedded"},
                 "method": {f"momentum_encoder.backbone.{k}": v for k, v in td.items()},
                 "rng": [{"numpy": np.random.get_state(), "python": random.getstate()}]},
        "dino": {"student": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                             "module.head.last_layer.weight_g": torch.ones(3)},
                 "teacher": {f"backbone.{k}": v for k, v in td.items()}},
        "moco": {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                                **{f"module.momentum_encoder.{k}": v for k, v in td.items()},
                                "module.base_encoder.head.0.weight": torch.ones(4, 128),
                                "module.predictor.0.weight": torch.ones(4, 4)}},
        "timm": {**sd, "head.weight": torch.ones(10, 128), "head.bias": torch.ones(10)},
    }
    for name, ckpt in layouts.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        model = None if name == "ours" else "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("error")         # loads with weights_only=True, no warning
            loaded, info = ev.load_backbone(str(tmp_path / f"{name}.pt"), model=model,
                                            branch="online")
        assert torch.equal(features(loaded, x), features(online, x)), name
        # by default, what each paper evaluates: DINO's teacher, the others' online weights
        auto, auto_info = ev.load_backbone(str(tmp_path / f"{name}.pt"), model=model)
        assert auto_info["branch"] == ("target" if name == "dino" else "online"), name
        assert torch.equal(features(auto, x), features(target if name == "dino" else online, x))
        if name != "timm":
            loaded, _ = ev.load_backbone(str(tmp_path / f"{name}.pt"), model, branch="target")
            assert torch.equal(features(loaded, x), features(target, x)), name
    assert info["format"] == "interop" and info["config"] == online.config()


def test_a_checkpoint_of_another_config_is_refused_with_the_mismatches_listed(tmp_path):
    small = vit.ViT(**TINY)
    torch.save({"student": {f"module.backbone.{k}": v for k, v in small.state_dict().items()},
                "teacher": {}}, tmp_path / "dino.pt")
    with pytest.raises(ValueError) as err:
        ev.load_backbone(str(tmp_path / "dino.pt"), model="cpu", branch="online")
    msg = str(err.value)
    assert "missing" in msg and "blocks.1.attn.qkv.weight" in msg       # cpu has depth 4
    assert "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (192, 64)" in msg
    with pytest.raises(ValueError, match="--model"):                     # no vit_config
        ev.load_backbone(str(tmp_path / "dino.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ev.load_backbone(str(tmp_path / "nope.pt"))


# ===================================================================================== CLI
def run_cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_knn_end_to_end_on_a_tiny_checkpoint(tmp_path):
    model = vit.ViT(**TINY)
    torch.save({"vit_config": model.config(), "backbone": model.state_dict(),
                "args": {"data": "embedded", "data_root": None, "img_size": 32}},
               tmp_path / "tiny.pt")
    out = tmp_path / "res" / "results.json"
    proc = run_cli(str(tmp_path / "tiny.pt"), "--knn", "--pixel-knn", "--limit", "100",
                   "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "PX " in proc.stdout and " | NN " in proc.stdout
    results = json.loads(out.read_text())
    assert results["n_train"] == results["n_val"] == 100 and results["data"] == "embedded"
    assert 0 <= results["knn"]["top1"] <= 100 and 0 <= results["pixel_knn"]["top1"] <= 100


def test_all_train_evaluates_a_run_pretrained_on_part_of_the_data_against_every_image(tmp_path):
    """By default a run's k-NN bank is the --data-size images it trained on (the k-NN it
    logged); --all-train takes the whole split (less pretraining data, the same labels)."""
    model = vit.ViT(**TINY)
    torch.save({"vit_config": model.config(), "backbone": model.state_dict(),
                "args": {"data": "embedded", "data_root": None, "img_size": 32,
                         "data_size": 100}}, tmp_path / "part.pt")
    n = {}
    for flags in ((), ("--all-train",)):
        out = tmp_path / f"res{len(flags)}.json"
        proc = run_cli(str(tmp_path / "part.pt"), "--knn", "--device", "cpu", "--out", str(out),
                       *flags)
        assert proc.returncode == 0, proc.stderr
        n[flags] = json.loads(out.read_text())["n_train"]
    assert n[()] == 100 and n[("--all-train",)] == 8000


def test_bad_cli_input_exits_with_a_message_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        ev.main([str(tmp_path / "missing.pt"), "--knn"])
    assert "missing.pt" in str(exit.value.code)             # a message, so exit status 1
    with pytest.raises(SystemExit) as exit:
        ev.main(["--random-init", "--knn"])
    assert exit.value.code == 2 and "--model" in capsys.readouterr().err
