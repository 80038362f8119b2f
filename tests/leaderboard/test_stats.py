"""The statistics of the record test (evaluator/leaderboard/stats.py), against closed forms and published values."""

from __future__ import annotations

import math

import pytest

from evaluator.leaderboard.stats import (
    paired_one_sided_p,
    regularized_incomplete_beta,
    student_t_cdf,
    welch_one_sided_p,
)


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_incomplete_beta_closed_forms(x):
    assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-13)
    assert regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert regularized_incomplete_beta(2.5, 7.0, x) == pytest.approx(
        1 - regularized_incomplete_beta(7.0, 2.5, 1 - x), abs=1e-13
    )


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.4, 0.0, 0.7, 1.9, 12.0])
def test_student_t_cdf_matches_closed_forms_for_one_two_and_four_degrees(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    x = t / math.sqrt(4 + t * t)
    assert student_t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * x - x**3 / 4, abs=1e-13)


@pytest.mark.parametrize(
    "t, df, probability",
    [
        (2.228138851986274, 10, 0.975),
        (2.0150483733330233, 5, 0.95),
        (4.060711359300081, 3.5, 0.99),  # fractional df, as Welch's test produces
        (2.580754698065951, 1000, 0.995),
        (-2.228138851986274, 10, 0.025),
    ],
)
def test_student_t_cdf_at_tabulated_quantiles(t, df, probability):
    assert student_t_cdf(t, df) == pytest.approx(probability, abs=1e-12)


def test_welch_one_sided_p_values():
    # Means 5 and 2, unit variances, n=3 each: t = 3/sqrt(2/3), df = 4 exactly.
    t = 3 / math.sqrt(2 / 3)
    x = t / math.sqrt(4 + t * t)
    assert welch_one_sided_p([4, 5, 6], [1, 2, 3]) == pytest.approx(1 - (0.5 + 0.75 * x - x**3 / 4), abs=1e-13)
    # Unequal variances and a fractional df (value from an independent implementation).
    assert welch_one_sided_p([3.1, 3.2, 3.15], [3.0, 3.05, 3.02]) == pytest.approx(0.0152043639770726, abs=1e-12)
    # One-sided: a worse challenger gets a large p.
    assert welch_one_sided_p([1, 2, 3], [4, 5, 6]) == pytest.approx(1 - welch_one_sided_p([4, 5, 6], [1, 2, 3]))
    assert welch_one_sided_p([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == 0.0
    assert welch_one_sided_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0


def test_paired_one_sided_p_values():
    # Differences -1, -2, -3: mean -2, standard error 1/sqrt(3), t = -2 sqrt(3) on 2 degrees of freedom.
    t = -2 * math.sqrt(3)
    assert paired_one_sided_p([-1.0, -2.0, -3.0]) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    # Six pairs (5 df) whose t is minus the tabulated 95 % point, 2.0150483733330233: p = 0.05. The spread has
    # mean 0 and standard error sqrt(6/5)/sqrt(6); shifting it down by t standard errors sets the mean.
    spread = [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    shift = 2.0150483733330233 * math.sqrt(6 / 5) / math.sqrt(6)
    assert paired_one_sided_p([d - shift for d in spread]) == pytest.approx(0.05, abs=1e-12)
    # One-sided: the mirror image has the complementary p; a worse challenger gets a large one.
    assert paired_one_sided_p([1.0, 2.0, 3.0]) == pytest.approx(1 - paired_one_sided_p([-1.0, -2.0, -3.0]))
    assert paired_one_sided_p([-0.5, -0.5, -0.5]) == 0.0
    assert paired_one_sided_p([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        paired_one_sided_p([-1.0])
