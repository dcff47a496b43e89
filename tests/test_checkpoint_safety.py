"""A checkpoint is data, not code: every reader unpickles tensors and a few plain types only.

A pickle names functions to call while it loads (an object's ``__reduce__``), so a checkpoint
from the internet, or from a run folder others can write to, could run code as whoever reads
it. The payload here is harmless — unpickling it calls ``os.mkdir(marker)`` — and hidden in a
real train.py checkpoint whose checksum matches what a full unpickling gives. eval.py, probe.py,
``train.py --resume`` and ``load_backbone`` refuse it with a non-zero exit, naming the file, the
function it would call and ``--trust-checkpoint``, and the marker never appears; with the
opt-in it loads, the marker appears (its code did run), and the resume is still bitwise. Our
own checkpoints (every method; DINO with local crops, SimCLR with --accel auto; all written
by the background writer), those written before (numpy arrays in the RNG state) and files in
the published DINO, MoCo-v3 and timm layouts load without it.
"""
import argparse
import hashlib
import io
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import eval as ev  # noqa: E402
import probe  # noqa: E402
import vit  # noqa: E402
from test_resume import TINY, assert_bitwise_equal, run_in_process  # noqa: E402

RUNS = {                               # one tiny run per method, as train.py writes them
    "simclr": ["--method", "simclr", "--budget", "0.9k", "--accel", "auto", "--auto-at", "0",
               "--auto-batches", "2", "--auto-grid", "drop=0,0.75"],
    "moco": ["--method", "moco", "--budget", "0.6k"],
    "dino": ["--method", "dino", "--budget", "1k", "--accel", "q:drop=0.5", "--local-crops", "2"],
    "multiview": ["--method", "multiview", "--budget", "0.9k", "--views", "3"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


class Payload:
    """What a malicious pickle does, harmlessly: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def with_payload(src, dst, marker):
    """``src`` (a train.py checkpoint) with a payload beside its weights, saved as ``dst``; its
    checksum is that of what a full unpickling gives (the payload's result, None), as an
    attacker would write it: a trusted load passes the check."""
    ckpt = checkpoint.load(src)
    del ckpt["checksum"]
    ckpt["note"] = None
    ckpt["checksum"] = checkpoint.checksum(ckpt)
    ckpt["note"] = Payload(marker)
    torch.save(ckpt, dst)


def digests(folder):
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest()
            for p in sorted(os.listdir(folder))}


def assert_refused(text, path, marker):
    named = f"{os.mkdir.__module__}.mkdir"                      # posix.mkdir on Linux
    assert str(path) in text and named in text and "--trust-checkpoint" in text, text
    assert not os.path.exists(marker), "the payload ran"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{method: its run folder}: every file train.py wrote (stage checkpoints, last.pt,
    last-1.pt), in this process on one thread."""
    tmp = tmp_path_factory.mktemp("runs")
    for name, args in RUNS.items():
        run_in_process([*TINY, *args, "--out", str(tmp / name)])
    return {name: tmp / name for name in RUNS}


# ====================================================== ours and the published layouts load
def test_every_checkpoint_of_every_method_loads_as_data_without_the_opt_in(runs):
    """Each file names no class or function at all (tensors and plain values only: even
    torch.load's defaults read it), passes its checksum after the restricted load, and gives
    its backbone."""
    for name, out in runs.items():
        files = sorted(p for p in os.listdir(out) if p.endswith(".pt"))
        assert {"last.pt", "last-1.pt", "ckpt_0.pt", "ckpt_100.pt"} <= set(files), files
        for f in files:
            assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out / f)) == [], f
            ckpt = checkpoint.load_checked(out / f)
            assert ckpt["args"]["method"] == name and len(ckpt["rng"][0]["numpy"][1]) == 624
        backbone, info = checkpoint.load_backbone(str(out / "last.pt"))
        assert info["format"] == "accel-ssl" and info["args"]["method"] == name
    assert checkpoint.load(runs["simclr"] / "last.pt")["state"]["auto"]        # a probe ran


def as_written_before(src, dst):
    """``src`` as the code before plain-number RNG states wrote it (numpy's state as
    np.random.get_state() gives it: a uint32 array) and as numpy < 2.1 names the function that
    rebuilds an array (numpy.core.multiarray._reconstruct; since: numpy._core...), the rename
    done in the pickle's bytes (torch's legacy format keeps them in the open)."""
    ckpt = checkpoint.load(src)
    del ckpt["checksum"]
    for s in ckpt["rng"]:
        name, key, *rest = s["numpy"]
        s["numpy"] = (name, np.array(key, dtype=np.uint32), *rest)
    buffer = io.BytesIO()
    torch.save({**ckpt, "checksum": checkpoint.checksum(ckpt)}, buffer,
               _use_new_zipfile_serialization=False)
    new, old = b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
    assert new in buffer.getvalue()
    dst.write_bytes(buffer.getvalue().replace(new, old))


def test_a_checkpoint_written_before_still_resumes_bitwise(runs, tmp_path):
    """Half-way through the DINO run (dropout, local crops: the RNG streams matter), as the
    code before wrote it: it loads under the allow-list, passes its checksum and resumes to
    the uninterrupted run's weights, bitwise. The allow-list stays the loader's: a plain
    weights-only torch.load still refuses the array."""
    run = tmp_path / "run"
    run.mkdir()
    as_written_before(runs["dino"] / "ckpt_50.pt", run / "last.pt")
    assert isinstance(checkpoint.load_checked(run / "last.pt")["rng"][0]["numpy"][1], np.ndarray)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(run / "last.pt", weights_only=True)
    run_in_process([*TINY, *RUNS["dino"], "--out", str(run), "--resume"])
    assert_bitwise_equal(checkpoint.load(runs["dino"] / "last.pt"),
                         checkpoint.load(run / "last.pt"))


def test_published_dino_moco_v3_and_timm_files_load_without_the_opt_in(tmp_path):
    """As the official code saves them: DINO's full checkpoint with its argparse.Namespace,
    optimizer, loss centre and fp16 scaler; MoCo-v3's with its scaler; DeiT's / timm's train
    checkpoint with its Namespace; a bare timm state dict."""
    torch.manual_seed(0)
    student, teacher = vit.build_vit("cpu"), vit.build_vit("cpu")
    sd, td = student.state_dict(), teacher.state_dict()
    optimizer = torch.optim.AdamW(student.parameters())
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scaler = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                  _growth_tracker=0)
    dino_args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536,
                                   norm_last_layer=False, use_fp16=True, lr=0.0005,
                                   global_crops_scale=(0.4, 1.0), local_crops_number=10,
                                   data_path="/path/to/imagenet/train", dist_url="env://", gpu=0)
    layouts = {
        "dino": ({"student": {f"module.backbone.{k}": v for k, v in sd.items()},
                  "teacher": {f"backbone.{k}": v for k, v in td.items()},
                  "optimizer": optimizer.state_dict(), "epoch": 100, "args": dino_args,
                  "dino_loss": {"center": torch.zeros(1, 65536)}, "fp16_scaler": scaler}, teacher),
        "moco": ({"epoch": 300, "arch": "vit_small", "optimizer": optimizer.state_dict(),
                  "scaler": scaler,
                  "state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                                 **{f"module.momentum_encoder.{k}": v for k, v in td.items()}}},
                 student),
        "timm-train": ({"epoch": 299, "arch": "vit_small_patch16_224", "version": 2,
                        "state_dict": sd, "optimizer": optimizer.state_dict(),
                        "args": argparse.Namespace(model="vit_small_patch16_224", lr=5e-4,
                                                   smoothing=0.1, mixup=0.8), "metric": 79.8},
                       student),
        "timm": (sd, student),
    }
    x = torch.randn(2, 3, 32, 32)
    for name, (ckpt, expected) in layouts.items():
        torch.save(ckpt, tmp_path / f"{name}.pth")
        loaded, _ = checkpoint.load_backbone(str(tmp_path / f"{name}.pth"), model="cpu")
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), expected.eval()(x)), name
    assert checkpoint.load(tmp_path / "dino.pth")["args"] == dino_args


def test_the_allow_list_is_narrow(tmp_path):
    """Plain-looking values outside it are refused too, each named: a pathlib path among the
    arguments, a numpy scalar (not an array), a class of the file's own."""
    for value, named in ((pathlib.Path("/data"), "pathlib.PosixPath"),
                         (np.float64(0.5), "numpy._core.multiarray.scalar"),
                         (Payload("x"), f"{os.mkdir.__module__}.mkdir")):
        torch.save({"w": torch.ones(2), "args": {"data_root": value}}, tmp_path / "f.pt")
        with pytest.raises(checkpoint.UntrustedCheckpoint, match=named.replace(".", r"\.")):
            checkpoint.load(tmp_path / "f.pt")


# ============================================================ a payload, refused everywhere
@pytest.fixture
def evil(runs, tmp_path):
    """(a DINO run folder whose last.pt is its ckpt_50.pt with a payload, the marker path)."""
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    run.mkdir()
    with_payload(runs["dino"] / "ckpt_50.pt", run / "last.pt", marker)
    return run, marker


def test_eval_and_probe_refuse_a_payload_and_load_it_only_with_the_opt_in(evil, capsys):
    run, marker = evil
    path = run / "last.pt"
    for main, argv in ((ev.main, [str(path), "--knn", "--limit", "32"]),
                       (probe.main, ["--ckpt", str(path)])):
        with pytest.raises(SystemExit) as refused:                # before any data or model
            main(argv)
        assert refused.value.code not in (0, None)                # a message: exit status 1
        assert_refused(str(refused.value.code), path, marker)
    results = ev.main([str(path), "--knn", "--limit", "32", "--device", "cpu",
                       "--trust-checkpoint"])
    assert os.path.isdir(marker) and 0 <= results["knn"]["top1"] <= 100
    os.rmdir(marker)
    result = probe.main(["--ckpt", str(path), "--trust-checkpoint", "--grid", "drop=0",
                         "--batches", "2", "--ref-batches", "2", "--batch-size", "4"])
    assert os.path.isdir(marker) and [r["strategy"] for r in result["rows"]] == ["none"]


def test_the_backbone_loader_refuses_a_payload_in_any_layout(evil, tmp_path):
    run, marker = evil
    torch.save({"student": {}, "teacher": {}, "args": Payload(marker)}, tmp_path / "dino.pth")
    for path in (run / "last.pt", tmp_path / "dino.pth"):
        with pytest.raises(checkpoint.UntrustedCheckpoint) as refused:
            checkpoint.load_backbone(str(path), model="cpu")
        assert_refused(str(refused.value), path, marker)
    backbone, info = checkpoint.load_backbone(str(run / "last.pt"), trust=True)
    assert os.path.isdir(marker) and info["args"]["method"] == "dino"


def test_a_resume_refuses_a_payload_touching_nothing_and_with_the_opt_in_ends_bitwise(
        runs, evil):
    """last.pt holds a payload (someone wrote into the run folder): the resume stops — not a
    fall-back to an older file, not a .bad rename — and changes nothing. With the opt-in it
    resumes from that checkpoint (half-way through the budget) to the same weights, bitwise,
    as the run that was never interrupted."""
    run, marker = evil
    args = [*TINY, *RUNS["dino"], "--out", str(run), "--resume"]
    shutil.copy(runs["dino"] / "ckpt_25.pt", run / "last-1.pt")      # an older, clean one
    before = digests(run)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert_refused(proc.stdout + proc.stderr, run / "last.pt", marker)
    assert digests(run) == before
    os.remove(run / "last-1.pt")
    run_in_process([*args, "--trust-checkpoint"])
    assert os.path.isdir(marker)
    assert_bitwise_equal(checkpoint.load(runs["dino"] / "last.pt"),
                         checkpoint.load(run / "last.pt"))
