"""schedule.py: learning rates, momenta and temperatures, stage schedules, grids and build."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402
import schedule  # noqa: E402
from plots import heatmap_panels, save_heatmaps  # noqa: E402
from schedule import (StageSchedule, best_strategy, build_schedule, learning_rate,  # noqa: E402
                      parse_grid)


def test_lr_warms_up_linearly_then_decays_to_zero_by_cosine_or_polynomial():
    assert learning_rate(0.0, 1.0, warmup=0.1) == 0.0
    assert learning_rate(0.05, 1.0, warmup=0.1) == pytest.approx(0.5)
    for kind in ("cosine", "poly"):
        assert learning_rate(0.1, 1.0, 0.1, kind) == pytest.approx(1.0)
        assert learning_rate(1.0, 1.0, 0.1, kind) == pytest.approx(0.0)
    s = 0.5                                   # progress 0.55 with warm-up 0.1 → s = 0.5
    assert learning_rate(0.55, 1.0, 0.1, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * s)))
    assert learning_rate(0.55, 1.0, 0.1, "poly") == pytest.approx(1 - s ** 2)
    # the polynomial schedule keeps the rate higher than cosine for longer (the paper's Fig. 6)
    for t in (0.2, 0.4, 0.6, 0.8, 0.95):
        assert learning_rate(t, 1.0, 0.1, "poly") > learning_rate(t, 1.0, 0.1, "cosine")


def test_stage_schedule_round_trips_through_json_and_switches_at_its_starts(tmp_path):
    sched = StageSchedule.parse("q:drop=0.9")
    assert sched.at(0.7) == compress.Strategy.parse("q:drop=0.9")
    sched = StageSchedule([(0.0, compress.Strategy.parse("q:drop=0.9")),
                           (0.5, compress.Strategy.parse("qk:patch=8"))])
    path = tmp_path / "s.json"
    sched.save(path)
    again = StageSchedule.load(str(path))
    assert again.stages == sched.stages
    assert [again.index(t) for t in (0.0, 0.49, 0.5, 0.99)] == [0, 0, 1, 1]


@pytest.mark.parametrize("obj, field", [
    ({"stage": []}, "'stages'"),
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"stages": [{"strategy": "none"}]}, "stages[0] has no 'start'"),
    ({"stages": [{"start": 0, "strategy": "q:drop=2"}]}, "stages[0].strategy"),
    ({"stages": [{"start": 1.5, "strategy": "none"}]}, "stages[0].start = 1.5"),
    ({"stages": [{"start": 0.2, "strategy": "none"}]}, "the first stage must start at 0"),
])
def test_a_malformed_schedule_names_the_field(tmp_path, obj, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError) as err:
        StageSchedule.load(str(path))
    assert field in str(err.value) and "bad.json" in str(err.value)


@pytest.mark.parametrize("grid, field", [
    ("drop=0,1.2", "drop: 1.2"), ("patch=0", "patch: 0"), ("roles=kq", "roles: 'kq'"),
    ("dorp=0.5", "dorp=0.5"), ("drop=a", "drop: 'a'"), ("patch", "'patch'"),
    ("views=1", "views: 1"), ("views=2.5", "views: '2.5'"), ("views=", "'views='"),
])
def test_a_malformed_grid_names_the_field(grid, field):
    with pytest.raises(ValueError) as err:
        parse_grid(grid, 4)
    assert field in str(err.value)


def test_grid_roles_follow_the_paper_dropout_on_the_query_patch_scaling_on_both():
    cells = parse_grid("drop=0,0.5 patch=4,8", 4)
    assert [str(s) for s in cells] == ["none", "q:patch=8;k:patch=8", "q:drop=0.5",
                                       "q:drop=0.5,patch=8;k:patch=8"]
    assert str(parse_grid("drop=0.5 roles=qk", 4)[0]) == "q:drop=0.5;k:drop=0.5"


def test_build_picks_argmin_ca_mse_per_stage_and_merges_repeats():
    def result(t, best):
        return {"progress": t, "rows": [{"strategy": "none", "ca_mse": 1.0},
                                        {"strategy": best, "ca_mse": 0.5}]}
    sched = build_schedule([result(0.5, "q:drop=0.5"), result(0.0, "q:drop=0.9"),
                            result(0.25, "q:drop=0.9")])
    assert [(s, str(st)) for s, st in sched.stages] == [(0.0, "q:drop=0.9"), (0.5, "q:drop=0.5")]


def test_a_tolerance_breaks_near_ties_towards_the_cheaper_strategy():
    rows = [dict(strategy="none", ca_mse=1.0, units=10.0),
            dict(strategy="q:drop=0.5", ca_mse=0.40, units=6.4),
            dict(strategy="q:drop=0.5,patch=8;k:patch=8", ca_mse=0.42, units=2.8),
            dict(strategy="q:drop=0.75,patch=8;k:patch=8", ca_mse=0.90, units=1.6)]
    assert best_strategy(dict(rows=rows)) == "q:drop=0.5"                    # the argmin
    assert best_strategy(dict(rows=rows), 1.5) == "q:drop=0.5,patch=8;k:patch=8"
    assert best_strategy(dict(rows=rows), 3.0) == "q:drop=0.75,patch=8;k:patch=8"


def test_grid_views_multiply_the_product_and_default_to_the_runs_own():
    assert all(s.views is None for s in parse_grid("drop=0,0.5", 4))
    cells = parse_grid("drop=0,0.5 views=2,4", 4)
    assert [str(s) for s in cells] == ["views=2", "views=4", "q:drop=0.5;views=2",
                                       "q:drop=0.5;views=4"]


def _fake_result(progress, views=(None,)):
    rows = [dict(strategy=str(compress.Strategy(compress.ViewCompression(d, p),
                                                compress.ViewCompression(0.0, p), v)),
                 drop=d, patch=p, views=v, units=1.0,
                 bias2=0.0 if d == 0 else d * 0.1, ca_var=1.0 - d / 2, ca_mse=1.0 - d / 3)
            for d in (0.0, 0.5, 0.75) for p in (None, 8) for v in views]
    return dict(progress=progress, base_patch=4, rows=rows)


def test_a_heatmap_cell_shows_its_least_ca_mse_strategy_and_panels_follow_progress_then_views():
    late, early = _fake_result(0.5), _fake_result(0.0, (2, 4))
    other_roles = dict(late["rows"][-1], strategy="k:drop=0.75", ca_mse=0.01, bias2=7.0)
    late["rows"].append(other_roles)                     # same (drop 0.75, patch 8) cell, less error
    panels = heatmap_panels([late, early])
    assert [title for title, *_ in panels] == ["progress 0%, 2 views", "progress 0%, 4 views",
                                               "progress 50%"]
    _, drops, patches, grids = panels[-1]
    assert drops == [0.0, 0.5, 0.75] and patches == [4, 8]          # patch None is the base, 4
    assert grids["ca_mse"][1, 2] == 0.01 and grids["bias2"][1, 2] == 7.0   # the whole row moves
    assert grids["ca_mse"][0, 0] == 1.0                                       # base, no drop
    late["rows"] = [r for r in late["rows"] if not (r["drop"] == 0.5 and r["patch"] == 8)]
    assert math.isnan(heatmap_panels([late])[0][3]["ca_var"][1, 1])     # no such strategy


def test_heatmaps_are_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fig4.png"
    assert save_heatmaps([_fake_result(0.25, (2, 4)), _fake_result(0.0)], str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmaps_without_matplotlib_print_a_note_and_do_not_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)               # import → ImportError
    path = tmp_path / "fig4.png"
    assert save_heatmaps([_fake_result(0.0)], str(path)) is None
    assert "matplotlib" in capsys.readouterr().out and not path.exists()


def test_build_cli_writes_the_schedule_and_the_heatmaps_beside_it(tmp_path):
    """Probes at 5 % and 50 %, given out of order: the first probe's argmin (drop 0.75) holds
    from 0, the second's (uncompressed, made the least CA-MSE there) from 50 %."""
    late, early = _fake_result(0.5), _fake_result(0.05)
    late["rows"][0]["ca_mse"] = 0.01                          # "none" wins late in training
    paths = []
    for result in (late, early):
        paths.append(str(tmp_path / f"probe_{result['progress']}.json"))
        with open(paths[-1], "w") as f:
            json.dump(result, f)
    schedule.main(["build", *paths, "--out", str(tmp_path / "sched.json")])
    stages = StageSchedule.load(str(tmp_path / "sched.json")).stages
    assert [(start, str(s)) for start, s in stages] == [(0.0, "q:drop=0.75"), (0.5, "none")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "sched.png").exists()
