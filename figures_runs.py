"""figures.py's runs: train.py and eval.py started as processes, and their records read back.

**Runs.** Every train.py run lives in ``figs/<dataset>/runs/<method>/<name>_<budget>_s<seed>/``
(train.py's outputs, ``eval.json`` from eval.py, ``DONE.json`` with its command line). A figure
asks for runs by name, budget and seed; a finished run with the same command line is reused,
whichever figure made it, so figures share their baselines and a figure can be completed
over several sittings (``--fresh`` re-runs). A run's record — everything but its checkpoints
(``*.pt``, ignored by git) — is committed: a fresh clone reuses a finished, evaluated run from
it; only an evaluation redone or the offline probes need the checkpoints again. Each figure
writes ``figs/<dataset>/<figure>_<method>/`` (views: ``views/``, ``views_n<N>/``; compare,
views and auto at a budget other than the default add it: ``views_n4500_250k/``):
``results.json``, ``table.md`` (the table it prints) and PNGs when matplotlib is installed.
"""
import json
import os
import shlex
import shutil
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
    return run_dir(args, method, name, budget, seed), argv


def start_train(out, argv, threads, fresh):
    """train.py into ``out``; None if it finished before with the same command line. A run
    that was stopped (its last.pt and args.json there, no DONE.json) resumes where it was,
    as train.py --resume continues any run (it refuses other settings)."""
    argv = [*argv, "--out", out]
    done, last = os.path.join(out, "DONE.json"), os.path.join(out, "last.pt")
    if not fresh and os.path.isfile(done):
        with open(done) as f:
            if json.load(f)["argv"] == argv:
                return None
    resume = not fresh and not os.path.isfile(done) and os.path.isfile(last)
    if not resume:
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(os.path.join(out, "stdout.txt"), "a" if resume else "w") as log:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv,
                                 *(["--resume"] if resume else [])],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_all(runs, args):
    """runs: [(folder, train.py flags)]; at most --jobs at once, each on --threads threads."""
    jobs, threads, fresh = args.jobs, args.threads, args.fresh
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < jobs:
            out, argv = pending.pop(0)
            p = start_train(out, argv, threads, fresh)
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
                json.dump(dict(argv=[*argv, "--out", out], seconds=time.time() - t0), f)
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
                         "delete its DONE.json to re-run that run alone")
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
    results = {}
    for o in outs:
        with open(os.path.join(o, "eval.json")) as f:
            e = json.load(f)
        results[o] = (e["knn"]["top1"], e["linear"]["top1"])
    return results


def read_run(out):
    """k-NN curve (units, train seconds, accuracy), steps, images and strategies of a run."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    curve = [(r.get("units", 0.0), r.get("train_wall", 0.0), r["knn"]) for r in records if "knn" in r]
    steps = [r for r in records if "loss" in r]
    probes = [r for r in records if "auto" in r]
    return dict(curve=curve, budget=args["budget"], steps=steps[-1]["step"] if steps else 0,
                images=(steps[-1]["step"] * args["batch_size"]) if steps else 0,
                strategies=[r["strategy"] for i, r in enumerate(steps)        # stage by stage
                            if i == 0 or r["strategy"] != steps[i - 1]["strategy"]],
                probe_units=sum(r["probe_units"] for r in probes),
                probe_seconds=sum(r.get("probe_seconds", 0.0) for r in probes))
