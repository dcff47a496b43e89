"""figures.py: the speed-up factor is read off the k-NN curves as its docstring defines it."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import figures  # noqa: E402


def test_first_reach_interpolates_linearly_between_evaluations():
    curve = [(0, 10.0), (100, 20.0), (200, 30.0)]
    assert figures.first_reach(curve, 25.0) == pytest.approx(150)
    assert figures.first_reach(curve, 20.0) == pytest.approx(100)
    assert figures.first_reach(curve, 5.0) == 0                 # already there at the start
    assert figures.first_reach(curve, 31.0) is None             # never reached
    # the FIRST crossing counts, even if the curve dips below again later
    assert figures.first_reach([(0, 10.0), (10, 40.0), (20, 20.0), (30, 40.0)], 30.0) == \
        pytest.approx(10 * 20 / 30)


def test_speed_up_is_the_baseline_budget_over_the_budget_where_the_run_reaches_its_accuracy():
    # (units, training seconds, k-NN): the baseline ends at 30 % after 1000 units / 100 s
    base = dict(curve=[(0, 0, 10.0), (500, 50, 20.0), (1000, 100, 30.0)])
    fast = dict(curve=[(0, 0, 10.0), (250, 40, 30.0), (1000, 160, 40.0)])
    units, wall = figures.speedups(base, fast)
    assert units == pytest.approx(4.0)             # 1000 / 250: four times fewer units
    assert wall == pytest.approx(2.5)              # 100 / 40 s: slower per unit on the clock
    slow = dict(curve=[(0, 0, 10.0), (1000, 100, 25.0)])
    assert figures.speedups(base, slow) == (None, None)        # never reaches 30 %


def test_read_run_takes_the_curve_steps_and_probe_cost_from_the_log(tmp_path):
    log = [dict(step=0, progress=0.0, knn=12.0, units=0.0, train_wall=0.0),
           dict(auto="q:drop=0.5", probe_units=300.0, step=0),
           dict(step=1, loss=5.0, strategy="q:drop=0.5", units=400.0),
           dict(step=2, loss=4.0, strategy="none", units=800.0),
           dict(step=2, progress=1.0, knn=20.0, units=800.0, train_wall=3.5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "args.json").write_text(json.dumps(dict(budget=800.0, batch_size=16)))
    r = figures.read_run(str(tmp_path))
    assert r["curve"] == [(0.0, 0.0, 12.0), (800.0, 3.5, 20.0)]
    assert (r["steps"], r["images"], r["probe_units"]) == (2, 32, 300.0)
    assert r["strategies"] == ["q:drop=0.5", "none"]


def test_cost_figure_writes_its_table_and_results(tmp_path):
    figures.main(["cost", "--model", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "cost" / "results.json").read_text())
    base = [r for r in results if r["drop"] == 0 and r["patch"] == 4]
    assert base[0]["flops"] == pytest.approx(1.0) and base[0]["measured"] == pytest.approx(1.0)
    # more dropout never costs more in the FLOP model
    row = [r["flops"] for r in results if r["patch"] == 4]
    assert row == sorted(row, reverse=True)
    assert "patch \\ drop" in (tmp_path / "cost" / "table.md").read_text()
