"""The mutation check: one-line bugs where the parts connect, each of which the suite must catch.

Each entry is a plausible slip (file, the exact line as it is, the line with the bug) and the
tests expected to fail on it. For each, the repository is copied to a temporary folder, the
one line replaced there (never here), the named tests run in the copy, and the bug reported
``caught`` (a test failed), ``MISSED`` (all passed: a test is missing) or ``stale`` (the line
is no longer in the file: update the entry). Exit status 1 if any was missed or stale.
Not collected by pytest (the name does not start with test_). Each entry runs its tests in a
fresh copy: 25–140 s each on two busy cores, about 10 minutes for the list.

    python tests/mutations.py                    # all of them
    python tests/mutations.py attention moco     # those whose name contains a word
    python tests/mutations.py probe --tests tests/test_probe.py   # what that file alone misses
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONNECTIONS = "tests/test_connections.py"

# (name, file, line as it is, line with the bug, tests expected to catch it)
MUTATIONS = [
    ("probe ignores the strategy's compression", "probe.py",
     "loss, _ = method(views[:strategy.views], strategy.q, strategy.k, progress)",
     "loss, _ = method(views[:strategy.views], progress=progress)", [CONNECTIONS]),
    ("probe's cost ratio inverted", "probe.py",
     "ref.variance, ref_batches, cs / c0)))",
     "ref.variance, ref_batches, c0 / cs)))", [CONNECTIONS]),
    ("set_rates no longer writes the optimiser's lr", "step.py",
     'group["lr"] = lr',
     'group.setdefault("lr", lr)', [CONNECTIONS]),
    ("attention splits q, k, v as (heads, 3)", "vit.py",
     "qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)",
     "qkv = self.qkv(x).reshape(B, L, self.heads, 3, D // self.heads).transpose(2, 3)",
     [CONNECTIONS]),
    ("MoCo-v3 without its predictor", "methods.py",
     "z_q = {i: self.predictor(self.projector(_enc(self.backbone, views[i], q)))",
     "z_q = {i: (self.projector(_enc(self.backbone, views[i], q)))", [CONNECTIONS]),
    ("DINO's local crops priced at the global patch", "compress.py",
     "local = ViewCompression(drop=strategy.q.drop)",
     "local = strategy.q", [CONNECTIONS]),
    ("no optimiser step in training", "step.py",
     "run.scaler.step(run.optimizer)                  # AdamW (fp16: skipped if gradients overflowed)",
     "pass", ["tests/test_train.py::test_each_method_trains_end_to_end"]),
    ("the target never moves (no EMA)", "step.py",
     "run.method.update_target(progress)",
     "pass", ["tests/test_train.py::test_each_method_trains_end_to_end"]),
]


def mutate(copy, file, old, new):
    """Replace the one line containing ``old`` by ``new`` (indentation kept); False if ``old``
    is not in the file exactly once."""
    path = os.path.join(copy, file)
    with open(path) as f:
        lines = f.read().split("\n")
    hits = [i for i, line in enumerate(lines) if old in line]
    if len(hits) != 1:
        return False
    i = hits[0]
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + lines[i].strip().replace(old, new) if new != "pass" else indent + "pass"
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return True


def check(name, file, old, new, tests):
    """('caught by <the first failing test>' | 'MISSED' | 'stale', seconds) for one mutation,
    in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "runs", "figs", ".benchmarks", "data"))
        if not mutate(copy, file, old, new):
            return "stale", 0.0
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", *tests], cwd=copy,
                           capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        seconds = time.time() - t0
    if p.returncode == 1:                   # tests ran and at least one failed
        failed = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("FAILED")]
        return f"caught by {failed[0] if failed else '?'}", seconds
    if p.returncode == 0:
        return "MISSED", seconds
    return f"error (pytest exit {p.returncode}): {p.stdout[-300:]}", seconds


def main(argv):
    """argv: words (a mutation is chosen if its name contains one, any case); ``--tests A,B``
    runs those tests instead of each entry's own (to see what the rest of the suite misses)."""
    override = None
    if "--tests" in argv:
        i = argv.index("--tests")
        override, argv = argv[i + 1].split(","), argv[:i] + argv[i + 2:]
    chosen = [m for m in MUTATIONS if not argv or any(w.lower() in m[0].lower() for w in argv)]
    bad = 0
    for name, file, old, new, tests in chosen:
        tests = override or tests
        outcome, seconds = check(name, file, old, new, tests)
        bad += not outcome.startswith("caught")
        print(f"{name} ({file}): {outcome}  [{seconds:.0f} s: {' '.join(tests)}]", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} one-line bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
