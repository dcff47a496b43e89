"""Faults of a shared cluster: a full or failing disk, a damaged last.pt, two runs into one
folder, image files that vanish mid-run. (Preemption: test_resume.py for one process,
test_distributed.py for torchrun, where the dead and hung ranks are tested too.)

Each test runs train.main in this process on 16-px images (a run takes a second or two) and
checks what it printed, its exit status and what it left on disk.
"""
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import cluster  # noqa: E402
import train  # noqa: E402
from test_bad_input import digest  # noqa: E402
from test_resume import assert_bitwise_equal, load  # noqa: E402

TINY = ["--method", "moco", "--model", "cpu", "--img-size", "16", "--data-size", "128",
        "--batch-size", "16", "--eval-every", "0", "--log-every", "0", "--ckpt-at", "0",
        "--save-every-steps", "1", "--deterministic"]          # last.pt after every step

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ====================================================================== a failing disk
@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EIO, "Input/output error"),
                                        (errno.EACCES, "Permission denied")])
def test_a_save_that_fails_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch,
                                                                       code, text):
    path = str(tmp_path / "last.pt")
    checkpoint.save_checkpoint({"step": 1}, path, keep=2)

    def fails_halfway(obj, f):
        f.write(b"PK\x03\x04" + bytes(1000))     # what the disk took before it failed
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(torch, "save", fails_halfway)
    with pytest.raises(checkpoint.SaveError) as e:
        checkpoint.save_checkpoint({"step": 2}, path, keep=2)
    monkeypatch.undo()
    assert f"cannot write {path}: {text} (" in str(e.value) and "GiB free on its disk" in \
        str(e.value) and "the previous file there is intact" in str(e.value)
    assert checkpoint.load_checked(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]            # no partial file, nothing rotated


# ============================================================= rank 0's background writer
def test_the_background_writer_saves_the_state_at_submit_while_the_caller_goes_on(tmp_path,
                                                                                  monkeypatch):
    """submit returns while torch.save is still blocked (the write is in the thread); the
    caller changes the weights in place meanwhile; the file holds the weights as submitted,
    with a valid checksum, and wait() names what was written. A failed write comes back from
    wait() with its tag, the previous file intact."""
    real_save, release = torch.save, threading.Event()

    def slow_disk(obj, f):
        assert release.wait(timeout=30), "the write never went on"
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", slow_disk)
    path, w = str(tmp_path / "last.pt"), torch.zeros(3)
    writer = checkpoint.BackgroundWriter()
    writer.submit({"w": w, "step": 7}, [path], [2], tag=(path, 7))
    w.add_(1.0)                                  # the next step, while the disk is busy
    assert not os.path.exists(path)              # submit did not wait for the disk
    release.set()
    assert writer.wait() == ((path, 7), None)
    assert torch.equal(checkpoint.load_checked(path)["w"], torch.zeros(3))

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    writer.submit({"w": w, "step": 8}, [path], [2], tag=(path, 8))
    tag, error = writer.wait()
    assert tag == (path, 8) and isinstance(error, checkpoint.SaveError), error
    assert checkpoint.load_checked(path)["step"] == 7
    assert writer.wait() == (None, None)         # nothing in flight


def test_training_goes_on_while_rank_0_writes_a_checkpoint(tmp_path, run_main):
    """Each write (but the final one, which the run waits for) blocks until the training
    has taken its next step: a save that held up the step loop would never see that step
    (a 30-s timeout says so). The run still ends bitwise equal to one with no waiting."""
    real_save, real_step, stepped, waited = torch.save, train.train_step, threading.Event(), []

    def step(*a, **k):
        stepped.set()
        return real_step(*a, **k)

    def write_after_the_next_step(obj, f):
        if obj["state"]["spent"] < obj["args"]["budget"]:
            waited.append(stepped.wait(timeout=30))
            stepped.clear()
        real_save(obj, f)
    with pytest.MonkeyPatch.context() as mp:    # (not monkeypatch.undo: that also undoes
        mp.setattr(train, "train_step", step)   # run_main's OMP_NUM_THREADS=1, and run b
        mp.setattr(torch, "save", write_after_the_next_step)    # would take 2 threads)
        code, text, _ = run_main([*TINY, "--budget", "1k", "--out", str(tmp_path / "a")])
    assert code == 0 and len(waited) >= 3 and all(waited), (waited, text)
    code, text, _ = run_main([*TINY, "--budget", "1k", "--out", str(tmp_path / "b")])
    assert code == 0, text
    assert_bitwise_equal(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))


def test_a_run_that_crashes_during_a_write_finishes_it_before_releasing_its_folder(
        tmp_path, monkeypatch, run_main):
    """A step raises (a bug, an out-of-memory) while the previous save is still being
    written: the write completes before main returns, and so before the lock on --out is
    released that a restarted run would take; last.pt is then whole."""
    real_save, real_step, steps = torch.save, train.train_step, [0]

    def slow_save(obj, f):
        time.sleep(0.5)
        real_save(obj, f)

    def crash_at_step_3(*a, **k):
        steps[0] += 1
        if steps[0] == 3:
            raise RuntimeError("boom")
        return real_step(*a, **k)
    monkeypatch.setattr(torch, "save", slow_save)
    monkeypatch.setattr(train, "train_step", crash_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run_main([*TINY, "--budget", "1k", "--out", str(out)])
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]
    assert not list(out.glob("*.tmp")) and not (out / "LOCK").exists()
    assert load(out / "last.pt")["state"]["step"] == 2


def test_a_run_whose_disk_fills_up_stops_with_the_last_good_checkpoint_and_resumes(
        tmp_path, run_main):
    """The save after step 3 hits ENOSPC (in the background writer): the run stops (exit 1)
    at the next save, naming the path, the error, the space left and the step whose save
    failed; last.pt is step 2's; no STOPPED (a full disk is not a diverged run), so --resume,
    once there is room, continues."""
    real_save, calls = torch.save, [0]

    def full_at_the_fourth_save(obj, f):       # ckpt_0.pt, then last.pt after steps 1, 2, 3
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", full_at_the_fourth_save)
        code, text, _ = run_main([*TINY, "--budget", "1k", "--out", str(out)])
    assert code == 1, text
    assert f"error: cannot write {out / 'last.pt'}: No space left on device (" in text, text
    assert "(the save after step 3); the run stopped after step 4: make room, then --resume " \
           f"(from {out / 'last.pt'} (step 2))" in text, text
    assert load(out / "last.pt")["state"]["step"] == 2
    assert sorted(os.listdir(out)) == ["args.json", "ckpt_0.pt", "last-1.pt", "last.pt",
                                       "log.jsonl"]
    code, text, _ = run_main([*TINY, "--budget", "1k", "--out", str(out), "--resume"])
    assert code == 0 and "resumed from" in text and "step 2," in text, text


# ================================================================= a damaged last.pt
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (last.pt of its final step N, last-1.pt of step N-1) and its argv."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = [*TINY, "--budget", "1k", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setenv("OMP_NUM_THREADS", "1")
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        train.main(argv)
        torch.set_num_threads(n)
    return out, argv


def _bit_rot(path):
    """One weight changed on disk, the file still a valid zip: only the checksum can tell."""
    ckpt = load(path)
    name = next(iter(ckpt["method"]))
    ckpt["method"][name].view(-1)[0] += 1e-3
    torch.save(ckpt, path)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, says", [(_bit_rot, "its content does not match its checksum"),
                                          (_truncate, "unreadable")])
def test_a_damaged_last_pt_falls_back_to_the_previous_one_and_ends_the_same(
        finished, tmp_path, run_main, damage, says):
    src, argv = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    final = load(run / "last.pt")
    damage(run / "last.pt")
    code, text, _ = run_main([*argv[:-1], str(run), "--resume"])
    assert code == 0, text
    step = final["state"]["step"]
    assert f"warning: cannot resume from {run / 'last.pt'}: {says}" in text, text
    assert f"trying {run / 'last-1.pt'}" in text
    assert f"resumed from {run / 'last-1.pt'}: step {step - 1}," in text, text
    assert_bitwise_equal(final, load(run / "last.pt"))       # the lost step, replayed
    assert (run / "last.pt.bad").exists()      # set aside: no rotation can keep it instead
    assert load(run / "last-1.pt")["state"]["step"] == step - 1


def test_a_run_with_no_readable_checkpoint_stops_instead_of_starting_afresh(
        finished, tmp_path, run_main):
    src, argv = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for name in ("last.pt", "last-1.pt", "ckpt_0.pt"):
        _truncate(run / name)
    before = {n: digest(run / n) for n in os.listdir(run)}
    code, text, _ = run_main([*argv[:-1], str(run), "--resume"])
    assert code != 0 and "error: no readable checkpoint to resume from:" in text, text
    assert all(str(run / n) in text for n in ("last.pt", "last-1.pt", "ckpt_0.pt"))
    assert before == {n: digest(run / n) for n in os.listdir(run)}       # nothing touched


def test_keep_last_keeps_that_many_last_checkpoints(tmp_path, run_main):
    out = tmp_path / "run"
    code, text, _ = run_main([*TINY, "--budget", "1k", "--keep-last", "3", "--out", str(out)])
    assert code == 0, text
    steps = [load(out / n)["state"]["step"] for n in ("last.pt", "last-1.pt", "last-2.pt")]
    assert steps == [steps[0], steps[0] - 1, steps[0] - 2] and not (out / "last-3.pt").exists()


# ============================================================ two runs in one folder
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with cluster.RunLock(str(out)):                  # a live run (this process) holds it
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--budget",
                            "1k", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 1, p.stdout + p.stderr
        assert f"error: --out {out} is in use by another run (pid {os.getpid()} on " \
               f"{socket.gethostname()}, since " in p.stderr, p.stderr
        assert os.listdir(out) == ["LOCK"]           # nothing written beside the first run's
    assert not out.exists()                          # the lock's folder, gone with it


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, run_main):
    out = tmp_path / "run"
    out.mkdir()
    (out / "LOCK").write_text("pid 4242 on node17, since 2026-01-01T00:00:00\n")  # nobody holds it
    code, text, _ = run_main([*TINY, "--budget", "200", "--out", str(out)])
    assert code == 0, text
    assert "note: took over the lock of a run that ended without releasing it (pid 4242 on " \
           "node17" in text
    assert not (out / "LOCK").exists()               # released at the end


# ======================================================= files that vanish mid-run
def test_image_files_that_vanish_or_go_bad_mid_run_are_skipped_and_counted(
        tmp_path, monkeypatch, run_main):
    """After step 1, one file is deleted and one overwritten with garbage: later epochs skip
    both, as they skip a corrupt file, and the summary and last.pt count them."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (20, 20), colour).save(root / split / c / f"{i}.png")
    gone, bad = root / "train" / "red" / "2.png", root / "train" / "blue" / "4.png"
    step = train.train_step

    def step_then_lose_files(run, state, batch):
        if state.step == 1:
            gone.unlink()
            bad.write_bytes(b"not a png")
        return step(run, state, batch)
    monkeypatch.setattr(train, "train_step", step_then_lose_files)
    out = tmp_path / "run"
    code, text, warned = run_main(["--data", "folder", "--data-root", str(root), "--method",
                                   "simclr", "--model", "cpu", "--img-size", "16",
                                   "--batch-size", "4", "--budget", "400", "--eval-every", "0",
                                   "--log-every", "0", "--out", str(out)])
    assert code == 0, text
    assert any("2.png" in w and "FileNotFoundError" in w for w in warned), warned
    assert "warning: 2 unreadable training image(s) were skipped" in text, text
    skipped = load(out / "last.pt")["state"]["bad_files"]
    assert sorted(skipped) == sorted([str(gone), str(bad)])


def test_overwrite_removes_the_replaced_runs_checkpoints(tmp_path, run_main):
    """Else a later fallback (or the probe) could pick up a checkpoint of the run replaced."""
    out = tmp_path / "run"
    assert run_main([*TINY, "--budget", "1k", "--ckpt-at", "0,0.5", "--out", str(out)])[0] == 0
    assert (out / "ckpt_50.pt").exists()
    code, text, _ = run_main([*TINY, "--budget", "200", "--out", str(out), "--overwrite"])
    assert code == 0 and "--overwrite removed the replaced run's" in text, text
    assert not (out / "ckpt_50.pt").exists()
    assert {load(out / n)["args"]["budget"] for n in os.listdir(out) if n.endswith(".pt")} == {200}
