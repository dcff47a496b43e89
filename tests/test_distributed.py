"""Two processes equal one process on the whole batch, and a crashed worker costs nothing.

Launched with ``torchrun --nproc_per_node=2`` on CPU (gloo). One launch runs this file as a
worker script (``main`` below) that checks all four methods and writes what it measured to a
JSON file; the tests assert on that file:

* SimCLR (negatives gathered with gradient), MoCo-v3 (keys gathered without gradient), DINO
  (centre all-reduced) and the multi-view loss (standardisation and correlation matrix over the
  global batch, gathered with gradient): one step on 2 × 4 images gives the loss, every gradient and, after an
  SGD step and the momentum / teacher update, every parameter and buffer of one process on the
  8 concatenated images, to 1e-5. No token dropout here, so that both see identical inputs.
  The claim is checked in float64, where only the order of the sums differs (the gap is
  ~1e-14, ~1e-10 for DINO, whose local crops resize the position embedding in float32); in
  float32, as trained, the same reordering costs up to ~1e-5 of the largest gradient, which
  the tests bound at 1e-4 of it.
* Per-rank seeds: the ranks draw different token-dropout subsets, and take different images
  (so different augmentations), while the views of an image do not depend on the rank.

A second test runs train.py under ``torchrun --max-restarts=1`` with a worker that dies at a
given step (tests/gated.py, which also holds a group at a step for a preemption or a hung rank,
so that these tests act at that step however busy the machine): the group restarts from
last.pt and ends with the weights of an uninterrupted run.

Two more launches check what every rank must agree on: the gradient-error probe of two
processes, each on its share of one global batch, equals the probe of one process on the whole
batch; and under ``--cost measured`` every rank charges rank 0's timed prices, so all ranks
leave the training loop at the same step (a rank that left early would leave the others
waiting on its collectives, which the launch timeout turns into a failure).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402

METHODS = ("simclr", "moco", "dino", "multiview")
N, WORLD, IMG = 8, 2, 16                       # global batch, processes, image side


def torchrun(args, restarts=0, launcher=()):
    """Start ``torchrun --nproc_per_node=2`` (returns the Popen; ``finish`` collects it).

    --standalone: a c10d rendezvous on a free port. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives
    every restart a fresh store; with torchrun's shared one, a restarted worker can read the
    addresses of the workers it replaces and fail to connect (pytorch issue 135712)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", f"--max-restarts={restarts}", *launcher, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, timeout=240, status=0):
    """The launch's stdout (and stderr, if ``status`` is not 0); a failure if it exits with
    another status or outlives ``timeout`` (ranks waiting on each other's collectives never
    exit: SIGTERM makes torchrun stop its workers)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"torchrun still running after {timeout} s\n{out}{err}")
    assert p.returncode == status, out + err
    return out if status == 0 else out + err


# ============================================================== the worker (under torchrun)
def _fixed_views(method):
    """The same global batch on every rank: 2 global views (+ 2 local crops for DINO)."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(N, 3, IMG, IMG, generator=g) for _ in range(2)]
    if method == "dino":
        views += [torch.randn(N, 3, IMG // 2, IMG // 2, generator=g) for _ in range(2)]
    return views


def _build(method, dtype):
    import methods
    import vit
    torch.manual_seed(0)                         # identical weights in every process
    backbone = vit.ViT(img_size=IMG, patch_size=4, dim=32, depth=2, heads=2)
    return methods.build_method(method, backbone,
                               **methods.head_sizes(method, backbone.dim)).to(dtype)


def _one_step(method, views, dtype, wrap=None):
    """Loss, gradients and the state after an SGD step + target update, as train.py steps."""
    model = _build(method, dtype)
    views = [v.to(dtype) for v in views]
    net = wrap(model) if wrap else model
    loss, _ = net(views, progress=0.3)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.update_target(0.3)
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def main(out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import augment
    import data
    import distributed
    import embedded
    import vit
    from checkpoint import seed_all
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # One process on the whole batch, before the process group exists: the gathers are then
    # identities, exactly as in a single-process run of train.py.
    cases = [(m, dtype) for m in METHODS for dtype in (torch.float64, torch.float32)]
    reference = {c: _one_step(c[0], _fixed_views(c[0]), c[1]) for c in cases} if rank == 0 else None
    dist.init_process_group("gloo")
    result = {m: {} for m in METHODS}
    for m, dtype in cases:
        shard = [v.chunk(WORLD)[rank] for v in _fixed_views(m)]    # rank r: images 4r..4r+3
        loss, grads, state = _one_step(
            m, shard, dtype, lambda net: DistributedDataParallel(net, broadcast_buffers=False))
        loss = distributed.all_reduce_mean(loss)      # the 1-process loss is the mean over ranks
        if rank == 0:
            ref_loss, ref_grads, ref_state = reference[m, dtype]
            result[m][str(dtype)[6:]] = dict(
                loss_1p=ref_loss.item(), loss_2p=loss.item(),
                grads_1p=sorted(ref_grads), grads_2p=sorted(grads),
                grad_max_diff=max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
                grad_max_abs=max(g.abs().max().item() for g in ref_grads.values()),
                state_keys_equal=sorted(state) == sorted(ref_state),
                state_max_diff=max((state[k].float() - ref_state[k].float()).abs().max().item()
                                   for k in ref_state))

    # Per-rank token dropout: train.py seeds rank r with seed + r.
    seed_all(0, rank)
    x = torch.randn(4, 1 + 16, 8, generator=torch.Generator().manual_seed(2))
    kept = vit.token_dropout(x, 0.5)                                # (4, 1 + 8, 8)
    seed_all(0, rank)
    again = vit.token_dropout(x, 0.5)
    everyone = distributed.gather_no_grad(kept[None])                    # (2, 4, 9, 8)

    # Per-rank data: the sampler gives ranks disjoint images; a view depends on the image only.
    base = embedded.EmbeddedShapes("train", size=64, img_size=IMG)
    views = data.ViewDataset(base, augment.build_views("simclr", IMG), seed=0)
    sampler = data.ResumableSampler(len(views), N // WORLD, seed=0, rank=rank, world_size=WORLD)
    loader = data.build_loader(views, N // WORLD, sampler)
    sampler.set_epoch(0)
    (v1, _), _ = next(iter(loader))
    mine = torch.tensor(list(sampler)[: N // WORLD])
    indices = distributed.gather_no_grad(mine)                           # (8,) rank 0's, then rank 1's
    firsts = distributed.gather_no_grad(v1[:1])                          # each rank's first view
    other = int(indices[(rank + 1) % WORLD * (N // WORLD)])         # the other rank's image
    replays = distributed.gather_no_grad(views[other][0][0][None])       # its view, made here
    if rank == 0:
        result["dropout"] = dict(same_seed_same_subset=torch.equal(kept, again),
                                 ranks_differ=not torch.equal(everyone[0], everyone[1]))
        result["augment"] = dict(indices=indices.tolist(),
                                 global_batch=sorted(torch.randperm(
                                     64, generator=torch.Generator().manual_seed(0))[:N].tolist()),
                                 views_differ=not torch.equal(firsts[0], firsts[1]),
                                 rank_independent=torch.equal(replays[1], firsts[0])
                                 and torch.equal(replays[0], firsts[1]))
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


class Float64Views:
    """A view set whose views are float64, for a model in float64 (only the order of the sums
    then separates two processes from one)."""

    def __init__(self, views):
        self.views, self.recipes = views, views.recipes

    def __len__(self):
        return len(self.views)

    def set_epoch(self, epoch):
        self.views.set_epoch(epoch)

    def __getitem__(self, i):
        views, label = self.views[i]
        return [v.double() for v in views], label


PROBE_METHODS = ("simclr", "moco")


def probe_main(out_path):
    """probe.probe of each method: one process on the global batch of N, then two on N/2
    each, at the same seed and weights; patch scaling only (token dropout draws per rank)."""
    import torch.distributed as dist

    import augment
    import compress
    import data
    import embedded
    import methods
    import probe
    import vit
    from schedule import parse_grid
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    views = Float64Views(data.ViewDataset(embedded.EmbeddedShapes("train", size=64, img_size=IMG),
                                           augment.build_views("simclr", IMG), seed=0))

    def run(method, batch_size):
        torch.manual_seed(0)                     # identical weights in every process
        backbone = vit.ViT(img_size=IMG, patch_size=4, dim=32, depth=2, heads=2)
        model = methods.build_method(method, backbone,
                                    **methods.head_sizes(method, backbone.dim)).double()
        return probe.probe(model, views, parse_grid("patch=4,8", 4), method,
                           compress.CostModel(backbone), batches=3, ref_batches=3,
                           batch_size=batch_size, seed=5)

    one = {m: run(m, N) for m in PROBE_METHODS} if rank == 0 else None   # no process group yet
    dist.init_process_group("gloo")
    two = {m: run(m, N // WORLD) for m in PROBE_METHODS}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(one=one, two=two), f)
    dist.destroy_process_group()


def train_main(out_path, argv):
    """train.main(argv) on this rank; then this rank's steps and price table to out_path.RANK.
    Wrapped from outside: each cost model built is recorded, each optimiser step counted."""
    import compress
    import methods
    import train
    rank = int(os.environ["RANK"])
    models, steps = [], [0]
    build, update = compress.CostModel.__init__, methods.MoCoV3.update_target

    def recording_build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        models.append(self)

    def counting_update(self, progress):
        steps[0] += 1
        update(self, progress)

    compress.CostModel.__init__, methods.MoCoV3.update_target = recording_build, counting_update
    train.main(argv)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(dict(steps=steps[0], base=models[0].base,
                       prices=sorted([str(k), v] for k, v in models[0]._cache.items())), f)


# ====================================================================== the tests
@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "equivalence.json"
    finish(torchrun([os.path.abspath(__file__), str(out)]))
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process_on_the_concatenated_batch(measured, method):
    r = measured[method]["float64"]
    assert r["loss_2p"] == pytest.approx(r["loss_1p"], rel=1e-7, abs=1e-5)
    assert r["grads_2p"] == r["grads_1p"] and len(r["grads_1p"]) > 10   # every gradient ...
    assert r["grad_max_diff"] < 1e-5 and r["grad_max_abs"] > 1e-4       # ... equal, not all zero
    assert r["state_keys_equal"] and r["state_max_diff"] < 1e-5          # incl. EMA, centre, BN
    r = measured[method]["float32"]                                     # rounding only
    assert r["loss_2p"] == pytest.approx(r["loss_1p"], rel=1e-6, abs=1e-5)
    assert r["grad_max_diff"] < 1e-4 * r["grad_max_abs"]
    assert r["state_max_diff"] < 1e-4 * max(1.0, r["grad_max_abs"])


def test_ranks_draw_different_dropout_subsets_reproducibly(measured):
    assert measured["dropout"] == dict(same_seed_same_subset=True, ranks_differ=True)


def test_ranks_see_different_images_whose_views_do_not_depend_on_the_rank(measured):
    a = measured["augment"]
    assert len(set(a["indices"])) == N and sorted(a["indices"]) == a["global_batch"]
    assert a["views_differ"] and a["rank_independent"]


GATED = os.path.join(ROOT, "tests", "gated.py")      # train.py with a gate at one step


def wait_for_gate(group, gate, ranks=range(WORLD)):
    """Until every rank of ``ranks`` waits at its gate (tests/gated.py); a failure, with the
    group's output, if the group ends first."""
    while not all(os.path.exists(os.path.join(gate, f"reached.{r}")) for r in ranks):
        if group.poll() is not None:
            out, err = group.communicate()
            pytest.fail(f"the group ended before its gate\n{out}{err}")
        time.sleep(0.01)


def test_a_crashed_worker_restarts_from_the_last_checkpoint_and_changes_nothing(tmp_path):
    """torchrun --max-restarts=1 + --resume: rank 1 dies before step 6, when last.pt of step 4
    is on disk (tests/gated.py); the group restarts, resumes from step 4 and ends bitwise equal
    to a run that never crashed."""
    tiny = ["--method", "moco", "--model", "cpu", "--img-size", str(IMG), "--data-size", "128",
            "--batch-size", "16", "--budget", "1.1k", "--eval-every", "0", "--log-every", "0",
            "--save-every", "1", "--save-every-steps", "2", "--deterministic", "--resume"]
    ref = torchrun(["train.py", *tiny, "--out", str(tmp_path / "ref")])      # both at once
    run = torchrun([GATED, str(tmp_path / "gate"), "6", "die", *tiny,
                    "--out", str(tmp_path / "run")], restarts=1)
    finish(ref)
    out = finish(run)
    assert "resumed from" in out and "step 4," in out, out
    a, b = (checkpoint.load(tmp_path / d / "last.pt") for d in ("ref", "run"))
    assert a["state"]["step"] == b["state"]["step"] >= 8
    for part in ("method", "optimizer"):
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part


TINY = ["--method", "moco", "--model", "cpu", "--img-size", str(IMG), "--data-size", "128",
        "--batch-size", "16", "--eval-every", "0", "--log-every", "0", "--deterministic"]


def test_a_preempted_group_saves_one_step_exits_75_and_resumes_bitwise(tmp_path):
    """SIGTERM to torchrun while both workers wait before step 5 (tests/gated.py, mode
    "signal": each goes on once the signal reached it): torchrun forwards it to both workers,
    which take step 5, agree, save last.pt there and exit 75 (torchrun itself, signalled,
    exits 1: OUT/PREEMPTED tells a requeue script); a torchrun --resume ends bitwise equal to a
    group that was never stopped."""
    args = [*TINY, "--budget", "2k", "--save-every", "1", "--ckpt-at", "0"]
    gate = tmp_path / "gate"
    ref = torchrun(["train.py", *args, "--out", str(tmp_path / "ref")])
    run = torchrun([GATED, str(gate), "5", "signal", *args, "--out", str(tmp_path / "run")])
    wait_for_gate(run, gate)
    run.send_signal(signal.SIGTERM)
    out = finish(run, status=1)
    marker = (tmp_path / "run" / "PREEMPTED").read_text()
    step = checkpoint.load(tmp_path / "run" / "last.pt")["state"]["step"]
    assert step == 5 and "preempted by SIGTERM after step 5 " in marker, out
    resumed = finish(torchrun(["train.py", *args, "--out", str(tmp_path / "run"), "--resume"]))
    finish(ref)
    assert "step 5," in resumed
    a, b = (checkpoint.load(tmp_path / d / "last.pt") for d in ("ref", "run"))
    assert a["state"]["step"] == b["state"]["step"] > 2 * step
    for part in ("method", "optimizer"):
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part


def test_a_group_whose_rank_dies_or_hangs_ends_after_the_timeout_naming_it(tmp_path):
    """Rank 1 dies (os._exit) in one group and hangs (blocks outside any collective) in
    another, both before step 3 (tests/gated.py; the two groups run at once); rank 0 goes on
    into the step's collective. Dead: the connection closes, and rank 0 says it lost the
    others. Hung: rank 0 waits in the collective for --dist-timeout (0.2 min = 12 s here: at
    least that long after rank 1 stopped), names it, and exits 1; torchrun then ends the group
    (--shutdown-timeout 5: the hung rank takes SIGTERM as a preemption it never acts on, so
    torchrun's SIGKILL ends it). No upper bound on the time: a busy machine only lengthens it."""
    said = {}
    groups = {fault: torchrun([GATED, str(tmp_path / f"gate-{fault}"), "3", fault, *TINY,
                               "--budget", "5k", "--dist-timeout", "0.2",
                               "--out", str(tmp_path / fault)],
                              launcher=["--shutdown-timeout=5"]) for fault in ("die", "hang")}
    try:
        for line in groups["hang"].stderr:       # when rank 0 gives up, as it happens
            if "lost the other ranks" in line:
                said["hang"] = (time.time(), line)
                break
        out = {fault: finish(p, timeout=300, status=1) for fault, p in groups.items()}
    finally:                                    # a failed check leaves no group running
        for p in groups.values():
            if p.poll() is None:
                p.terminate()                   # torchrun stops its workers
                p.communicate(timeout=60)
    assert "error: rank 0 lost the other ranks after step 2 " in out["die"], out["die"]
    assert "hang" in said, out["hang"]
    when, line = said["hang"]
    assert "error: rank 0 lost the other ranks after step 2 (waited up to --dist-timeout " \
           "0.2 min" in line, line
    hung_at = os.path.getmtime(tmp_path / "gate-hang" / "reached.1")
    assert when - hung_at >= 0.2 * 60, when - hung_at


def test_a_stopped_group_destroys_its_process_group_and_only_rank_0_lists_out(tmp_path):
    """A NaN loss at step 3 stops both ranks at the next check (a save, every 2 steps): each
    exits 1 with its process group destroyed (NCCL warns of one left behind). Rank 1's view
    of --out is never asked for (here it would fail the run): rank 0 decides whether to
    resume, as on a shared filesystem whose listing can differ between nodes."""
    report = tmp_path / "rank"
    out = finish(torchrun([os.path.abspath(__file__), "--stop-at", "3", str(report), *TINY,
                           "--budget", "2k", "--save-every-steps", "2", "--out",
                           str(tmp_path / "run")]), status=1)
    assert "non-finite loss at step 3" in out and "listed --out" not in out, out
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(WORLD)]
    assert ranks == [{"status": 1, "group": False}] * WORLD, ranks


def stop_main(step, report, argv):
    """train.main(argv) whose loss turns NaN at step ``step``; each rank writes its exit
    status and whether its process group is still there to ``report``.<rank>. On rank 1,
    listing --out fails."""
    import torch.distributed as dist

    import methods
    import startup
    rank = int(os.environ["RANK"])
    forward, calls = methods.MoCoV3.forward, [0]

    def nan_at_step(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == step else loss), stats
    methods.MoCoV3.forward = nan_at_step
    if rank == 1:
        def listed(args):
            raise SystemExit("error: rank 1 listed --out")
        startup.check_out_dir = listed
    import train
    try:
        train.main(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    with open(f"{report}.{rank}", "w") as f:
        json.dump({"status": status, "group": dist.is_initialized()}, f)
    sys.exit(status)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "probe.json"
    finish(torchrun([os.path.abspath(__file__), "--probe", str(out)]))
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("method", PROBE_METHODS)
def test_two_processes_probe_the_gradient_of_one_process_on_the_concatenated_batch(probed,
                                                                                    method):
    """Each rank takes its slice of one global batch and the gradients are averaged over
    ranks: reference norm and variance, and every strategy's bias² and variance, are those
    of one process on all N images (float64: only the order of the sums differs)."""
    one, two = probed["one"][method], probed["two"][method]
    assert (one["world"], two["world"], two["batch_size"] * 2) == (1, 2, one["batch_size"])
    for key in ("ref_norm2", "ref_var", "ref_norm2_corrected"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert [r["strategy"] for r in two["rows"]] == [r["strategy"] for r in one["rows"]] == \
        ["none", "q:patch=8;k:patch=8"]
    for a, b in zip(one["rows"], two["rows"]):
        for key in ("bias2_raw", "bias2", "var", "ca_var", "ca_mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["strategy"], key)
    assert one["rows"][1]["bias2_raw"] != 0 and one["ref_var"] > 0    # not trivially equal


def test_under_measured_costs_every_rank_charges_rank_0s_prices_and_stops_at_the_same_step(
        tmp_path):
    """--cost measured: rank 0 times each setting (backbone and heads), every rank uses its
    numbers; the ranks price identically, take the same number of steps, and the run ends."""
    ranks = tmp_path / "rank"
    finish(torchrun([os.path.abspath(__file__), "--train", str(ranks), "--method", "moco",
                     "--model", "cpu", "--img-size", str(IMG), "--data-size", "128",
                     "--batch-size", "16", "--budget", "3k", "--accel", "q:drop=0.5",
                     "--cost", "measured", "--eval-every", "0", "--log-every", "0",
                     "--out", str(tmp_path / "run")]), timeout=300)
    a, b = (json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(WORLD))
    assert a["prices"] == b["prices"] and a["base"] == b["base"]
    assert len(a["prices"]) >= 4                    # backbone; online and target head; dropout
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert a["steps"] == b["steps"] == ckpt["state"]["step"] >= 5   # (timed prices: fewer
    #                                                    steps when the machine is busy)


def _knn_model_and_sets():
    """A random ViT (seed 0: the same on every rank) and k-NN sets of 101 and 37 images (odd:
    the shares of two ranks differ, so padding is exercised)."""
    import data
    import vit
    torch.manual_seed(0)
    backbone = vit.build_vit("cpu", img_size=IMG)
    sets = [data.EvalDataset(data.build_dataset("embedded", split=split, img_size=IMG, size=n), IMG)
            for split, n in (("train", 101), ("val", 37))]
    return backbone, sets


def knn_main(out_path):
    """protocols.knn_accuracy on this rank's shares; rank 0 writes the accuracy and the bank's
    features as every rank holds them after the gather."""
    import torch.distributed as dist

    import protocols
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    backbone, (bank, val) = _knn_model_and_sets()
    cpu = torch.device("cpu")
    acc = protocols.knn_accuracy(backbone, bank, val, cpu, batch_size=16, num_workers=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    feats, labels = protocols.extract_features(
        backbone, protocols.feature_loader(protocols.shard(bank, rank, world, pad=True), 16), cpu)
    feats, labels = protocols.unshard(feats, len(bank)), protocols.unshard(labels, len(bank))
    if rank == 0:
        torch.save(dict(acc=acc, feats=feats, labels=labels, share=len(
            protocols.shard(val, rank, world))), out_path)
    dist.destroy_process_group()


def test_knn_over_two_processes_equals_one_process(tmp_path):
    """Each rank extracts its share of the bank and of the validation set (one loader worker
    each); the gathered bank is one process's, row for row, and the accuracy the same."""
    import protocols
    out = tmp_path / "knn.pt"
    finish(torchrun([os.path.abspath(__file__), "--knn", str(out)]))
    two = checkpoint.load(out)
    backbone, (bank, val) = _knn_model_and_sets()
    cpu = torch.device("cpu")
    feats, labels = protocols.extract_features(backbone, protocols.feature_loader(bank, 16), cpu)
    assert two["share"] == 19                                      # 37 images: 19 + 18
    assert torch.equal(two["labels"], labels)
    torch.testing.assert_close(two["feats"], feats, atol=1e-5, rtol=0)
    assert two["acc"] == protocols.knn_accuracy(backbone, bank, val, cpu, batch_size=16)


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict / list, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(
        tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in _tensors(sub, f"{prefix}/{key}").items()}


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        probe_main(sys.argv[2])
    elif sys.argv[1] == "--train":
        train_main(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "--knn":
        knn_main(sys.argv[2])
    elif sys.argv[1] == "--stop-at":
        stop_main(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        main(sys.argv[1])
