"""figures_stats.py's speed-up on constructed k-NN curves: the target is the baseline's end
level (a 3-evaluation mean), a run counts from where it reaches that level and stays, every
seed counts in the median, and the baseline against itself gives the noise floor."""
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from figures_stats import (factor_spread, levels, median, per_seed, reach_and_stay,  # noqa: E402
                           speedups)

XS = [i * 100 for i in range(11)]                       # every 10 % of a 1,000-unit budget


def run(accs):
    """A run's curve (units, training seconds = units / 10, k-NN %) at XS."""
    return dict(curve=[(x, x / 10, a) for x, a in zip(XS, accs)])


def test_a_level_is_the_mean_of_three_evaluations_at_the_middle_ones_budget():
    assert levels([(0, 1.0), (10, 2.0), (20, 6.0), (30, 7.0)]) == [(10, 3.0), (20, 5.0)]
    with pytest.raises(ValueError, match="2 evaluations"):
        levels([(0, 1.0), (10, 2.0)])


def test_reach_and_stay_interpolates_after_the_last_point_below_the_target():
    assert reach_and_stay([(0, 10.0), (100, 20.0), (200, 30.0)], 25.0) == pytest.approx(150)
    assert reach_and_stay([(0, 10.0), (100, 20.0), (200, 30.0)], 31.0) is None
    # a curve that crosses, dips below and crosses again counts from the second crossing
    assert reach_and_stay([(0, 10.0), (10, 40.0), (20, 20.0), (30, 40.0)], 30.0) == \
        pytest.approx(25.0)


def test_a_noisy_plateau_the_baseline_against_itself_is_the_floor_and_one_low_point_moves_little():
    # rises to 50 at 40 %, then ±0.6 noise; its last evaluation happens to be a low one
    base = run([30, 38, 44, 48, 50, 50.6, 49.4, 50.6, 49.4, 50.6, 49.4])
    floor, _ = speedups(base, base)
    assert 1.5 < floor < 2.5                            # at its own end level from ~45 %
    # the same curve twice as fast (its plateau from 20 % on): well above the floor
    fast = run([30, 44, 50, 50.6, 49.4, 50.6, 49.4, 50.6, 49.4, 50.6, 49.4])
    units, wall = speedups(base, fast)
    assert units == pytest.approx(wall) and 1.4 * floor < units < 2.2 * floor
    # the last point alone as the target (49.4), first reach on the raw curve (44 → 50
    # crosses it at 19 %), would give 5.3×: the low last point would be counted as the level
    assert units < 1000 / 190


def test_touch_and_fall_is_not_reached():
    base = run([30, 35, 38, 40, 42, 43, 44, 45, 45, 45, 45])
    spike = run([30, 44, 48, 46, 42, 41, 42, 43, 43, 44, 44])   # above 45 early, ends below
    assert speedups(base, spike) == (None, None)


def test_never_reached_counts_in_the_median_below_every_reached_seed():
    base = run([30, 35, 38, 40, 42, 43, 44, 45, 45, 45, 45])
    assert speedups(base, run([30] * 11)) == (None, None)
    assert median([3.3, None, 5.9]) == 3.3                     # not dropped: 3 seeds, not 2
    assert median([None, 4.6, None]) is None
    assert factor_spread([3.3, None, 5.9]) == "3.3 (n.r.–5.9)"
    assert factor_spread([None, None, 1.2]) == "n.r. (n.r.–1.2)"
    assert per_seed([3.3, None, 5.9]) == "3.3 / n.r. / 5.9"


def test_a_run_at_the_target_when_first_measured_is_infinitely_faster_not_unmeasured():
    base = run([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100])
    units, wall = speedups(base, run([100] * 11), k=1)           # the target at x = 0
    assert units == math.inf and wall == math.inf
    assert factor_spread([math.inf, 2.0, 3.0]) == "3.0 (2.0–∞)"
    # through the 3-evaluation level a run can be there from 10 %, its first level: 10×
    assert speedups(base, run([100] * 11))[0] == pytest.approx(10.0)
