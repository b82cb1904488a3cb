"""nca_kit.stats: the intervals against independent computations, and the verdict rule."""

import math

import numpy as np
import pytest

from nca_kit import stats


def test_t_interval_three_seeds_uses_t_with_two_degrees_of_freedom():
    out = stats.t_interval([1.0, 2.0, 4.0])
    mean, sd = 7 / 3, np.std([1.0, 2.0, 4.0], ddof=1)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2} from tables
    assert out["mean"] == pytest.approx(mean)
    assert out["low"] == pytest.approx(mean - half)
    assert out["high"] == pytest.approx(mean + half)
    assert out["n"] == 3


def test_t_interval_single_value_has_no_interval_and_bad_input_raises():
    one = stats.t_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError):
        stats.t_interval([])
    with pytest.raises(ValueError):
        stats.t_interval([1.0, float("nan")])


def test_wilson_matches_textbook_value():
    out = stats.wilson(8, 10)  # Wilson 95 % for 8/10: [0.4902, 0.9433]
    assert out["p"] == 0.8
    assert out["low"] == pytest.approx(0.4902, abs=1e-4)
    assert out["high"] == pytest.approx(0.9433, abs=1e-4)
    edge = stats.wilson(0, 5)
    assert edge["low"] == 0.0 and 0 < edge["high"] < 1
    with pytest.raises(ValueError):
        stats.wilson(6, 5)


def test_paired_bootstrap_centres_on_mean_difference_and_pairs_matter():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=200)
    a, b = shared + 0.1, shared  # a constant paired difference: the interval collapses onto it
    out = stats.paired_bootstrap(a, b)
    assert out["difference"] == pytest.approx(0.1)
    assert out["low"] == pytest.approx(0.1) and out["high"] == pytest.approx(0.1)
    noisy = stats.paired_bootstrap(rng.normal(size=200), rng.normal(size=200))
    assert noisy["low"] < noisy["difference"] < noisy["high"]
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_bootstrap_agrees_with_the_reward_metrics_accuracy_difference():
    from nca_kit.rewards import metrics

    rng = np.random.default_rng(0)
    ac, ar, bc, br = (rng.normal(size=64) for _ in range(4))
    kit = metrics.accuracy_difference(metrics.pair_wins(*metrics.chosen_rejected(ac, ar)),
                                      metrics.pair_wins(*metrics.chosen_rejected(bc, br)), n_boot=4000, seed=3)
    wins_a = (ac > ar) + 0.5 * (ac == ar)
    wins_b = (bc > br) + 0.5 * (bc == br)
    ours = stats.paired_bootstrap(wins_a, wins_b, n_boot=4000, seed=3)
    assert ours["difference"] == pytest.approx(kit["difference"])
    assert ours["low"] == pytest.approx(kit["low"]) and ours["high"] == pytest.approx(kit["high"])


def test_slope_is_least_squares_and_skips_nonfinite():
    x = np.arange(10.0)
    assert stats.slope(x, 3 * x - 2) == pytest.approx(3.0)
    y = 3 * x - 2
    y[4] = np.nan
    assert stats.slope(x, y) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        stats.slope([1.0], [2.0])


@pytest.mark.parametrize("low, high, sign, words", [
    (0.01, 0.2, 1, "holds"),
    (-0.2, -0.01, 1, "reversed"),
    (-0.12, 0.03, 1, "not observed"),
    (-0.2, -0.01, -1, "holds"),
    (0.01, 0.2, -1, "reversed"),
    (float("nan"), float("nan"), 1, "not observed"),
])
def test_verdict_rule(low, high, sign, words):
    assert stats.verdict(low, high, sign) == words


def test_verdict_rejects_bad_arguments():
    with pytest.raises(ValueError):
        stats.verdict(0.1, 0.2, 0)
    with pytest.raises(ValueError):
        stats.verdict(0.3, 0.2)
