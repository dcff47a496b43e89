"""figures.py's runs: train.py and eval.py started as processes, and their records read back.

**Runs.** Every train.py run lives in ``figs/<dataset>/runs/<method>/<name>_<budget>_s<seed>/``
(train.py's outputs, ``eval.json`` from eval.py, ``DONE.json`` with its command line and the
commit of the code that ran it). A figure asks for runs by name, budget and seed; a finished
run with the same command line is reused, whichever figure made it, so figures share their
baselines and a figure can be completed over several sittings. **A folder holds one run,
for ever**: a run with another command line, or a re-run (``--fresh``), goes to the next
free ``<name>_<budget>_s<seed>_r2/``, ``_r3/`` …, so that a figure made before keeps the
record it counted. A run's record — everything but its checkpoints (``*.pt``, ignored by git)
— is committed: a fresh clone re-derives every figure from it (figures_tables.py); only an
evaluation redone or the offline probes need the checkpoints again. Each figure writes
``figs/<dataset>/<figure>_<method>/`` (views: ``views/``, ``views_n<N>/``; compare, views and
auto at a budget other than the default add it: ``views_n4500_250k/``): ``results.json`` (its
list of runs and what was read from them), ``table.md`` and PNGs when matplotlib is installed.
"""
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def run_dir(args, method, name, budget, seed):
    return os.path.join(args.out, args.dataset, "runs", method, f"{name}_{budget}_s{seed}")


def spec(args, method, name, budget, seed, *extra):
    """(folder, train.py flags) of one run: the dataset, budget and seed, then ``extra``."""
    argv = ["--method", method, "--budget", budget, "--seed", str(seed), "--log-every", "30",
            *args.data_flags, "--eval-every", "0.1", *extra, *shlex.split(args.train_args)]
    return free_dir(run_dir(args, method, name, budget, seed), argv, args.fresh), argv


def done_argv(out):
    """The command line of the finished run in ``out`` (its DONE.json), or None."""
    path = os.path.join(out, "DONE.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["argv"]


def free_dir(base, argv, fresh):
    """The folder of the run ``argv``: ``base`` or the first of ``base_r2``, ``base_r3`` …
    that is new (absent or empty), holds this run finished (reused) or stopped (resumed;
    train.py --resume refuses other settings). ``fresh``: the first new one. A folder that
    holds another run is never chosen."""
    for i in range(1, 1000):
        out = base if i == 1 else f"{base}_r{i}"
        if not os.path.isdir(out) or not os.listdir(out):
            return out
        finished = done_argv(out)
        if fresh:
            continue
        if finished == [*argv, "--out", out]:
            return out
        if finished is None and os.path.isfile(os.path.join(out, "last.pt")):
            return out
    raise SystemExit(f"error: no free run folder among {base}, {base}_r2 … {base}_r999")


def commit():
    """The code's git commit (and '+' if the working tree differs), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def start_train(out, argv, threads):
    """train.py into ``out`` (free_dir's choice); None if it finished before with the same
    command line. A run that was stopped (its last.pt there, no DONE.json) resumes where it
    was, as train.py --resume continues any run (it refuses other settings). A folder that
    holds another finished run, or anything but a stopped run, is refused: nothing in it is
    removed."""
    argv = [*argv, "--out", out]
    finished = done_argv(out)
    if finished == argv:
        return None
    resume = finished is None and os.path.isfile(os.path.join(out, "last.pt"))
    if finished is not None or (not resume and os.path.isdir(out) and os.listdir(out)):
        held = "finished: " + " ".join(finished) if finished else "no DONE.json, no last.pt"
        raise SystemExit(f"error: {out} holds another run ({held}); a run folder is never "
                         "reused: let figures.py choose the next free folder (_r2, _r3 …) or "
                         "move that one away")
    if not resume:
        os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(os.path.join(out, "stdout.txt"), "a" if resume else "w") as log:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv,
                                 *(["--resume"] if resume else [])],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_all(runs, args):
    """runs: [(folder, train.py flags)]; at most --jobs at once, each on --threads threads."""
    jobs, threads, code = args.jobs, args.threads, commit()
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < jobs:
            out, argv = pending.pop(0)
            p = start_train(out, argv, threads)
            if p is not None:
                print(f"  started {out}", flush=True)
                active[out] = (p, argv, time.time())
        for out, (p, argv, t0) in list(active.items()):
            if p.poll() is None:
                continue
            del active[out]
            if p.returncode != 0:
                with open(os.path.join(out, "stdout.txt")) as f:
                    tail = f.read()[-2000:]
                raise SystemExit(f"error: train.py {' '.join(argv)} failed "
                                 f"(exit {p.returncode}):\n{tail}")
            with open(os.path.join(out, "DONE.json"), "w") as f:
                json.dump(dict(argv=[*argv, "--out", out], seconds=time.time() - t0, commit=code,
                               jobs=jobs, threads=threads, cpus=os.cpu_count()), f)
            print(f"  finished {out} in {(time.time() - t0) / 60:.1f} min", flush=True)
        time.sleep(0.5)


def evaluate(outs, args):
    """eval.py --knn --linear on each run's last.pt → <run>/eval.json; {folder: (NN, LP)}.
    ``args.all_train`` (the views figure, whose runs pretrain on part of the training split):
    against the whole split (eval.py --all-train), an evaluation made without it redone."""
    jobs, threads = args.jobs, args.threads

    def done(o):
        path = os.path.join(o, "eval.json")
        if args.fresh or not os.path.isfile(path):
            return False
        with open(path) as f:
            return json.load(f).get("all_train", False) or not args.all_train
    todo = [o for o in outs if not done(o)]
    gone = [o for o in todo if not os.path.isfile(os.path.join(o, "last.pt"))]
    if gone:
        raise SystemExit(f"error: {', '.join(gone)} must be evaluated (again) but the run's "
                         "last.pt is not there (a committed record without its checkpoint): "
                         "re-run it with --fresh (into a new folder; the record stays)")
    while todo:
        batch, todo = todo[:jobs], todo[jobs:]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        ps = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"),
                                os.path.join(o, "last.pt"), "--knn", "--linear",
                                *(["--all-train"] if args.all_train else []),
                                "--out", os.path.join(o, "eval.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               cwd=ROOT, text=True) for o in batch]
        for o, p in zip(batch, ps):
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"error: eval.py on {o} failed:\n{err[-2000:]}")
    return {o: read_eval(o) for o in outs}


def read_eval(out):
    """(NN, LP) top-1 % of a run: its eval.json."""
    with open(os.path.join(out, "eval.json")) as f:
        e = json.load(f)
    return e["knn"]["top1"], e["linear"]["top1"]


def read_run(out):
    """k-NN curve (units, train seconds, accuracy), seed, steps, images, strategies and the
    probes' cost of a run: its log.jsonl and args.json."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    curve = [(r.get("units", 0.0), r.get("train_wall", 0.0), r["knn"]) for r in records
             if "knn" in r]
    steps = [r for r in records if "loss" in r]
    probes = [r for r in records if "auto" in r]
    return dict(curve=curve, budget=args["budget"], seed=args["seed"], method=args["method"],
                steps=steps[-1]["step"] if steps else 0,
                images=(steps[-1]["step"] * args["batch_size"]) if steps else 0,
                strategies=[r["strategy"] for i, r in enumerate(steps)        # stage by stage
                            if i == 0 or r["strategy"] != steps[i - 1]["strategy"]],
                probe_units=sum(r["probe_units"] for r in probes),
                probe_seconds=sum(r.get("probe_seconds", 0.0) for r in probes))
