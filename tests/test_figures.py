"""figures.py, figures_runs.py, figures_stats.py: the speed-up factor is read off the k-NN
curves as figures_stats.py defines it; runs are reused, resumed and evaluated as asked."""
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import figures  # noqa: E402
import figures_runs  # noqa: E402
import figures_stats  # noqa: E402
import figures_tables  # noqa: E402


def test_read_run_takes_the_curve_steps_and_probe_cost_from_the_log(tmp_path):
    log = [dict(step=0, progress=0.0, knn=12.0, units=0.0, train_wall=0.0),
           dict(auto="q:drop=0.5", probe_units=300.0, step=0),
           dict(step=1, loss=5.0, strategy="q:drop=0.5", units=400.0),
           dict(step=2, loss=4.0, strategy="none", units=800.0),
           dict(step=2, progress=1.0, knn=20.0, units=800.0, train_wall=3.5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "args.json").write_text(json.dumps(dict(budget=800.0, batch_size=16, seed=2,
                                                        method="simclr")))
    r = figures_runs.read_run(str(tmp_path))
    assert r["curve"] == [(0.0, 0.0, 12.0), (800.0, 3.5, 20.0)]
    assert (r["steps"], r["images"], r["probe_units"], r["seed"]) == (2, 32, 300.0, 2)
    assert r["strategies"] == ["q:drop=0.5", "none"]


def test_cost_figure_prices_a_sample_with_its_heads(tmp_path):
    import compress
    import vit
    figures.main(["cost", "--method", "moco", "--model", "cpu", "--reps", "1",
                  "--out", str(tmp_path)])
    folder = tmp_path / "embedded" / "cost_moco"
    results = json.loads((folder / "results.json").read_text())["cells"]
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


def test_spread_is_mean_and_range_over_seeds():
    assert figures_stats.spread([2.0, 4.0, 3.0]) == "3.0 (2.0–4.0)"
    assert figures_stats.spread([5.0]) == "5.0"
    assert figures_stats.summary([1.0, 3.0]) == dict(mean=2.0, min=1.0, max=3.0,
                                                    values=[1.0, 3.0])


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


def test_a_finished_run_is_reused_a_stopped_one_resumes_and_a_folder_holds_one_run(
        tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(figures_runs.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    base, argv = str(tmp_path / "run"), ["--method", "simclr", "--budget", "1k"]
    assert figures_runs.free_dir(base, argv, fresh=False) == base           # new
    os.makedirs(base)
    (tmp_path / "run" / "last.pt").write_bytes(b"x")             # stopped: no DONE.json
    assert figures_runs.free_dir(base, argv, fresh=False) == base
    figures_runs.start_train(base, argv, 1)
    assert started[-1][-1] == "--resume" and (tmp_path / "run" / "last.pt").exists()
    (tmp_path / "run" / "DONE.json").write_text(json.dumps(dict(argv=[*argv, "--out", base])))
    assert figures_runs.free_dir(base, argv, fresh=False) == base           # reused
    assert figures_runs.start_train(base, argv, 1) is None and len(started) == 1
    # another command line, or a re-run, gets the next free folder; the record stays
    other = [*argv, "--seed", "1"]
    assert figures_runs.free_dir(base, other, fresh=False) == base + "_r2"
    assert figures_runs.free_dir(base, argv, fresh=True) == base + "_r2"
    with pytest.raises(SystemExit, match="holds another run.*never reused"):
        figures_runs.start_train(base, other, 1)
    assert (tmp_path / "run" / "last.pt").exists() and len(started) == 1


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


def record(folder, seed, accs, nn, method="simclr", budget=1000.0, strategy="none"):
    """A run's committed record: args.json, log.jsonl (k-NN every 10 % of the budget), eval.json."""
    os.makedirs(folder)
    xs = [budget * i / (len(accs) - 1) for i in range(len(accs))]
    log = [dict(step=i, loss=1.0, strategy=strategy, units=x) for i, x in enumerate(xs)]
    log += [dict(step=i, knn=a, units=x, train_wall=x / 100)
            for i, (x, a) in enumerate(zip(xs, accs))]
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in log))
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dict(budget=budget, seed=seed, method=method, batch_size=8), f)
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(dict(knn=dict(top1=nn), linear=dict(top1=nn + 1)), f)
    return folder


RISE = [10, 20, 28, 34, 38, 41, 43, 44, 45, 45, 45]
FAST = [10, 30, 40, 44, 45, 46, 46, 46, 46, 46, 46]


def test_a_figure_is_re_derived_from_its_records_and_keeps_an_earlier_sittings_rows(
        tmp_path, monkeypatch):
    monkeypatch.setattr(figures_tables.plots, "pyplot", lambda note="": None)   # tables only
    args = figures.parse_args(["auto"])
    args.folder = str(tmp_path / "embedded" / "auto_simclr")
    os.makedirs(args.folder)
    b = [record(str(tmp_path / f"baseline_s{s}"), s, RISE, 45.0 + s) for s in (0, 1)]
    b8 = [record(str(tmp_path / f"autob8_s{s}"), s, FAST, 46.0 + s) for s in (0, 1)]
    figures.write_figure(args, {"baseline": b, "auto, 8 batches a probe": b8},
                         order=lambda k: figures.AUTO_ROWS.index(k))
    at6 = [record(str(tmp_path / f"autoat6_s{s}"), s, [a - 3 for a in RISE], 44.0) for s in (0, 1)]
    lost = [str(tmp_path / "auto_s0")]                    # listed, never recorded
    text = figures.write_figure(args, {"baseline": b, "auto (default)": lost,
                                       "auto, probes at 0/10/25/50/75/90 %": at6},
                                order=lambda k: figures.AUTO_ROWS.index(k))
    rows = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ")]
    assert rows == ["run", "baseline", "auto, 8 batches a probe",   # kept, re-read
                    "auto, probes at 0/10/25/50/75/90 %"]
    assert "auto (default): auto_s0" in text                # lost: named, not counted
    results = json.loads(open(os.path.join(args.folder, "results.json")).read())
    assert results["auto (default)"]["lost"] == lost and results["auto (default)"]["runs"] == []
    assert results["auto, 8 batches a probe"]["nn"]["values"] == [46.0, 47.0]
    assert results["auto, probes at 0/10/25/50/75/90 %"]["speedup_units"]["values"] == \
        [None, None]                                # never reached: counted, not dropped
    assert results["baseline"]["speedup_units"]["median"] >= 1.0    # the floor, shown
    assert figures_tables.render(args.folder) == text       # re-derived: the same table


def test_a_budget_figure_pairs_seeds_and_orders_budgets(tmp_path, monkeypatch):
    args = figures.parse_args(["constant", "--budgets", "500k", "--out", str(tmp_path)])
    args.folder = str(tmp_path / "embedded" / "constant_simclr")
    os.makedirs(args.folder)
    drawn = {}
    monkeypatch.setattr(figures_tables.plots, "plot_budgets",
                        lambda path, lines, title: drawn.update(path=path, lines=lines))
    run = lambda n, b, s, nn: record(str(tmp_path / f"{n}_{b}_s{s}"), s, RISE, nn)  # noqa: E731
    figures.write_figure(args, {"baseline 1M": [run("baseline", "1M", 0, 50.0)],
                                "patch 125k": [run("patch", "125k", 0, 45.0)],
                                "baseline 125k": [run("baseline", "125k", 0, 40.0),
                                                  run("baseline", "125k", 1, 41.0)]})
    text = figures.write_figure(args, {"patch 500000": [run("patch", "500k", 1, 48.0)],
                                       "baseline 500k": [run("baseline", "500k", 0, 40.0),
                                                         run("baseline", "500k", 1, 46.0)]},
                                figures.budget_order(["baseline", "drop", "patch"]))
    rows = [line.split(" | ")[:3] for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r[0][2:] + " " + r[1] for r in rows] == [
        "125k baseline", "125k patch", "500k baseline", "500000 patch", "1M baseline"]
    assert text.splitlines()[5].endswith("| 5.0 |")       # patch 125k − seed 0's baseline
    assert text.splitlines()[7].endswith("| 2.0 |")       # paired by seed: 48 − 46, seed 1
    assert drawn["path"] == os.path.join(args.folder, "accuracy_vs_budget.png")
    assert [b for b, _, _ in drawn["lines"]["baseline"]] == [125_000, 500_000, 1_000_000]


def test_every_committed_table_is_re_derived_unchanged_from_the_committed_records(
        tmp_path, monkeypatch):
    monkeypatch.setattr(figures_tables.plots, "pyplot", lambda note="": None)   # tables only
    folders = figures_tables.figure_folders(os.path.join(ROOT, "figs"))
    assert folders, "no committed figure under figs/"
    for folder in folders:
        copy = tmp_path / os.path.relpath(folder, ROOT)
        shutil.copytree(folder, copy)
        text = figures_tables.render(str(copy))
        with open(os.path.join(folder, "table.md")) as f:
            assert f.read() == text + "\n", f"{folder}: table.md differs from its records"


def test_the_checker_reads_quoted_numbers_back_from_the_committed_tables(tmp_path):
    import figures_check
    out = os.path.join(ROOT, "figs")
    quoted = tmp_path / "text.md"
    quoted.write_text("patch 51.5 (51.1–51.9) NN; DINO's dropout −0.4 (−0.6 to −0.3)\n")
    assert figures_check.check_text(out, [str(quoted)]) == []
    quoted.write_text("patch 51.6 (51.1–51.9) NN\n")                  # a mistyped mean
    assert figures_check.check_text(out, [str(quoted)]) == \
        [f"{quoted}: '51.6 (51.1–51.9)' is in no table"]
    problems, counted, lost = figures_check.check_records(out)
    assert problems == [] and counted > 0


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


def test_fig8_pairs_each_adaptive_run_with_the_best_constant_of_its_own_seed():
    """The best constant is the one of higher mean NN (patch here, though drop wins seed 1),
    and each difference is taken against the same seed's run, whatever the order of seeds."""
    def row(seeds, nn, lp):
        return dict(runs=[f"r{s}" for s in seeds], seeds=seeds, lp=dict(values=lp),
                    nn=dict(values=nn, mean=sum(nn) / len(nn)))
    results = dict(baseline=row([0, 1, 2], [40, 41, 42], [45, 45, 45]),
                   drop=row([0, 1, 2], [44, 47, 44], [48, 48, 48]),
                   patch=row([2, 0, 1], [48, 46, 45], [50, 51, 52]),
                   schedule=row([0, 1, 2], [47, 45, 49], [50, 50, 50]),
                   auto=dict(runs=[], seeds=[], nn=dict(values=[]), lp=dict(values=[])))
    best, pairs = figures_tables.paired_with_best_constant(results)
    assert best == "patch"
    assert pairs == {"schedule": [(0, 1, -1), (1, 0, -2), (2, 1, 0)]}
    text = figures_tables.paired_table(best, pairs)
    assert "schedule − patch" in text and "+1.0 / +0.0 / +1.0" in text


def test_fig4_table_orders_the_stages_and_names_each_stages_least_ca_mse(tmp_path):
    def row(strategy, bias2, ca_mse, units):
        return dict(strategy=strategy, bias2=bias2, ca_mse=ca_mse, units=units)
    for pct, late in ((75, 5.0), (0, 0.5)):     # written out of order on purpose
        with open(tmp_path / f"probe_{pct}.json", "w") as f:
            json.dump(dict(progress=pct / 100, rows=[
                row("none", 0.0, 3.0, 8.0), row("q:patch=8;k:patch=8", late / 4, late, 2.0),
                row("q:patch=6;k:patch=6", 0.1, 1.0, 3.0)]), f)
    text = figures_tables.probe_table(str(tmp_path))
    lines = [ln for ln in text.splitlines() if ln.startswith("| 0%") or ln.startswith("| 75%")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["0%", "75%"]
    assert "`q:patch=8;k:patch=8` 0.50 | 2.0 of 8.0" in lines[0]      # least CA-MSE early
    assert "`q:patch=6;k:patch=6` 1.00 | 3.0 of 8.0" in lines[1]      # milder once bias grows
    assert "1.25 / 5.00" in lines[1] and "| – |" in lines[1]          # bias² / CA-MSE; drop absent
    assert figures_tables.probe_table(str(tmp_path / "none")) == ""


def test_min_gain_runs_only_the_first_baseline_of_a_method_that_does_not_learn(
        tmp_path, monkeypatch, capsys):
    """--min-gain 5: seed 0's baseline runs first; 3 points above raw pixels, the figure is
    that baseline alone (nothing else trained), and its table quotes the pixels; 6 points
    above, compare goes on to the other baselines and the constants."""
    monkeypatch.setattr(figures_tables.plots, "pyplot", lambda note="": None)   # tables only
    with pytest.raises(SystemExit):
        figures.parse_args(["constant", "--min-gain", "5"])
    assert "--min-gain is for compare, not constant" in capsys.readouterr().err
    argv = ["compare", "--full-size", "1000", "--budget", "1k", "--min-gain", "5",
            "--out", str(tmp_path)]
    args = figures.parse_args(argv)
    folder = figures.figure_folder(args)
    os.makedirs(folder)
    with open(os.path.join(folder, "pixel_knn.json"), "w") as f:       # eval.py --pixel-knn's
        json.dump(dict(pixel_knn=dict(top1=40.0)), f)
    ran, asked = [], []

    def run_all(runs, _):
        asked.append([os.path.basename(o) for o, _ in runs])
        for o, argv in runs:
            if not os.path.isdir(o):
                record(o, int(o[-1]), RISE, 43.0)                      # NN 43 = pixels + 3
                with open(os.path.join(o, "DONE.json"), "w") as f:    # finished: reused
                    json.dump(dict(argv=[*argv, "--out", o]), f)
        if len(asked) > 1:
            raise StopIteration
    monkeypatch.setattr(figures, "run_all", run_all)
    monkeypatch.setattr(figures, "evaluate", lambda outs, a: {o: (43.0, 44.0) for o in outs})
    figures.main(argv)
    assert asked == [["baseline_n1000_1k_s0"]]
    assert "ends at 43.0 % NN, +3.0 points from raw pixels' 40.0 %" in capsys.readouterr().out
    text = open(os.path.join(folder, "table.md")).read()
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")] == \
        ["| run", "| baseline"]
    assert "Raw pixels' k-NN on the same bank (pixel_knn.json, eval.py --pixel-knn): 40.0 %; " \
           "'baseline' minus raw pixels: 3.0 points." in text
    asked.clear()
    monkeypatch.setattr(figures, "evaluate", lambda outs, a: {o: (46.0, 44.0) for o in outs})
    with pytest.raises(StopIteration):
        figures.main(argv)
    assert asked[1] == ["baseline_n1000_1k_s0", "baseline_n1000_1k_s1", "baseline_n1000_1k_s2",
                        "drop_n1000_1k_s0"]
