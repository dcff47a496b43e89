"""A run killed with SIGKILL and restarted with --resume ends with the weights of a run that
was never interrupted: bitwise, on CPU with --deterministic.

Each test starts train.py in a subprocess (through tests/gated.py, which holds it before a
chosen step until the test acts, so the kill lands at that step however busy the machine),
kills it (SIGKILL, no chance to clean up) there, and resumes it in another to the end of the
budget; meanwhile the same run goes through uninterrupted in the test's own process (on one
thread, as the subprocesses). Compared bit for bit: every parameter and buffer of the method (online weights, momentum
encoder / teacher, DINO's centre, BN statistics), the optimizer state, and the budget, step,
epoch position and schedule stage. The resumed part replays lost steps, crosses epochs (8
batches each) and, for MoCo, a stage switch of a schedule file; DINO uses token dropout and
local crops, so its RNG streams matter.
"""
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import cluster  # noqa: E402
import train  # noqa: E402

# 16-px images (16 tokens): a step costs a few tens of ms, so a whole test takes seconds.
TINY = ["--model", "cpu", "--img-size", "16", "--data-size", "128", "--batch-size", "16",
        "--eval-every", "0", "--log-every", "0", "--deterministic",
        "--save-every", "1", "--save-every-steps", "2"]       # last.pt every 2 steps
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def start(args, gate=None):
    """train.py in a subprocess; with ``gate`` = (folder, step, mode), tests/gated.py instead,
    which holds the run before ``step`` (``last.pt`` then on disk) until the test acts."""
    script = [os.path.join(ROOT, "tests", "gated.py"), *map(str, gate)] if gate else \
        [os.path.join(ROOT, "train.py")]
    return subprocess.Popen([sys.executable, *script, *TINY, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=240):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def stop_at_gate(p, gate, sig, status):
    """Send ``sig`` to ``p`` once it waits at its gate (tests/gated.py: its steps before the
    gate are done and their last.pt written); → None if ``p`` then exits with ``status``,
    else its output. SIGKILL ends it there; a preemption signal opens the gate (mode
    "signal"), so the run takes the gated step and stops after it, however busy the machine."""
    while not os.path.exists(os.path.join(gate, "reached.0")):
        if p.poll() is not None:                     # it ended before the gate: say why
            return p.communicate()[0]
        time.sleep(0.01)
    os.kill(p.pid, sig)
    out = p.communicate(timeout=120)[0]
    return None if p.returncode == status else out


def run_in_process(argv):
    """train.main here, on one thread like the subprocesses (OMP_NUM_THREADS=1), so that the
    kernels sum in the same order; every global it sets is put back."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            train.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env


def load(path):
    return checkpoint.load(path)


def tensors(tree, prefix=""):
    """Every tensor of a nested dict / list, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(
        tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def assert_bitwise_equal(a, b):
    for part in ("method", "optimizer"):
        ta, tb = tensors(a[part]), tensors(b[part])
        assert ta.keys() == tb.keys(), part
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[:3]}"
    for key in ("step", "spent", "epoch", "batch_in_epoch", "stage", "images", "ckpts_done"):
        assert a["state"][key] == b["state"][key], key
    assert a["strategy"] == b["strategy"]


def kill_and_resume(tmp_path, args, gate_step, before_resume=None, sig=signal.SIGKILL,
                    status=-signal.SIGKILL):
    """Stop the run at its gate before step ``gate_step`` with ``sig``, then --resume it:
    (uninterrupted last.pt, resumed last.pt, last.pt as the stop left it, resume's output)."""
    run, gate, killed, resumed = tmp_path / "run", tmp_path / "gate", [], []
    mode = "wait" if sig == signal.SIGKILL else "signal"

    def kill_then_resume():                    # in a thread, beside the uninterrupted run
        try:
            p = start([*args, "--out", str(run)], gate=(gate, gate_step, mode))
            killed.append(stop_at_gate(p, gate, sig, status))
            killed.append(load(run / "last.pt"))                 # loadable after a SIGKILL
            if before_resume:
                before_resume(run)
            resumed.append(start([*args, "--out", str(run), "--resume"]))
        except Exception as e:                 # re-raised below, in the test's thread
            resumed.append(e)

    thread = threading.Thread(target=kill_then_resume)
    thread.start()
    run_in_process([*TINY, *args, "--out", str(tmp_path / "ref")])
    thread.join()
    if isinstance(resumed[0], Exception):
        raise resumed[0]
    assert killed[0] is None, killed[0]        # it was killed, not finished or failed
    out = finish(resumed[0])
    return load(tmp_path / "ref" / "last.pt"), load(run / "last.pt"), killed[1], out


# ================================================================== MoCo + a schedule
@pytest.fixture(scope="module")
def moco(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moco")
    sched = tmp / "schedule.json"
    sched.write_text(json.dumps({"stages": [{"start": 0.0, "strategy": "q:drop=0.75"},
                                            {"start": 0.5, "strategy": "none"}]}))
    args = ["--method", "moco", "--budget", "1.3k", "--accel", str(sched)]
    ref, run, killed, out = kill_and_resume(tmp, args, gate_step=4)
    return dict(tmp=tmp, args=args, ref=ref, run=run, killed=killed, out=out, sched=sched)


def test_moco_killed_mid_run_resumes_to_bitwise_the_same_weights(moco):
    # killed before step 4, its last.pt that of step 2 (saved every 2 steps); ends in epoch 2
    assert moco["killed"]["state"]["step"] == 2 and 8 < moco["ref"]["state"]["step"]
    assert "resumed from" in moco["out"]
    assert_bitwise_equal(moco["ref"], moco["run"])
    assert "momentum_encoder.backbone.cls_token" in moco["run"]["method"]


def test_a_resumed_run_follows_the_schedule_file_into_the_same_final_stage(moco):
    assert moco["killed"]["state"]["stage"] == 0                       # killed in stage 0,
    assert moco["run"]["state"]["stage"] == moco["ref"]["state"]["stage"] == 1   # ended in 1
    assert moco["run"]["strategy"] == "none"
    with open(moco["tmp"] / "run" / "log.jsonl") as f:                 # one line per step,
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == list(range(1, moco["ref"]["state"]["step"] + 1))  # none lost, none twice


@contextlib.contextmanager
def unchanged(*paths):
    before = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    yield
    assert before == [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def run_main(argv, capsys, monkeypatch):
    """train.main in this process: (exit status, everything it printed)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        try:
            train.main(argv)
        except SystemExit as e:
            code = e.code
    torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out + out.err + (code if isinstance(code, str) else "")


@pytest.mark.parametrize("change, named", [
    (["--lr", "0.002"], "lr: {lr!r} → 0.002"),           # {lr}: the method's default rate
    (["--budget", "3k"], "budget: 1300.0 → 3000.0"),
    (["--img-size", "32"], "img_size: 16 → 32"),
    (["--auto-tolerance", "1.5"], "auto_tolerance: 1.0 → 1.5"),   # what a probe would choose
])
def test_resume_with_changed_settings_is_refused_and_touches_nothing(moco, change, named,
                                                                     capsys, monkeypatch):
    named = named.format(lr=moco["ref"]["args"]["lr"])
    run = moco["tmp"] / "run"
    with unchanged(run / "last.pt", run / "log.jsonl"):
        code, out = run_main([*TINY, *moco["args"], "--out", str(run), "--resume", *change],
                             capsys, monkeypatch)
    assert code != 0 and named in out and str(run / "last.pt") in out, out


def test_resume_after_the_schedule_file_was_edited_is_refused(moco, capsys, monkeypatch, tmp_path):
    sched = tmp_path / "schedule.json"                # same path in the args, other content
    sched.write_text(moco["sched"].read_text().replace("q:drop=0.75", "q:drop=0.5"))
    run = moco["tmp"] / "run"
    args = [a if a != str(moco["sched"]) else str(sched) for a in moco["args"]]
    ckpt = load(run / "last.pt")
    ckpt.pop("checksum")
    ckpt["args"]["accel"] = str(sched)                # as if the file had been edited in place
    copy = tmp_path / "run"
    copy.mkdir()
    checkpoint.save_checkpoint(ckpt, str(copy / "last.pt"))
    (copy / "log.jsonl").write_text("")
    with unchanged(copy / "last.pt"):
        code, out = run_main([*TINY, *args, "--out", str(copy), "--resume"], capsys, monkeypatch)
    assert code != 0 and "stage schedule" in out and "q:drop=0.5" in out, out


# ============================================= DINO, and a kill in the middle of a save
def test_dino_killed_mid_run_resumes_bitwise_and_ignores_a_partial_save(tmp_path):
    """A kill during a save leaves last.pt.tmp cut short beside an intact last.pt: the resume
    reads last.pt, removes the partial file, and still ends bitwise equal."""
    def partial_save(run):
        (run / "last.pt.tmp").write_bytes((run / "last.pt").read_bytes()[:1000])

    args = ["--method", "dino", "--budget", "1.6k", "--accel", "q:drop=0.5", "--local-crops", "2"]
    ref, run, killed, out = kill_and_resume(tmp_path, args, gate_step=4,
                                            before_resume=partial_save)
    # killed before step 4: last.pt is step 3's, saved with ckpt_25 (step 3 ends at 29 %)
    assert killed["state"]["step"] == 3 and 8 < ref["state"]["step"]
    assert "removed last.pt.tmp" in out and not (tmp_path / "run" / "last.pt.tmp").exists()
    assert_bitwise_equal(ref, run)
    assert "teacher.head.last_layer.parametrizations.weight.original1" in run["method"]
    assert not torch.equal(run["method"]["center"], torch.zeros_like(run["method"]["center"]))


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save_atomic({"step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")         # what a kill mid-write leaves
        raise KeyboardInterrupt                  # stands in for the signal
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load(path) == {"step": 1}             # the previous checkpoint, intact
    assert os.path.exists(path + ".tmp")         # the partial one, which a resume removes


# ====================================================== preemption: SIGTERM, SIGUSR1
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_run_saves_its_step_exits_75_and_resumes_bitwise(tmp_path, sig):
    """SIGTERM (SLURM, Kubernetes) or SIGUSR1 (SLURM's --signal) before step 4, with no
    periodic save due: the run finishes its step (step 4), saves last.pt there, leaves
    OUT/PREEMPTED and exits 75; --resume continues from that very step to the weights of the
    uninterrupted run, and removes the marker."""
    args = ["--method", "dino", "--budget", "2.2k", "--accel", "q:drop=0.5", "--local-crops", "2",
            "--save-every-steps", "0", "--ckpt-at", "0"]           # no save but the preemption's
    marker = []
    ref, run, killed, out = kill_and_resume(tmp_path, args, gate_step=4, sig=sig,
                                            status=cluster.PREEMPTED, before_resume=lambda run:
                                            marker.append((run / "PREEMPTED").read_text()))
    step = killed["state"]["step"]
    assert step == 4 < ref["state"]["step"] // 2, step       # saved where it was stopped
    assert f"preempted by {sig.name} after step {step} " in marker[0], marker
    assert f"resumed from {tmp_path / 'run' / 'last.pt'}: step {step}," in out, out
    assert_bitwise_equal(ref, run)
    assert not (tmp_path / "run" / "PREEMPTED").exists()


# ============================================================== --accel auto
def test_an_auto_schedule_run_killed_after_a_probe_resumes_bitwise(tmp_path):
    """--accel auto probes at 0 % and 50 %: the kill comes after the first probe, the resume
    keeps its choice (from the checkpoint), replays the lost steps and probes again at 50 %
    exactly as the uninterrupted run did."""
    args = ["--method", "simclr", "--budget", "2.5k", "--accel", "auto", "--auto-at", "0,0.5",
            "--auto-batches", "2", "--auto-grid", "drop=0,0.75 patch=4,8"]
    ref, run, killed, out = kill_and_resume(tmp_path, args, gate_step=4)
    assert len(killed["state"]["auto"]) == 1 and len(ref["state"]["auto"]) == 2
    assert run["state"]["auto"] == [dict(a, seconds=b["seconds"]) for a, b in
                                    zip(ref["state"]["auto"], run["state"]["auto"])]
    assert_bitwise_equal(ref, run)
