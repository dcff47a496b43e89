"""figures.py, figures_runs.py, figures_stats.py: the speed-up factor is read off the k-NN
curves as figures_stats.py defines it; runs are reused, resumed and evaluated as asked."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import figures  # noqa: E402
import figures_runs  # noqa: E402
import figures_stats  # noqa: E402


def test_first_reach_interpolates_linearly_between_evaluations():
    curve = [(0, 10.0), (100, 20.0), (200, 30.0)]
    assert figures_stats.first_reach(curve, 25.0) == pytest.approx(150)
    assert figures_stats.first_reach(curve, 20.0) == pytest.approx(100)
    assert figures_stats.first_reach(curve, 5.0) == 0                 # already there at the start
    assert figures_stats.first_reach(curve, 31.0) is None             # never reached
    # the FIRST crossing counts, even if the curve dips below again later
    assert figures_stats.first_reach([(0, 10.0), (10, 40.0), (20, 20.0), (30, 40.0)], 30.0) == \
        pytest.approx(10 * 20 / 30)


def test_speed_up_is_the_baseline_budget_over_the_budget_where_the_run_reaches_its_accuracy():
    # (units, training seconds, k-NN): the baseline ends at 30 % after 1000 units / 100 s
    base = dict(curve=[(0, 0, 10.0), (500, 50, 20.0), (1000, 100, 30.0)])
    fast = dict(curve=[(0, 0, 10.0), (250, 40, 30.0), (1000, 160, 40.0)])
    units, wall = figures_stats.speedups(base, fast)
    assert units == pytest.approx(4.0)             # 1000 / 250: four times fewer units
    assert wall == pytest.approx(2.5)              # 100 / 40 s: slower per unit on the clock
    slow = dict(curve=[(0, 0, 10.0), (1000, 100, 25.0)])
    assert figures_stats.speedups(base, slow) == (None, None)        # never reaches 30 %


def test_read_run_takes_the_curve_steps_and_probe_cost_from_the_log(tmp_path):
    log = [dict(step=0, progress=0.0, knn=12.0, units=0.0, train_wall=0.0),
           dict(auto="q:drop=0.5", probe_units=300.0, step=0),
           dict(step=1, loss=5.0, strategy="q:drop=0.5", units=400.0),
           dict(step=2, loss=4.0, strategy="none", units=800.0),
           dict(step=2, progress=1.0, knn=20.0, units=800.0, train_wall=3.5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "args.json").write_text(json.dumps(dict(budget=800.0, batch_size=16)))
    r = figures_runs.read_run(str(tmp_path))
    assert r["curve"] == [(0.0, 0.0, 12.0), (800.0, 3.5, 20.0)]
    assert (r["steps"], r["images"], r["probe_units"]) == (2, 32, 300.0)
    assert r["strategies"] == ["q:drop=0.5", "none"]


def test_cost_figure_prices_a_sample_with_its_heads(tmp_path):
    import compress
    import vit
    figures.main(["cost", "--method", "moco", "--model", "cpu", "--reps", "1",
                  "--out", str(tmp_path)])
    folder = tmp_path / "embedded" / "cost_moco"
    results = json.loads((folder / "results.json").read_text())
    base = [r for r in results if r["drop"] == 0 and r["patch"] == 4]
    assert base[0]["flops"] == pytest.approx(1.0) and base[0]["measured"] == pytest.approx(1.0)
    row = [r["flops"] for r in results if r["patch"] == 4]
    assert row == sorted(row, reverse=True)            # more dropout never costs more
    # the heads do not shrink with the sequence: counted, they leave less to save
    bare = compress.CostModel(vit.build_vit("cpu"), "flops")
    most = max(results, key=lambda r: (r["patch"], r["drop"]))
    strategy = compress.Strategy(q=compress.ViewCompression(most["drop"], most["patch"]), views=2)
    assert most["flops"] > bare.sample_units("moco", strategy) / bare.sample_units(
        "moco", compress.NONE.resolve(2))
    assert "patch \\ drop" in (folder / "table.md").read_text()


def test_spread_is_mean_and_range_and_counts_runs_that_never_reached():
    assert figures_stats.spread([2.0, 4.0, 3.0]) == "3.0 (2.0–4.0)"
    assert figures_stats.spread([5.0]) == "5.0"
    assert figures_stats.spread([2.0, None, 4.0]) == "3.0 (2.0–4.0), 1 of 3 not reached"
    assert figures_stats.spread([None, None]) == "not reached"
    assert figures_stats.summary([1.0, None, 3.0]) == dict(mean=2.0, min=1.0, max=3.0,
                                                      values=[1.0, None, 3.0])


def test_runs_are_named_by_dataset_method_budget_and_seed_and_pass_the_data_flags(tmp_path):
    args = figures.parse_args(["compare", "--data", "folder", "--data-root", "data/cifar10/",
                               "--out", str(tmp_path), "--seeds", "3,4"])
    assert (args.dataset, args.budget, args.seed_list) == ("cifar10", "500k", [3, 4])
    out, argv = figures_runs.spec(args, "moco", "drop", "500k", 4, "--accel", "q:drop=0.75")
    assert out == os.path.join(str(tmp_path), "cifar10", "runs", "moco", "drop_500k_s4")
    assert argv[:6] == ["--method", "moco", "--budget", "500k", "--seed", "4"]
    assert argv[argv.index("--knn-bank") + 1] == "10000"
    assert argv[-2:] == ["--accel", "q:drop=0.75"]
    embedded = figures.parse_args(["views"])   # the bank: every one of the 8,000 images, also
    argv = figures_runs.spec(embedded, "simclr", "b", "1k", 0, "--data-size", "4000")[1]  # for a
    assert argv[argv.index("--knn-bank") + 1] == "10000"      # run that pretrains on half
    assert embedded.all_train and not args.all_train          # views: eval.py --all-train
    with pytest.raises(SystemExit):
        figures.parse_args(["compare", "--seeds", "0,1", "--constant-seeds", "3"])


def runs_asked_for(monkeypatch):
    """A list that receives the (folder, flags) of the runs a figure asks for; the figure then
    stops (StopIteration) instead of training."""
    ran = []

    def stop(runs, _):
        ran.extend(runs)
        raise StopIteration
    monkeypatch.setattr(figures, "run_all", stop)
    return ran


def test_the_auto_figure_runs_only_the_chosen_variants(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        figures.parse_args(["auto", "--variants", "auto,autob9"])
    assert "unknown autob9; allowed: auto, autob8" in capsys.readouterr().err
    args = figures.parse_args(["auto", "--variants", "autob8", "--seeds", "0,1",
                               "--out", str(tmp_path)])
    ran = runs_asked_for(monkeypatch)
    with pytest.raises(StopIteration):
        figures.fig_auto(args)
    names = [os.path.basename(out) for out, _ in ran]
    assert names == ["baseline_200k_s0", "baseline_200k_s1", "autob8_200k_s0", "autob8_200k_s1"]
    assert ran[-1][1][-4:] == ["--accel", "auto", "--auto-batches", "8"]


def test_the_views_figure_in_the_data_scarce_regime_names_its_size(tmp_path, monkeypatch,
                                                                   capsys):
    for bad, said in ((["--full-size", "1"], "--full-size 1 must be"),
                      (["--full-size", "100", "--half-size", "100"], "--half-size 100 must be")):
        with pytest.raises(SystemExit):
            figures.parse_args(["views", *bad])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--full-size 8000 must be below the 8000 training"):
        figures.main(["views", "--full-size", "8000", "--out", str(tmp_path)])
    ran = runs_asked_for(monkeypatch)
    with pytest.raises(StopIteration):
        figures.main(["views", "--full-size", "1000", "--seeds", "0", "--out", str(tmp_path)])
    assert os.path.isdir(tmp_path / "embedded" / "views_n1000")
    size = {os.path.basename(o): argv[argv.index("--data-size") + 1] for o, argv in ran}
    assert size == {"v2_n1000_200k_s0": "1000", "v4half_n1000_200k_s0": "500",
                    "v2half_n1000_200k_s0": "500", "v4drop_n1000_200k_s0": "1000"}


def test_a_figure_of_one_budget_at_another_budget_gets_its_own_folder():
    d = ["--data", "folder", "--data-root", "data/cifar10", "--out", "figs"]
    folder = {tuple(a): figures.figure_folder(figures.parse_args([*a, *d])) for a in (
        ["auto"], ["auto", "--budget", "500k"], ["auto", "--budget", "250k"],
        ["compare", "--method", "moco", "--budget", "1M"], ["constant", "--budgets", "1M,2M"],
        ["views", "--full-size", "4500", "--budget", "250k"])}
    assert folder == {
        ("auto",): os.path.join("figs", "cifar10", "auto_simclr"),
        ("auto", "--budget", "500k"): os.path.join("figs", "cifar10", "auto_simclr"),
        ("auto", "--budget", "250k"): os.path.join("figs", "cifar10", "auto_simclr_250k"),
        ("compare", "--method", "moco", "--budget", "1M"):
            os.path.join("figs", "cifar10", "compare_moco_1M"),
        ("constant", "--budgets", "1M,2M"): os.path.join("figs", "cifar10", "constant_simclr"),
        ("views", "--full-size", "4500", "--budget", "250k"):
            os.path.join("figs", "cifar10", "views_n4500_250k")}


def test_a_finished_run_is_reused_and_a_stopped_one_resumes(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(figures_runs.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    out, argv = str(tmp_path / "run"), ["--method", "simclr", "--budget", "1k"]
    os.makedirs(out)
    (tmp_path / "run" / "last.pt").write_bytes(b"x")             # stopped: no DONE.json
    figures_runs.start_train(out, argv, 1, fresh=False)
    assert started[-1][-1] == "--resume" and (tmp_path / "run" / "last.pt").exists()
    (tmp_path / "run" / "DONE.json").write_text(json.dumps(dict(argv=[*argv, "--out", out])))
    assert figures_runs.start_train(out, argv, 1, fresh=False) is None and len(started) == 1
    figures_runs.start_train(out, [*argv, "--seed", "1"], 1, fresh=False)  # other settings: afresh
    assert "--resume" not in started[-1] and not (tmp_path / "run" / "last.pt").exists()


def test_bands_are_drawn_from_curves_of_several_seeds_or_skipped_without_matplotlib(tmp_path):
    import plots
    curves = {"baseline": [[(0, 0, 10.0), (50, 5, 20.0)], [(0, 0, 11.0), (50, 6, 22.0)]],
              "patch": [[(0, 0, 10.0), (50, 4, 30.0)]]}                # one seed: a line alone
    path = tmp_path / "bands.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plots.plot_bands(str(path), curves, "t") is None and not path.exists()
        return
    plots.plot_bands(str(path), curves, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_views_figure_redoes_an_evaluation_made_without_all_train(tmp_path, monkeypatch):
    calls = []

    class FakeEval:                             # eval.py: writes what it was asked for
        returncode = 0

        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            with open(cmd[cmd.index("--out") + 1], "w") as f:
                json.dump(dict(all_train="--all-train" in cmd, knn=dict(top1=1.0),
                               linear=dict(top1=2.0)), f)

        def communicate(self):
            return "", ""

    monkeypatch.setattr(figures_runs.subprocess, "Popen", FakeEval)
    run = str(tmp_path / "run")
    os.makedirs(run)
    with open(os.path.join(run, "eval.json"), "w") as f:       # made without --all-train
        json.dump(dict(knn=dict(top1=5.0), linear=dict(top1=6.0)), f)
    compare, views = figures.parse_args(["compare"]), figures.parse_args(["views"])
    assert figures_runs.evaluate([run], compare) == {run: (5.0, 6.0)} and not calls     # reused
    with pytest.raises(SystemExit, match="run must be evaluated.*last.pt is not there"):
        figures_runs.evaluate([run], views)          # a committed record: no checkpoint to evaluate
    assert not calls
    open(os.path.join(run, "last.pt"), "w").close()
    assert figures_runs.evaluate([run], views) == {run: (1.0, 2.0)} and "--all-train" in calls[0]
    assert figures_runs.evaluate([run], views) == {run: (1.0, 2.0)} and len(calls) == 1


def test_the_auto_figure_keeps_an_earlier_sittings_rows_and_marks_those_of_rerun_baselines(
        tmp_path):
    args = figures.parse_args(["auto"])
    args.folder = str(tmp_path)
    row = lambda n: [n, 3, "none", 10, "1.0", "2.0", "3.0", "1", "1"]  # noqa: E731
    entry = lambda n, nn=None: dict(row=row(n), runs=[n], nn=dict(values=[nn]))  # noqa: E731

    def sitting(now):                       # one sitting: merge, write results.json, render
        merged = figures.earlier_rows(args, now)
        with open(tmp_path / "results.json", "w") as f:
            json.dump(merged, f)
        return merged, figures.marked_rows(merged)
    base = lambda nn: dict(entry("baseline", nn), runs=["b_s0"])  # noqa: E731
    sitting({"baseline": base(47.0), "auto (default)": entry("auto (default)"),
             "auto, 8 batches a probe": entry("old b8")})
    merged, (rows, note) = sitting({"baseline": base(47.0),
                                    "auto, 8 batches a probe": entry("new b8")})
    assert list(merged) == ["baseline", "auto (default)", "auto, 8 batches a probe"]
    assert [r[0] for r in rows] == ["baseline", "auto (default)", "new b8"] and note == ""
    merged, (rows, note) = sitting({"baseline": base(46.5),      # the baseline re-run since
                                    "auto, 8 batches a probe": entry("newer b8")})
    assert [r[0] for r in rows] == ["baseline", "auto (default) †", "newer b8"]
    assert "47.0" in note
    merged, (rows, again) = sitting({"baseline": base(46.5)})   # a later sitting: still marked,
    assert [r[0] for r in rows] == ["baseline", "auto (default) †", "newer b8"] and again == note
    assert merged["auto (default)"]["row"][0] == "auto (default)"   # the mark is not stored
    other = {"baseline": dict(base(47.0), runs=["b_1M_s0"])}              # another budget
    assert list(figures.earlier_rows(args, other)) == ["baseline"]


def test_a_budget_figure_keeps_an_earlier_sittings_other_budgets_in_budget_order(tmp_path):
    args = figures.parse_args(["constant", "--budgets", "500k", "--out", str(tmp_path)])
    args.folder = str(tmp_path)
    entry = lambda b, n, nn: dict(row=[b, n, 1, 10, nn, "", ""])  # noqa: E731
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"baseline 1M": entry("1M", "baseline", "old"),
                   "baseline 500000": entry("500000", "baseline", "old"),   # = 500k
                   "baseline 125k": entry("125k", "baseline", "old"),
                   "poly 125k": entry("125k", "poly", "old"),               # not this figure's
                   "patch 125k": entry("125k", "patch", "old")}, f)
    now = {"patch 500k": entry("500k", "patch", "new"),
           "baseline 500k": entry("500k", "baseline", "new")}
    merged = figures.earlier_budgets(args, now, ["baseline", "drop", "patch"])
    assert list(merged) == ["baseline 125k", "patch 125k", "baseline 500k", "patch 500k",
                            "baseline 1M"]
    assert merged["baseline 500k"]["row"][4] == "new"             # this sitting's budget wins


def test_the_budget_figures_draw_final_accuracy_against_the_budget_in_units(tmp_path, monkeypatch):
    args = figures.parse_args(["constant", "--budgets", "125k,1M", "--out", str(tmp_path)])
    args.folder = str(tmp_path)
    acc = lambda m: dict(mean=m, min=m - 1, max=m + 1)  # noqa: E731
    results = {"baseline 125k": dict(nn=acc(40.0), lp=acc(44.0)),
               "patch 125k": dict(nn=acc(45.0), lp=acc(48.0)),
               "baseline 1M": dict(nn=acc(50.0), lp=acc(52.0))}
    drawn = {}
    monkeypatch.setattr(figures.plots, "plot_budgets",
                        lambda path, lines, title: drawn.update(path=path, lines=lines))
    figures.plot_budgets(args, results, "t")
    assert drawn["path"] == os.path.join(str(tmp_path), "accuracy_vs_budget.png")
    assert drawn["lines"] == {"baseline": [(125_000, acc(40.0), acc(44.0)),
                                           (1_000_000, acc(50.0), acc(52.0))],
                              "patch": [(125_000, acc(45.0), acc(48.0))]}
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    figures.plot_budgets(args, results, "t")              # patch at one budget: a point alone
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_many_epoch_regime_pretrains_on_a_subset_that_is_its_own_bank(tmp_path, monkeypatch,
                                                                          capsys):
    with pytest.raises(SystemExit):
        figures.parse_args(["auto", "--full-size", "1000"])
    assert "--full-size is for views, compare, constant and decay, not auto" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit, match="--full-size 8000 must be below the 8000 training"):
        figures.main(["compare", "--full-size", "8000", "--out", str(tmp_path)])
    ran = runs_asked_for(monkeypatch)
    with pytest.raises(StopIteration):
        figures.main(["compare", "--full-size", "1000", "--budget", "1M", "--seeds", "0",
                      "--out", str(tmp_path)])
    assert os.path.isdir(tmp_path / "embedded" / "compare_simclr_n1000_1M")
    names = [os.path.basename(out) for out, _ in ran]
    assert names == ["baseline_n1000_1M_s0", "drop_n1000_1M_s0"]   # never the whole split's runs
    for _, argv in ran:
        assert argv[argv.index("--data-size") + 1] == "1000" and "--knn-bank" not in argv
    args = figures.parse_args(["constant", "--full-size", "1000", "--budgets", "1M"])
    assert figures.figure_folder(args) == os.path.join("figs", "embedded", "constant_simclr_n1000")
    assert "1,000 images, also the k-NN bank" in figures.describe(args)
