"""schedule.py: learning rates, stage schedules, and the gradient-error estimator (paper §5)."""
import io
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import vit  # noqa: E402
import schedule  # noqa: E402
from schedule import (RunningGradientStats, StageSchedule, build_schedule, error_terms,  # noqa: E402
                      learning_rate, parse_grid, print_table, probe, save_heatmaps)


def test_lr_warms_up_linearly_then_decays_to_zero_by_cosine_or_polynomial():
    assert learning_rate(0.0, 1.0, warmup=0.1) == 0.0
    assert learning_rate(0.05, 1.0, warmup=0.1) == pytest.approx(0.5)
    for kind in ("cosine", "poly"):
        assert learning_rate(0.1, 1.0, 0.1, kind) == pytest.approx(1.0)
        assert learning_rate(1.0, 1.0, 0.1, kind) == pytest.approx(0.0)
    s = 0.5                                   # progress 0.55 with warm-up 0.1 → s = 0.5
    assert learning_rate(0.55, 1.0, 0.1, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * s)))
    assert learning_rate(0.55, 1.0, 0.1, "poly") == pytest.approx((1 - s) ** 2)
    # under a tight budget the polynomial schedule keeps the rate higher for longer (Fig. 6)
    assert learning_rate(0.3, 1.0, 0.1, "poly") < learning_rate(0.3, 1.0, 0.1, "cosine")


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


def test_streaming_statistics_equal_the_two_pass_formulas():
    g = torch.randn(7, 50, dtype=torch.float64) + 3.0
    st = RunningGradientStats()
    for row in g:
        st.add(row)
    mean = g.mean(0)
    assert torch.allclose(st.mean, mean)
    assert st.variance == pytest.approx(((g - mean) ** 2).sum().item() / 6)


def test_the_estimator_recovers_bias_and_variance_on_a_problem_with_known_answers():
    """Gradients g = μ + b + σ·ε: bias² = ‖b‖², per-batch variance = σ²·d, corrected for K."""
    torch.manual_seed(0)
    d, K, K_ref, trials = 200, 16, 16, 40
    mu = torch.randn(d, dtype=torch.float64)
    b = 0.3 * torch.randn(d, dtype=torch.float64)
    sigma, sigma0 = 0.5, 0.4
    rows = []
    for _ in range(trials):
        ref, est, unbiased = RunningGradientStats(), RunningGradientStats(), RunningGradientStats()
        for _ in range(K_ref):
            ref.add(mu + sigma0 * torch.randn(d, dtype=torch.float64))
        for _ in range(K):
            est.add(mu + b + sigma * torch.randn(d, dtype=torch.float64))
            unbiased.add(mu + sigma * torch.randn(d, dtype=torch.float64))
        biased = error_terms(est.mean, est.variance, K, ref.mean, ref.variance, K_ref, 1.0)
        zero = error_terms(unbiased.mean, unbiased.variance, K, ref.mean, ref.variance, K_ref, 0.5)
        rows.append((biased["bias2"], biased["var"], zero["bias2"], zero["ca_var"]))
    bias2, var, zero_bias2, ca_var = (sum(col) / trials for col in zip(*rows))
    ref2 = (mu @ mu).item()
    assert bias2 == pytest.approx((b @ b).item() / ref2, rel=0.15)
    assert var == pytest.approx(sigma ** 2 * d / ref2, rel=0.05)
    assert zero_bias2 < 0.1 * (b @ b).item() / ref2           # the uncompressed estimate: ≈ 0
    assert ca_var == pytest.approx(0.5 * sigma ** 2 * d / ref2, rel=0.05)  # cost adjustment


def test_bias_is_relative_to_the_reference_norm_without_its_own_noise_and_may_go_negative():
    """‖g*‖² = 4 with σ_0²/K_ref = 8/4 = 2: the true ‖g‖² is estimated as 2, not 4.
    ‖ḡ_s − g*‖² = 1 is less than the noise σ_s²/K + σ_0²/K_ref = 2/2 + 2 = 3, so the unbiased
    bias² is −2 (−1 relative): kept as bias2_raw, clipped at 0 in bias2 and CA-MSE."""
    ref = torch.tensor([2.0, 0.0], dtype=torch.float64)
    est = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert schedule.signal_norm2(ref, 8.0, 4) == (2.0, False)
    t = error_terms(est, 2.0, 2, ref, 8.0, 4, cost_ratio=0.5)
    assert t["bias2_raw"] == pytest.approx(-1.0) and t["bias2"] == 0.0
    assert t["var"] == pytest.approx(2.0 / 2) and t["ca_var"] == pytest.approx(0.5 * 2.0 / 2)
    assert t["ca_mse"] == pytest.approx(t["ca_var"])


def test_a_reference_that_is_all_noise_is_clipped_and_flagged():
    ref = torch.tensor([2.0, 0.0], dtype=torch.float64)              # ‖g*‖² = 4
    assert schedule.signal_norm2(ref, 16.0, 4) == (pytest.approx(schedule.SIGNAL_FLOOR * 4), True)
    assert schedule.signal_norm2(ref, 40.0, 4)[1]                    # 4 − 10 < 0
    t = error_terms(ref, 1.0, 2, ref, 40.0, 4, 1.0)
    assert t["var"] == pytest.approx(1.0 / (schedule.SIGNAL_FLOOR * 4))   # finite, positive


def _tiny_checkpoint(path, batch_size):
    """What schedule.py reads of a train.py checkpoint, for a SimCLR run at ``batch_size``."""
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    kwargs = dict(proj_dim=16, hidden_dim=32)
    method = losses.build_method("simclr", backbone, **kwargs)
    torch.save(dict(args=dict(method="simclr", data="embedded", data_root=None, seed=0,
                              data_size=32, budget=1000, batch_size=batch_size, cost="flops",
                              views=2, local_crops=0),
                    vit_config=backbone.config(), method_kwargs=kwargs,
                    method=method.state_dict(), state=dict(spent=250.0)), path)
    return method


def test_the_probe_measures_at_the_runs_own_batch_unless_told_otherwise(tmp_path):
    ckpt, out = str(tmp_path / "ckpt_25.pt"), tmp_path / "probe.json"
    method = _tiny_checkpoint(ckpt, batch_size=12)
    argv = ["probe", "--ckpt", ckpt, "--grid", "drop=0,0.5", "--batches", "2",
            "--ref-batches", "2", "--out", str(out)]
    schedule.main(argv)
    result = json.loads(out.read_text())
    assert result["batch_size"] == 12 and result["progress"] == 0.25
    c = compress.CostModel(method.backbone, heads=method.cost_heads())
    units = [c.sample_units("simclr", compress.Strategy.parse(t)) for t in ("none", "q:drop=0.5")]
    assert result["units_spent"] == pytest.approx(12 * (2 * units[0] + 2 * sum(units)))  # heads too
    # ‖g‖² without the reference's noise, and the clipped and unclipped bias² side by side
    ref2 = result["ref_norm2"]
    assert result["ref_norm2_corrected"] == pytest.approx(
        max(ref2 - result["ref_var"] / 2, schedule.SIGNAL_FLOOR * ref2))
    assert all(r["bias2"] == max(r["bias2_raw"], 0.0) for r in result["rows"])
    schedule.main(argv + ["--batch-size", "4"])
    assert json.loads(out.read_text())["batch_size"] == 4


def test_build_picks_argmin_ca_mse_per_stage_and_merges_repeats():
    def result(t, best):
        return {"progress": t, "rows": [{"strategy": "none", "ca_mse": 1.0},
                                        {"strategy": best, "ca_mse": 0.5}]}
    sched = build_schedule([result(0.5, "q:drop=0.5"), result(0.0, "q:drop=0.9"),
                            result(0.25, "q:drop=0.9")])
    assert [(s, str(st)) for s, st in sched.stages] == [(0.0, "q:drop=0.9"), (0.5, "q:drop=0.5")]


def test_probe_runs_on_a_real_method_restores_its_state_and_charges_its_cost():
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    method = losses.build_method("moco", backbone, proj_dim=16, hidden_dim=32)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    views = data.ViewDataset(data.build_dataset("embedded", size=64, img_size=16),
                             data.build_views("moco", 16), seed=0)
    strategies = parse_grid("drop=0,0.75 patch=4,8", 4)
    cost = compress.CostModel(backbone)
    out = probe(method, views, strategies, "moco", cost, batches=3, ref_batches=3, batch_size=8)
    assert [r["strategy"] for r in out["rows"]] == [str(s) for s in strategies]
    assert all(r["ca_mse"] == pytest.approx(r["bias2"] + r["ca_var"]) for r in out["rows"])
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)          # training's dropout stream untouched
    c0 = cost.sample_units("moco", compress.NONE)
    assert out["units_spent"] == pytest.approx(8 * (3 * c0 + 3 * sum(cost.sample_units("moco", s)
                                                                     for s in strategies)))


def test_grid_views_multiply_the_product_and_default_to_the_runs_own():
    assert all(s.views is None for s in parse_grid("drop=0,0.5", 4))
    cells = parse_grid("drop=0,0.5 views=2,4", 4)
    assert [str(s) for s in cells] == ["views=2", "views=4", "q:drop=0.5;views=2",
                                       "q:drop=0.5;views=4"]


def test_probe_over_views_runs_each_strategy_on_its_views_and_charges_them():
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    method = losses.build_method("simclr", backbone, proj_dim=16, hidden_dim=32)
    views = data.ViewDataset(data.build_dataset("embedded", size=32, img_size=16),
                             data.build_views("simclr", 16, views=3), seed=0)
    strategies = parse_grid("drop=0,0.5 views=2,3", 4) + [compress.NONE]       # 5 strategies
    cost = compress.CostModel(backbone)
    out = probe(method, views, strategies, "simclr", cost, batches=2, ref_batches=2,
                batch_size=4, views=2)
    assert out["views"] == 2 and [r["views"] for r in out["rows"]] == [2, 3, 2, 3, 2]
    assert all(r["units"] > 0 for r in out["rows"])
    units = {r["strategy"]: r["units"] for r in out["rows"]}
    assert units["views=3"] == pytest.approx(9) and units["views=2"] == units["none"] == 6
    assert units["q:drop=0.5;views=3"] > units["q:drop=0.5;views=2"]
    # a strategy without views runs at the run's own: "none" is "views=2", gradient for gradient
    none, two = out["rows"][-1], out["rows"][0]
    assert all(none[k] == two[k] for k in ("bias2", "var", "ca_mse"))
    text = io.StringIO()
    print_table(out, text)
    assert "views" in text.getvalue() and "q:drop=0.5;views=3" in text.getvalue()
    with pytest.raises(ValueError, match="needs 4 views but the view set makes 3"):
        probe(method, views, parse_grid("views=4", 4), "simclr", cost, batches=2,
              ref_batches=2, batch_size=4, views=2)


def _fake_result(progress, views=(None,)):
    rows = [dict(strategy=str(compress.Strategy(compress.ViewCompression(d, p),
                                                compress.ViewCompression(0.0, p), v)),
                 drop=d, patch=p, views=v, units=1.0,
                 bias2=0.0 if d == 0 else d * 0.1, ca_var=1.0 - d / 2, ca_mse=1.0 - d / 3)
            for d in (0.0, 0.5, 0.75) for p in (None, 8) for v in views]
    return dict(progress=progress, base_patch=4, rows=rows)


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
    paths = []
    for t in (0.0, 0.5):
        paths.append(str(tmp_path / f"probe_{t}.json"))
        with open(paths[-1], "w") as f:
            json.dump(_fake_result(t), f)
    schedule.main(["build", *paths, "--out", str(tmp_path / "sched.json")])
    assert StageSchedule.load(str(tmp_path / "sched.json")).stages[0][0] == 0.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "sched.png").exists()
