"""Tests for llmft.stats: the paired bootstrap and the Wilson interval against known answers."""

from __future__ import annotations

import math

import pytest

from llmft.common import UserError
from llmft.stats import min_changed, paired_difference, proportion_interval


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (score interval, no correction).
    assert proportion_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert proportion_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)


def test_wilson_interval_of_all_or_nothing_stays_inside_0_1():
    low, high = proportion_interval(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28
    low, high = proportion_interval(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73


def test_wilson_interval_narrows_with_level():
    assert proportion_interval(9, 11, level=0.8)[0] > proportion_interval(9, 11)[0]


@pytest.mark.parametrize("hits, n", [(0, 0), (3, 2), (-1, 5)])
def test_wilson_interval_of_bad_counts_is_a_user_error(hits, n):
    with pytest.raises(UserError, match=f"{hits}/{n}"):
        proportion_interval(hits, n)


def test_identical_lists_give_zero_within_noise():
    scores = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    result = paired_difference(scores, scores)
    assert result == {"n": 10, "base": 0.6, "tuned": 0.6, "diff": 0.0, "low": 0.0, "high": 0.0, "beyond_noise": False}


def test_large_clear_effect_is_beyond_noise():
    result = paired_difference([0] * 100, [1] * 80 + [0] * 20)
    assert result["diff"] == pytest.approx(0.8)
    assert 0.7 < result["low"] < result["diff"] < result["high"] < 0.9
    assert result["beyond_noise"] is True


def test_bootstrap_interval_matches_the_normal_approximation_at_large_n():
    # Half the items flip 0 -> 1: differences are 0/1 with mean 0.5 and sd 0.5, so the 95% interval is close
    # to 0.5 +- 1.96 * 0.5 / sqrt(400) = 0.5 +- 0.049.
    result = paired_difference([0] * 400, [1, 0] * 200)
    half = 1.96 * 0.5 / math.sqrt(400)
    assert result["low"] == pytest.approx(0.5 - half, abs=0.006)
    assert result["high"] == pytest.approx(0.5 + half, abs=0.006)


def test_bootstrap_is_paired_not_two_sample():
    # Tuned = base + 0.1 on every item: the pairs say the change is certain, though each list alone spreads
    # from 0 to 1 (an unpaired interval would straddle 0).
    base = [i / 19 for i in range(20)]
    result = paired_difference(base, [x + 0.1 for x in base])
    assert result["low"] == pytest.approx(0.1) and result["high"] == pytest.approx(0.1)
    assert result["beyond_noise"] is True


def test_losses_that_fall_are_a_negative_difference():
    base = [2.0, 2.2, 1.9, 2.4, 2.1, 2.3, 2.0, 2.2]
    tuned = [b - 0.5 + 0.05 * (i % 3) for i, b in enumerate(base)]
    result = paired_difference(base, tuned)
    assert result["diff"] < 0 and result["high"] < 0 and result["beyond_noise"] is True


def test_same_seed_same_interval_other_seed_other_draws():
    base = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
    tuned = [1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1]
    assert paired_difference(base, tuned, seed=3) == paired_difference(base, tuned, seed=3)
    assert paired_difference(base, tuned, seed=3, resamples=50) != paired_difference(base, tuned, seed=4, resamples=50)


def test_too_few_changed_items_are_never_beyond_noise():
    # 5 of 5 flip the same way: the bootstrap interval is [1, 1], but 5 unanimous coin flips happen 6% of the time.
    assert min_changed(0.95) == 6
    assert paired_difference([0] * 5, [1] * 5)["beyond_noise"] is False
    assert paired_difference([0] * 6, [1] * 6)["beyond_noise"] is True


def test_interval_of_no_items_is_a_user_error():
    with pytest.raises(UserError, match="0 items"):
        paired_difference([], [])


def test_unequal_lengths_name_both_counts():
    with pytest.raises(UserError, match="base has 3 scores, tuned 2"):
        paired_difference([1, 0, 1], [1, 0])


def test_nan_score_is_a_user_error():
    with pytest.raises(UserError, match="NaN"):
        paired_difference([1.0, float("nan")], [1.0, 0.0])
