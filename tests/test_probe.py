"""probe.py: the gradient-error estimator (paper §5) on known answers, on real methods, and
from a train.py checkpoint."""
import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import augment  # noqa: E402
import compress  # noqa: E402
import data  # noqa: E402
import methods  # noqa: E402
import options  # noqa: E402
import probe as probe_module  # noqa: E402
import vit  # noqa: E402
from probe import RunningGradientStats, error_terms, print_table, probe  # noqa: E402
from run import build_run  # noqa: E402
from schedule import parse_grid  # noqa: E402


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
    assert probe_module.signal_norm2(ref, 8.0, 4) == (2.0, False)
    t = error_terms(est, 2.0, 2, ref, 8.0, 4, cost_ratio=0.5)
    assert t["bias2_raw"] == pytest.approx(-1.0) and t["bias2"] == 0.0
    assert t["var"] == pytest.approx(2.0 / 2) and t["ca_var"] == pytest.approx(0.5 * 2.0 / 2)
    assert t["ca_mse"] == pytest.approx(t["ca_var"])


def test_a_reference_that_is_all_noise_is_clipped_and_flagged():
    ref = torch.tensor([2.0, 0.0], dtype=torch.float64)              # ‖g*‖² = 4
    assert probe_module.signal_norm2(ref, 16.0, 4) == (pytest.approx(probe_module.SIGNAL_FLOOR * 4), True)
    assert probe_module.signal_norm2(ref, 40.0, 4)[1]                    # 4 − 10 < 0
    t = error_terms(ref, 1.0, 2, ref, 40.0, 4, 1.0)
    assert t["var"] == pytest.approx(1.0 / (probe_module.SIGNAL_FLOOR * 4))   # finite, positive


def _tiny_checkpoint(path, batch_size):
    """A train.py checkpoint of a SimCLR run at ``batch_size``, 25 % into its budget, with the
    weights it had at initialisation: what build_run makes from the run's flags."""
    args, _ = options.get_args(["--method", "simclr", "--img-size", "16", "--data-size", "32",
                                "--batch-size", str(batch_size), "--budget", "1000"])
    torch.manual_seed(0)
    run = build_run(args, train=False)
    torch.save(dict(args=vars(args), vit_config=run.backbone.config(),
                    method_kwargs=run.method_kwargs, method=run.method.state_dict(),
                    state=dict(spent=250.0)), path)
    return run.method


def test_the_probe_measures_at_the_runs_own_batch_unless_told_otherwise(tmp_path):
    ckpt, out = str(tmp_path / "ckpt_25.pt"), tmp_path / "probe.json"
    method = _tiny_checkpoint(ckpt, batch_size=12)
    argv = ["--ckpt", ckpt, "--grid", "drop=0,0.5", "--batches", "2", "--ref-batches", "2",
            "--out", str(out)]
    probe_module.main(argv)
    result = json.loads(out.read_text())
    assert result["batch_size"] == 12 and result["progress"] == 0.25
    c = compress.CostModel(method.backbone, heads=method.cost_heads())
    units = [c.sample_units("simclr", compress.Strategy.parse(t).resolve(2))
             for t in ("none", "q:drop=0.5")]
    assert result["units_spent"] == pytest.approx(12 * (2 * units[0] + 2 * sum(units)))  # heads too
    # ‖g‖² without the reference's noise, and the clipped and unclipped bias² side by side
    ref2 = result["ref_norm2"]
    assert result["ref_norm2_corrected"] == pytest.approx(
        max(ref2 - result["ref_var"] / 2, probe_module.SIGNAL_FLOOR * ref2))
    assert all(r["bias2"] == max(r["bias2_raw"], 0.0) for r in result["rows"])
    probe_module.main(argv + ["--batch-size", "4"])
    assert json.loads(out.read_text())["batch_size"] == 4


def test_probe_runs_on_a_real_method_restores_its_state_and_charges_its_cost():
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    method = methods.build_method("moco", backbone, proj_dim=16, hidden_dim=32)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    views = data.ViewDataset(data.build_dataset("embedded", size=64, img_size=16),
                             augment.build_views("moco", 16), seed=0)
    strategies = parse_grid("drop=0,0.75 patch=4,8", 4)
    cost = compress.CostModel(backbone)
    out = probe(method, views, strategies, "moco", cost, batches=3, ref_batches=3, batch_size=8)
    assert [r["strategy"] for r in out["rows"]] == [str(s) for s in strategies]
    assert all(r["ca_mse"] == pytest.approx(r["bias2"] + r["ca_var"]) for r in out["rows"])
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)          # training's dropout stream untouched
    c0 = cost.sample_units("moco", compress.NONE.resolve(2))
    assert out["units_spent"] == pytest.approx(8 * (3 * c0 + 3 * sum(
        cost.sample_units("moco", s.resolve(2)) for s in strategies)))


def test_probe_over_views_runs_each_strategy_on_its_views_and_charges_them():
    torch.manual_seed(0)
    backbone = vit.ViT(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    method = methods.build_method("simclr", backbone, proj_dim=16, hidden_dim=32)
    views = data.ViewDataset(data.build_dataset("embedded", size=32, img_size=16),
                             augment.build_views("simclr", 16, views=3), seed=0)
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
