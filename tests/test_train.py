"""train.py end to end: tiny runs of each method, budget accounting, and bad input."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import compress  # noqa: E402
import schedule  # noqa: E402
import vit  # noqa: E402
from schedule import StageSchedule  # noqa: E402

# A small, fast run: 128 embedded training images (32 for k-NN validation), batch 16.
TINY = ["--data-size", "128", "--batch-size", "16", "--log-every", "0", "--eval-every", "0",
        "--model", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture
def run(run_main):
    """train.py with these arguments, in this process (no interpreter and torch import per
    run): → (returncode, stdout, stderr) as a subprocess would give them. ``check`` raises on
    a non-zero status."""
    def call(args, check=True):
        code, text, _ = run_main(args)
        code = 0 if code is None else (1 if isinstance(code, str) else code)
        p = SimpleNamespace(returncode=code, stdout=text, stderr=text)
        if check and code != 0:
            raise AssertionError(f"train.py {' '.join(args)} failed:\n{text}")
        return p
    return call


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def units(cost, method, strategy):
    """The price of one sample under a logged strategy (2 views unless it says otherwise)."""
    return cost.sample_units(method, compress.Strategy.parse(strategy).resolve(2))


def run_cost(out):
    """The cost model the run in ``out`` was priced by: its backbone and its method's heads."""
    import methods
    ckpt = checkpoint.load(os.path.join(out, "last.pt"))
    backbone = vit.ViT(**ckpt["vit_config"])
    method = methods.build_method(ckpt["args"]["method"], backbone, **ckpt["method_kwargs"])
    return compress.CostModel(backbone, heads=method.cost_heads())


@pytest.mark.parametrize("method", ["simclr", "moco", "dino", "multiview"])
def test_each_method_trains_end_to_end(tmp_path, run, method):
    out = str(tmp_path / method)
    extra = ["--local-crops", "2"] if method == "dino" else []
    p = run(["--method", method, "--budget", "800", "--out", out, "--accel", "q:drop=0.5", *TINY, *extra])
    assert "k-NN top-1" in p.stdout and "done:" in p.stdout
    for name in ("last.pt", "ckpt_0.pt", "ckpt_25.pt", "ckpt_50.pt", "ckpt_75.pt", "ckpt_100.pt", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    ckpt = checkpoint.load(os.path.join(out, "last.pt"))
    assert ckpt["state"]["spent"] >= 800
    steps = [r for r in read_log(out) if "loss" in r]
    assert all(map(torch.isfinite, torch.tensor([r["loss"] for r in steps])))
    assert len(steps) == ckpt["state"]["step"] and {r["strategy"] for r in steps} == {"q:drop=0.5"}
    # the saved backbone is in the interop layout and loads strictly into a fresh ViT
    model = vit.ViT(**ckpt["vit_config"])
    model.load_state_dict(vit.backbone_state_dict(ckpt))
    # it trained: the online weights move from checkpoint to checkpoint, and the target
    # (momentum encoder, teacher) follows them by EMA without being them
    saved = [checkpoint.load(os.path.join(out, f"ckpt_{p}.pt"))
             for p in (0, 50, 100)]
    online = [vit.backbone_state_dict(c) for c in saved]
    for a, b in zip(online, online[1:]):
        assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    if method in ("moco", "dino"):
        target = [vit.backbone_state_dict(c, branch="target") for c in saved]
        assert not torch.equal(target[0]["cls_token"], target[-1]["cls_token"])
        assert not torch.equal(target[-1]["cls_token"], online[-1]["cls_token"])


def test_budget_accounting_equals_the_cost_models_sum_over_steps(tmp_path, run):
    """Units spent = Σ_steps batch × sample_units(strategy in force), with a mid-run switch."""
    sched = tmp_path / "sched.json"
    StageSchedule([(0.0, compress.Strategy.parse("q:drop=0.75")),
                   (0.5, compress.Strategy.parse("qk:patch=8"))]).save(sched)
    out = str(tmp_path / "run")
    run(["--method", "moco", "--budget", "1.5k", "--out", out, "--accel", str(sched), *TINY])
    records = [r for r in read_log(out) if "loss" in r]
    cost = run_cost(out)
    spent, used = 0.0, set()
    for r in records:                        # --log-every 0 logs every step
        assert r["strategy"] == str(StageSchedule.load(sched).at(spent / 1500))
        used.add(r["strategy"])
        spent += 16 * units(cost, "moco", r["strategy"])
        assert r["units"] == pytest.approx(spent)
    assert used == {"q:drop=0.75", "q:patch=8;k:patch=8"}  # the schedule switched
    assert spent >= 1500 and spent - 16 * 8 < 1500          # stopped at the first step past it


@pytest.mark.parametrize("args, message", [
    (["--method", "byol"], "invalid choice: 'byol'"),
    (["--budget", "0"], "budget '0' must be a positive"),
    (["--budget", "lots"], "budget 'lots' is not a number"),
    (["--accel", "q:drop=2"], "drop=2 in strategy"),
    (["--accel", "missing.json"], "no such schedule file"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--data", "folder", "--data-root", "/nonexistent/imagenet100"], "/nonexistent/imagenet100"),
    (["--batch-size", "1"], "--batch-size 1"),
    (["--accel", "q:patch=64"], "patch 64 is larger than the 32-px image"),
])
def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path, run, args, message):
    out = tmp_path / "run"
    p = run(["--out", str(out), *TINY, *args], check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert not out.exists()


def test_the_command_line_exits_non_zero_with_the_message_on_stderr(tmp_path):
    """The in-process runs above, once as a real process: status and stream as a user sees
    them (usage errors exit 2: one argparse finds, one found once the data is looked for),
    and nothing written."""
    for args, status, message in ((["--method", "byol"], 2, "invalid choice: 'byol'"),
                                  (["--data", "folder", "--data-root", "/nonexistent/in100"], 2,
                                   "image folder root '/nonexistent/in100' does not exist")):
        out = tmp_path / "run"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out),
                            *TINY, *args], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == status and message in p.stderr and not out.exists(), p.stderr


def test_empty_class_folder_is_named(tmp_path, run):
    from torchvision.io import write_png
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        (tmp_path / "data" / split / "dog").mkdir(parents=True)
        write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "data" / split / "cat" / "a.png"))
    p = run(["--data", "folder", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
             *TINY], check=False)
    assert p.returncode != 0 and "dog" in p.stderr, p.stderr


def test_a_previous_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "last.pt").write_bytes(b"previous")
    p = run(["--out", str(out), *TINY, "--budget", "500"], check=False)
    assert p.returncode != 0 and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert (out / "last.pt").read_bytes() == b"previous"
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


def test_accel_auto_probes_at_its_points_and_charges_the_probes_to_the_budget(tmp_path, run):
    """--accel auto: a probe at 0 % and 50 %; each one's forward/backward passes are charged
    (batch × (K_ref·c_0 + K·Σ_s c_s)), and from each point on the training steps follow its
    argmin-CA-MSE choice."""
    out = str(tmp_path / "auto")
    run(["--method", "simclr", "--budget", "3k", "--out", out, "--accel", "auto", "--auto-at",
         "0,0.5", "--auto-batches", "2", "--auto-grid", "drop=0,0.75 patch=4,8", *TINY])
    cost = run_cost(out)
    grid = ["none", "q:drop=0.75", "q:patch=8;k:patch=8", "q:drop=0.75,patch=8;k:patch=8"]
    probe_units = 16 * 2 * (cost.sample_units("simclr", compress.NONE.resolve(2)) + sum(
        cost.sample_units("simclr", compress.Strategy.parse(s).resolve(2)) for s in grid))
    spent, chosen, seen = 0.0, [], []
    for r in read_log(out):
        if "auto" in r:                          # a probe: logged with what it cost
            assert r["probe_units"] == pytest.approx(probe_units)
            assert sorted(row["strategy"] for row in r["rows"]) == sorted(grid)
            assert r["auto"] == min(r["rows"], key=lambda row: row["ca_mse"])["strategy"]
            spent += r["probe_units"]
            chosen.append((len(seen), r["auto"]))
        elif "loss" in r:
            assert r["strategy"] == chosen[-1][1]   # the latest probe's choice is in force
            seen.append(r["strategy"])
            spent += 16 * units(cost, "simclr", r["strategy"])
            assert r["units"] == pytest.approx(spent)
    assert [c[0] for c in chosen][0] == 0 and len(chosen) == 2 and chosen[1][0] > 0
    ckpt = checkpoint.load(os.path.join(out, "last.pt"))
    assert [a["start"] for a in ckpt["state"]["auto"]] == [0.0, 0.5]
    assert ckpt["state"]["spent"] == pytest.approx(spent) and spent >= 3000
    assert os.path.isfile(os.path.join(out, "probe_0.json"))
    assert os.path.isfile(os.path.join(out, "probe_50.json"))


def test_an_auto_tolerance_takes_the_cheapest_strategy_near_the_least_ca_mse(tmp_path, run,
                                                                            monkeypatch):
    """--auto-tolerance τ reaches the probe's choice (schedule.best_strategy: the cheapest
    strategy with CA-MSE ≤ τ·least, tested there); a huge τ makes every strategy near enough,
    so the cheapest of the grid is chosen and trained with."""
    import train
    seen = []
    monkeypatch.setattr(train, "best_strategy",
                        lambda result, tolerance: seen.append(tolerance) or
                        schedule.best_strategy(result, tolerance))
    out = str(tmp_path / "tolerant")
    run(["--method", "simclr", "--budget", "1.5k", "--out", out, "--accel", "auto", "--auto-at",
         "0", "--auto-batches", "2", "--auto-grid", "drop=0,0.75 patch=4,8",
         "--auto-tolerance", "1e9", *TINY])
    probes = [r for r in read_log(out) if "auto" in r]
    cheapest = min(probes[0]["rows"], key=lambda row: row["units"])["strategy"]
    assert seen == [1e9]
    assert [r["auto"] for r in probes] == [cheapest] == ["q:drop=0.75,patch=8;k:patch=8"]
    assert {r["strategy"] for r in read_log(out) if "loss" in r} == {cheapest}


def test_every_view_is_charged_and_a_stage_may_change_the_number_of_views(tmp_path, run):
    """--views 2 with a schedule whose second stage uses 4 views: batches carry 4 views, the
    first stage uses 2 of them, and each step pays for the views it used."""
    sched = tmp_path / "sched.json"
    StageSchedule([(0.0, compress.Strategy.parse("none")),
                   (0.5, compress.Strategy.parse("qk:drop=0.5;views=4"))]).save(sched)
    out = str(tmp_path / "run")
    run(["--method", "simclr", "--views", "2", "--budget", "2k", "--out", out, "--accel",
         str(sched), *TINY])
    cost = run_cost(out)
    spent, used = 0.0, set()
    for r in read_log(out):
        if "loss" in r:
            used.add(r["strategy"])
            spent += 16 * units(cost, "simclr", r["strategy"])
            assert r["units"] == pytest.approx(spent)
    assert used == {"views=2", "q:drop=0.5;k:drop=0.5;views=4"}
    # 4 views at drop 0.5 cost about what 2 full views cost (every view carries gradient)
    cost = compress.CostModel(vit.build_vit("cpu"))           # the backbone alone
    assert cost.sample_units("simclr", compress.Strategy.parse("views=4")) == pytest.approx(12)
    assert cost.sample_units("simclr", compress.NONE.resolve(2)) == pytest.approx(6)


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")   # torchvision's encoders
def test_training_reads_a_decode_once_cache_and_names_a_missing_one(tmp_path, run):
    """--data-cache: without the cache, train.py stops before writing anything and says the
    command that builds it; with it (built by that command), a tiny run trains end to end."""
    from torchvision.io import write_jpeg
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "imagenet"
    for split, n in (("train", 12), ("val", 4)):
        for c in ("cat", "dog"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):                   # JPEGs of various sizes, one of them grayscale
                img = torch.randint(0, 256, (1 if i == 0 else 3, 30 + 3 * i, 40 - 2 * i),
                                    dtype=torch.uint8, generator=g)
                write_jpeg(img, str(src / split / c / f"{i}.JPEG"))
    (src / "train" / "dog" / "bad.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["--data", "folder", "--data-root", str(src), "--data-cache", str(cache),
            "--img-size", "32", "--budget", "500", "--out", str(out), *TINY]
    p = run(args, check=False)
    assert p.returncode != 0 and not out.exists()
    assert str(cache / "train.npy") in p.stderr, p.stderr
    command = p.stderr[p.stderr.index("python imagecache.py"):].split("\n")[0]
    assert command == (f"python imagecache.py --data-root {src} --out {cache} "
                       "--size 37 --split train")                               # 32 / 0.875
    build = subprocess.run([sys.executable, "imagecache.py", *command.split()[2:-2], "--split",
                            "train,val", "--workers", "1"], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert build.returncode == 0, build.stderr
    assert "train: 24 images of 37²" in build.stdout and "1 unreadable file(s)" in build.stdout
    assert "val: 8 images of 37²" in build.stdout
    p = run(args)
    assert "k-NN top-1" in p.stdout and "8 val images" in p.stdout and "done:" in p.stdout, p.stdout
    assert os.path.isfile(out / "last.pt")


def test_a_knn_bank_is_the_same_images_for_a_run_pretrained_on_part_of_the_data():
    """--knn-bank draws from the whole training split, and the validation images are then the
    whole split's too: a --data-size run's curve is measured on the same images as a full
    run's (figures.py compares their curves)."""
    from options import get_args
    from run import build_run
    sets = {}
    for size in ([], ["--data-size", "300"]):
        args, _ = get_args(["--method", "simclr", "--knn-bank", "64", *size])
        run = build_run(args)
        sets[bool(size)] = run
    full, part = sets[False], sets[True]
    assert len(part.train_base) == 300 < len(full.train_base)
    assert part.knn_sets[0].index == full.knn_sets[0].index and len(part.knn_sets[0]) == 64
    assert len(part.knn_sets[1]) == len(full.knn_sets[1])                      # all val images
    for i in (0, 31, 63):
        (a, la), (b, lb) = full.knn_sets[0][i], part.knn_sets[0][i]
        assert torch.equal(a, b) and la == lb
