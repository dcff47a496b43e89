"""Claims of bench.py: every section runs alone from the command line on a tiny configuration
and prints one table row per configuration it promises (methods × sizes × workers for the
loader, methods × {uncompressed, compressed} for the training step, presets for AdamW), with its
figures in the JSON file. Timings are not checked: only that they are there and positive."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest

import bench


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def run(argv, tmp_path, capsys):
    """bench.main(argv): (printed table lines, JSON results)."""
    out = tmp_path / "bench.json"
    bench.main([*argv, "--out", str(out)])
    return capsys.readouterr().out.splitlines(), json.loads(out.read_text())


def test_loader_section_compares_per_image_and_batched_for_each_method_and_worker_count(
        tmp_path, capsys):
    lines, results = run(["--section", "loader", "--loader-sizes", "16", "--workers", "0,1",
                          "--methods", "simclr,dino", "--batch-size", "4", "--steps", "1"],
                         tmp_path, capsys)
    rows = [line.split() for line in lines if re.match(r"\s+16 ", line)]
    assert [(r[1], r[3]) for r in rows] == [("simclr", "0"), ("simclr", "1"), ("dino+2", "0"),
                                           ("dino+2", "1"), ("dino+6", "0"), ("dino+6", "1")]
    assert all(r[-1].endswith("×") for r in rows)                   # the speed-up column
    assert all(r["per_image"] > 0 and r["batched"] > 0 and r["crop_flip"] > 0
               for r in results["loader"]["rows"])
    assert list(results) == ["torch", "device", "threads", "cpu", "gpu", "loader", "wall_s"]


def test_methods_section_times_each_method_uncompressed_and_compressed_beside_its_loader(
        tmp_path, capsys):
    lines, results = run(["--section", "methods", "--models", "cpu", "--batch-size", "4",
                          "--steps", "1", "--warmup", "0", "--peak-tflops", "1"],
                         tmp_path, capsys)
    rows = [line for line in lines if line.startswith("cpu ")]
    assert [(r.split()[1], r.split()[3]) for r in rows] == [
        (m, s) for m in ("simclr", "moco", "dino")
        for s in ("none", "q:drop=0.75,patch=8;k:patch=8")]    # twice the p=4 patch of cpu
    assert all(re.search(r"(model|loader)-bound / (model|loader)-bound", r) for r in rows)
    assert all("%" in r for r in rows)                             # MFU, asked for
    for r in results["methods"]["rows"]:
        assert r["images_per_s"] > 0 and r["loader_batched"] > 0 and 0 < r["mfu"]


def test_adamw_section_times_foreach_against_fused(tmp_path, capsys):
    lines, results = run(["--section", "adamw", "--adamw-models", "cpu", "--steps", "1",
                          "--warmup", "0"], tmp_path, capsys)
    [row] = [line for line in lines if line.startswith("cpu ")]
    assert row.split()[1] == f"{results['adamw']['rows'][0]['params']:,}"
    assert row.endswith("×") and results["adamw"]["rows"][0]["ms_fused"] > 0


def test_colour_section_times_the_colour_ops_before_and_after(tmp_path, capsys, monkeypatch):
    import bench_colour
    monkeypatch.setitem(bench_colour.COLOUR_SHAPES, "cpu", ((16, 8, 1),))     # tiny
    lines, results = run(["--section", "colour"], tmp_path, capsys)
    [row] = [line.split() for line in lines if re.match(r"\s+16 ", line)]
    [r] = results["colour"]
    assert row[:2] == ["16", "8"] and row[4].endswith("×") and r["levels"] <= 1
    before, after = r["passes"].values()
    assert 0 < after < before                         # fewer passes over the batch


def test_the_step_section_still_runs_alone_with_its_own_default_batch(tmp_path, capsys):
    lines, results = run(["--what", "step", "--model", "cpu", "--grid", "drop=0.5",
                          "--steps", "1", "--warmup", "0"], tmp_path, capsys)
    assert results["step"]["batch_size"] == 16
    assert [c["cell"] for c in results["step"]["cells"]] == ["baseline", "drop=0.5"]


@pytest.mark.parametrize("argv, named", [
    (["--section", "loaders"], "unknown section 'loaders'"),
    (["--workers", "0,two"], "--workers: 'two'"),
    (["--methods", "byol"], "--methods: 'byol' is not one of simclr, moco, dino"),
    (["--models", "huge"], "--models: 'huge'"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0 must be > 0"),
])
def test_bad_options_are_refused_naming_the_value(argv, named, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert named in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")   # torchvision's encoders
def test_loader_decode_compares_jpeg_files_with_their_decode_once_cache(tmp_path, capsys):
    lines, results = run(["--section", "loader", "--loader-sizes", "16", "--workers", "0",
                          "--methods", "dino", "--batch-size", "4", "--steps", "1",
                          "--loader-decode"], tmp_path, capsys)
    rows = [line.split() for line in lines if re.match(r"\s+16 simclr", line)]
    assert len(rows) == 1 and rows[0][-1].endswith("×")          # only the decode row is simclr
    (row,) = results["loader"]["decode"]
    assert row["jpeg"] > 0 and row["cache"] > 0 and row["workers"] == 0
