"""Every bad input gives a clear error (naming the value and what is allowed), a non-zero exit,
and leaves what is on disk as it was; the inputs that are not errors are handled and reported.

The catalogue (tests/test_train.py covers a first set of bad flags: method, budget, batch 1,
strategy strings, a missing schedule file, model preset, a missing data root):

* image folders: corrupt and truncated files are skipped with a warning naming each file and
  a count in the summary (one bad JPEG among 130k must not kill a multi-day run); grayscale,
  RGBA, palette, 16-bit and tiny (1×1, 4×4) images are converted and train; a root without
  ``train/`` (or ``val/``) is an error naming the root and what it holds;
* out-of-range flags, an image size that the patch size does not divide;
* malformed schedule files: the error names the file and the field;
* checkpoints from another model or not from train.py at all, under --resume;
* a non-finite loss, and a gradient that turns the weights non-finite: the run stops naming
  the step, the value and the last good checkpoint, which is left byte for byte as it was.

Most cases run ``train.main`` in this process (start-up is most of a tiny run's cost).
"""
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import compress  # noqa: E402
import methods  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

TINY = ["--model", "cpu", "--img-size", "16", "--data-size", "128", "--batch-size", "16",
        "--eval-every", "0", "--log-every", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ======================================================================== image folders
def _save(array, path):
    Image.fromarray(np.asarray(array)).save(path)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """An ImageNet-style tree with every kind of file a real one may hold."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                _save(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                      root / split / c / f"ok{k}.jpg")
    t = root / "train"
    _save(rng.integers(0, 256, (12, 12), dtype=np.uint8), t / "ant" / "gray.png")
    _save(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), t / "ant" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("P").save(
        t / "ant" / "palette.png")
    _save(np.array([[0, 256, 32768, 65535]] * 4, dtype=np.uint16), t / "bee" / "deep16.png")
    _save(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), t / "bee" / "one_pixel.png")
    _save(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), t / "bee" / "tiny.png")
    good = (t / "bee" / "ok0.jpg").read_bytes()
    (t / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (t / "ant" / "corrupt.png").write_bytes(b"not a png at all" * 8)
    return root


def test_a_folder_with_corrupt_and_odd_images_trains_and_counts_what_it_skipped(
        odd_folder, tmp_path, run_main):
    out = tmp_path / "run"
    code, text, warned = run_main(["--data", "folder", "--data-root", str(odd_folder), "--method",
                                   "simclr", "--model", "cpu", "--img-size", "16", "--batch-size",
                                   "4", "--budget", "150", "--eval-every", "0", "--log-every", "0",
                                   "--out", str(out)])
    assert code == 0, text
    # grayscale, RGBA, palette, 16-bit, 1×1 and 4×4 images went through: no error about them
    assert not [w for w in warned if any(n in w for n in ("gray", "rgba", "palette", "deep16",
                                                           "one_pixel", "tiny.png"))]
    # the two unreadable files are named in warnings, in the summary and in the checkpoint
    assert any("truncated.jpg" in w for w in warned) and any("corrupt.png" in w for w in warned)
    assert "warning: 2 unreadable training image(s) were skipped" in text, text
    summary = text[text.index("warning: 2 unreadable"):]
    assert "truncated.jpg" in summary and "corrupt.png" in summary
    bad = checkpoint.load(out / "last.pt")["state"]["bad_files"]
    assert sorted(os.path.basename(p) for p in bad) == ["corrupt.png", "truncated.jpg"]


def test_a_data_root_without_train_is_named_with_what_it_holds(tmp_path, run_main):
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    code, text, _ = run_main([*TINY, "--data", "folder", "--data-root", str(tmp_path / "data"),
                              "--out", str(tmp_path / "run")])
    assert code != 0 and "no 'train/' folder under" in text and "['val']" in text, text
    assert not (tmp_path / "run").exists()


def test_a_data_root_without_val_is_named_too(odd_folder, tmp_path, run_main):
    root = tmp_path / "data"
    shutil.copytree(odd_folder / "train", root / "train")
    code, text, _ = run_main([*TINY, "--data-size", "8", "--batch-size", "4", "--data", "folder",
                              "--data-root", str(root), "--out", str(tmp_path / "run")])
    assert code != 0 and "no 'val/' folder under" in text and "['train']" in text, text
    assert not (tmp_path / "run").exists()


# ============================================================================ flags
@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "--lr -1.0 must be a positive number"),
    (["--lr", "nan"], "--lr nan must be a positive number"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1 must be a number ≥ 0"),
    (["--img-size", "0"], "--img-size 0 must be ≥ 1"),
    (["--patch-size", "0"], "--patch-size 0 must be ≥ 1"),
    (["--data-size", "0"], "--data-size 0 must be ≥ 1"),
    (["--knn-bank", "0"], "--knn-bank 0 must be ≥ 1"),
    (["--workers", "-1"], "--workers -1 must be ≥ 0"),
    (["--seed", "-1"], "--seed -1 must be ≥ 0"),
    (["--save-every", "0"], "--save-every 0.0 in (0, 1]"),
    (["--save-every-steps", "-2"], "--save-every-steps -2 must be ≥ 0"),
    (["--eval-every", "1.5"], "--eval-every 1.5 must be in [0, 1]"),
    (["--warmup", "1"], "--warmup 1.0 must be in [0, 1)"),
    (["--local-crops", "-1"], "--local-crops -1 must be ≥ 0"),
    (["--log-every", "-1"], "--log-every -1.0 must be ≥ 0"),
    (["--ckpt-at", "0.5,2"], "'0.5,2': every fraction must be in [0, 1]"),
    (["--cost", "guess"], "invalid choice: 'guess'"),
    (["--batch-size", "256"], "dataset (n=128) is smaller than one global batch of batch_size=256"),
    (["--img-size", "30"], "img_size 30 must be a positive multiple of patch_size 4"),
    (["--img-size", "32", "--patch-size", "5"], "img_size 32 must be a positive multiple of "
                                                "patch_size 5"),
])
def test_out_of_range_flags_are_named_with_their_range_and_write_nothing(tmp_path, run_main,
                                                                        args, message):
    code, text, _ = run_main([*TINY, "--out", str(tmp_path / "run"), *args])
    assert code != 0 and message in text, text
    assert not (tmp_path / "run").exists()


# =================================================================== schedule files
STAGE = {"start": 0.0, "strategy": "q:drop=0.5"}


@pytest.mark.parametrize("content, named", [
    ("{not json", "not valid JSON"),
    (json.dumps({"stage": [STAGE]}), "expected an object with a 'stages' list"),
    (json.dumps({"stages": []}), "'stages' must be a non-empty list"),
    (json.dumps({"stages": [{"start": 0.0}]}), "stages[0] has no 'strategy' field"),
    (json.dumps({"stages": [STAGE, {"start": "half", "strategy": "none"}]}),
     "stages[1].start = 'half'"),
    (json.dumps({"stages": [{"start": 0.0, "strategy": "q:drop=1.5"}]}), "stages[0].strategy"),
    (json.dumps({"stages": [{"start": 0.0, "strategy": "z:drop=0.5"}]}), "stages[0].strategy"),
    (json.dumps({"stages": [{"start": 0.2, "strategy": "none"}]}),
     "the first stage must start at 0"),
    (json.dumps({"stages": [STAGE, {"start": 0.0, "strategy": "none"}]}), "must increase strictly"),
    (json.dumps({"stages": [{"start": 0.0, "strategy": "qk:patch=64"}]}), "patch 64 is larger"),
])
def test_a_malformed_schedule_file_is_named_with_the_field(tmp_path, run_main, content, named):
    sched = tmp_path / "schedule.json"
    sched.write_text(content)
    code, text, _ = run_main([*TINY, "--accel", str(sched), "--out", str(tmp_path / "run")])
    assert code != 0 and named in text and str(sched) in text, text
    assert not (tmp_path / "run").exists()


# ====================================================================== checkpoints
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step MoCo run: last.pt, log.jsonl and the arguments that wrote them."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = [*TINY, "--method", "moco", "--budget", "200", "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setenv("OMP_NUM_THREADS", "1")
        train.main(args)
    torch.set_num_threads(threads)
    return out, args


OURS = vit.build_vit("cpu", img_size=16)                # the model the `finished` run trains
NARROW = vit.ViT(img_size=16, patch_size=4, dim=OURS.dim // 2, depth=OURS.depth, heads=OURS.heads)


def _state(method, backbone):
    return methods.build_method(method, backbone,
                               **methods.head_sizes(method, backbone.dim)).state_dict()


def _doctor(kind, ckpt, path):
    """Turn last.pt into ``kind``; returns what the error must name."""
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
        return ["no readable checkpoint to resume from", "unreadable"]
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ["no readable checkpoint to resume from", "unreadable"]
    if kind == "plain state dict":
        torch.save(OURS.state_dict(), path)
        return ["is not a checkpoint written by train.py", "blocks.0"]
    ckpt.pop("checksum")                 # what follows is rewritten with a checksum of its own
    if kind == "narrower model":                          # same method and layers, other width
        ckpt["method"], ckpt["vit_config"] = _state("moco", NARROW), NARROW.config()
        checkpoint.save_checkpoint(ckpt, str(path))
        d, D = NARROW.dim, OURS.dim
        return ["does not fit the moco model", "ViT configuration", f"'dim': {d}",
                f"backbone.cls_token: checkpoint (1, 1, {d}) vs model (1, 1, {D})", "more"]
    if kind == "other method's heads":                    # SimCLR weights under MoCo's name
        ckpt["method"] = _state("simclr", OURS)
        checkpoint.save_checkpoint(ckpt, str(path))
        shape = tuple(_state("moco", OURS)["predictor.0.weight"].shape)
        return ["does not fit the moco model",
                f"predictor.0.weight: in the model {shape}, not in the checkpoint",
                "momentum_encoder.backbone.cls_token: in the model"]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "plain state dict", "narrower model",
                                  "other method's heads"])
def test_resuming_from_a_checkpoint_of_another_model_lists_what_differs(
        finished, tmp_path, run_main, kind):
    src, args = finished
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "log.jsonl"):
        (run / name).write_bytes((src / name).read_bytes())
    named = _doctor(kind, checkpoint.load(run / "last.pt"), run / "last.pt")
    before = [digest(run / "last.pt"), digest(run / "log.jsonl")]
    code, text, _ = run_main([*args[:-1], str(run), "--resume"])
    assert code != 0 and str(run / "last.pt") in text, text
    assert all(n in text for n in named), text
    assert before == [digest(run / "last.pt"), digest(run / "log.jsonl")]   # nothing touched


# ================================================================ non-finite values
def _nan_loss(loss):
    return loss * float("nan")


def _nan_gradient(loss):               # the loss stays finite; every gradient becomes NaN
    loss.register_hook(lambda g: g * float("nan"))
    return loss


@pytest.mark.parametrize("fault, named", [
    (_nan_loss, "non-finite loss at step 3 (progress {progress:.1%}; rank 0: nan)"),
    (_nan_gradient, "non-finite weights after step 3 (backbone.cls_token"),
])
def test_a_non_finite_step_stops_the_run_and_never_overwrites_the_last_good_checkpoint(
        tmp_path, run_main, monkeypatch, fault, named):
    """The loss of step 3 turns NaN (a diverging run): the run stops before anything after
    step 2 is saved. Its gradient turns NaN (finite loss, weights turn NaN): the save after
    it is refused. Either way last.pt is byte for byte step 2's."""
    forward, calls = methods.MoCoV3.forward, [0]

    def faulty_forward(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        calls[0] += 1
        return (fault(loss) if calls[0] == 3 else loss), stats
    monkeypatch.setattr(methods.MoCoV3, "forward", faulty_forward)
    saves = []
    real_save = checkpoint.save_checkpoint

    def recording_save(obj, path, keep=1):          # what last.pt held after each save
        real_save(obj, path, keep)
        saves.append((os.path.basename(path), obj["state"]["step"], digest(path)))
    monkeypatch.setattr(checkpoint, "save_checkpoint", recording_save)   # (the writer's)
    out = tmp_path / "run"
    code, text, _ = run_main([*TINY, "--method", "moco", "--budget", "1k", "--save-every-steps",
                              "1", "--ckpt-at", "0", "--out", str(out)])
    # progress before step 3: two steps of 16 samples at the cost model's price, of 1k units
    ckpt = checkpoint.load(out / "last.pt")
    backbone = vit.ViT(**ckpt["vit_config"])
    method = methods.build_method("moco", backbone, **ckpt["method_kwargs"])
    price = compress.CostModel(backbone, heads=method.cost_heads()).sample_units(
        "moco", compress.NONE.resolve(2))
    named = named.format(progress=2 * 16 * price / 1000)
    assert code != 0 and named in text, text
    assert f"the last good checkpoint is {out / 'last.pt'} (step 2)" in text, text
    last_saves = [s for s in saves if s[0] == "last.pt"]
    assert [s[1] for s in last_saves] == [1, 2]
    assert digest(out / "last.pt") == last_saves[-1][2]
    assert all(torch.isfinite(t).all() for t in checkpoint.load(
        out / "last.pt")["method"].values() if t.is_floating_point())
    # a restart (torchrun --max-restarts, or by hand) would replay the same steps: refused
    monkeypatch.setattr(methods.MoCoV3, "forward", forward)
    code, again, _ = run_main([*TINY, "--method", "moco", "--budget", "1k", "--out", str(out),
                               "--resume"])
    assert code != 0 and named in again and "delete" in again and "STOPPED" in again, again
    assert digest(out / "last.pt") == last_saves[-1][2]
