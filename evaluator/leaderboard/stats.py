"""Welch's one-sided t-test, the one-sided paired t-test, and the Student's t distribution under
them, from the standard library.

The maths alone: it knows nothing of results, rows or rules, so it can be read and checked on its
own against closed forms and published tables. Student's t CDF comes from the regularized
incomplete beta function, evaluated by its continued fraction (modified Lentz).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sample_variance(values: list[float]) -> float:
    centre = mean(values)
    return math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1)


def _continued_fraction(terms: Callable[[int], tuple[float, float]], b0: float) -> float:
    """b0 + a1/(b1 + a2/(b2 + ...)) by the modified Lentz method; terms(j) gives (a_j, b_j)."""
    tiny = 1e-300
    value = b0 if b0 != 0 else tiny
    c, d = value, 0.0
    for j in range(1, 10_000):
        a_j, b_j = terms(j)
        d = b_j + a_j * d
        d = 1.0 / (d if d != 0 else tiny)
        c = b_j + a_j / c
        c = c if c != 0 else tiny
        step = c * d
        value *= step
        if abs(step - 1.0) < 1e-15:
            return value
    raise ArithmeticError("continued fraction did not converge")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    # The fraction converges fast only left of the distribution's bulk; use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)

    def terms(j: int) -> tuple[float, float]:
        if j % 2:  # odd: j = 2m + 1
            m = (j - 1) // 2
            return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)), 1.0
        m = j // 2
        return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), 1.0

    return math.exp(log_front) / (a * _continued_fraction(terms, 1.0))


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as in Welch's test)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def welch_one_sided_p(baseline: list[float], challenger: list[float]) -> float:
    """p-value of Welch's t-test for "the challenger's mean is lower than the baseline's"."""
    if len(baseline) < 2 or len(challenger) < 2:
        raise ValueError("Welch's t-test needs at least two values on each side")
    var_base = sample_variance(baseline) / len(baseline)
    var_chal = sample_variance(challenger) / len(challenger)
    difference = mean(baseline) - mean(challenger)
    if var_base + var_chal == 0.0:
        # Both sides are constant: the difference is certain, either way.
        return 0.0 if difference > 0 else 1.0
    t = difference / math.sqrt(var_base + var_chal)
    df = (var_base + var_chal) ** 2 / (var_base**2 / (len(baseline) - 1) + var_chal**2 / (len(challenger) - 1))
    return 1.0 - student_t_cdf(t, df)


def paired_one_sided_p(differences: list[float]) -> float:
    """p-value of the one-sided paired t-test for "the mean difference is below zero", where each
    difference is the challenger's score minus the baseline's on one pair (lower scores are better):
    Student's one-sample t on the differences, n - 1 degrees of freedom."""
    if len(differences) < 2:
        raise ValueError("the paired t-test needs at least two pairs")
    centre = mean(differences)
    spread = sample_variance(differences)
    if spread == 0.0:
        # Every pair differs by the same amount: the sign is certain.
        return 0.0 if centre < 0 else 1.0
    return student_t_cdf(centre / math.sqrt(spread / len(differences)), len(differences) - 1)
