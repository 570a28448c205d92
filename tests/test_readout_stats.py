"""The comparison's statistics (experiments.readout_stats) against values worked out in the test: Student's t
quantiles from tables, the t distribution's closed form at 2 degrees of freedom, its density integrated numerically
at a fractional Welch df, and Holm's step-down by hand."""
from __future__ import annotations

import math

import pytest

from experiments import readout_stats
from experiments.readout_stats import Welch

T_975_DF4 = 2.7764451051977987  # Student's t, 97.5% quantile at 4 degrees of freedom (tables: 2.776)


def t_two_sided_p(t: float, df: float, steps: int = 20_000) -> float:
    """1 - 2 * integral_0^|t| of Student's density, by Simpson's rule: a reference that shares nothing with scipy."""
    constant = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def density(x: float) -> float:
        return constant * (1 + x * x / df) ** (-(df + 1) / 2)

    h = abs(t) / steps
    total = density(0.0) + density(abs(t)) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 1 - 2 * total * h / 3


def test_equal_spreads_at_three_seeds_have_df_4_and_the_table_quantile_gives_p_005() -> None:
    """Two rows of 3 seeds with sample variance 1: SE of the difference sqrt(2/3), Welch df (2/3)^2 / (2 (1/3)^2 / 2)
    = 4; a difference of t_0.975,4 SEs is p = 0.05 exactly and its 95% interval starts at 0."""
    gap = T_975_DF4 * math.sqrt(2 / 3)
    test = readout_stats.welch([gap - 1, gap, gap + 1], [-1.0, 0.0, 1.0])
    assert test.difference == pytest.approx(gap) and test.df == pytest.approx(4.0)
    assert test.p == pytest.approx(0.05, abs=1e-9)
    assert (test.low, test.high) == (pytest.approx(0.0, abs=1e-9), pytest.approx(2 * gap))
    # the old rule's "2 standard errors" at df 4 is p = 0.116: not significant at 0.05
    two_se = readout_stats.welch([2 * math.sqrt(2 / 3) - 1, 2 * math.sqrt(2 / 3), 2 * math.sqrt(2 / 3) + 1],
                                 [-1.0, 0.0, 1.0])
    assert two_se.p == pytest.approx(t_two_sided_p(2.0, 4.0), abs=1e-7) and 0.11 < two_se.p < 0.12


@pytest.mark.parametrize("t", [0.5, 1.5, 4.0])
def test_a_row_without_spread_leaves_df_n_minus_1_and_the_closed_form_at_df_2(t: float) -> None:
    """Reference without spread: Welch df = n - 1 = 2, where the t distribution has the closed form
    P(|T| > t) = 1 - t / sqrt(2 + t^2)."""
    se = 1 / math.sqrt(3)  # sample std 1 over sqrt(3) seeds
    test = readout_stats.welch([t * se - 1, t * se, t * se + 1], [0.0, 0.0, 0.0])
    assert test.df == pytest.approx(2.0)
    assert test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)


def test_unequal_spreads_and_sizes_against_the_hand_formula_and_an_integrated_density() -> None:
    row, reference = [73.05, 72.30, 73.35], [64.25, 65.75, 64.20, 63.9, 66.1]
    mean = [sum(v) / len(v) for v in (row, reference)]
    var = [sum((x - m) ** 2 for x in v) / (len(v) - 1) for v, m in zip((row, reference), mean)]
    a, b = var[0] / 3, var[1] / 5
    df = (a + b) ** 2 / (a * a / 2 + b * b / 4)  # Welch-Satterthwaite
    t = (mean[0] - mean[1]) / math.sqrt(a + b)
    test = readout_stats.welch(row, reference)
    assert test.difference == pytest.approx(mean[0] - mean[1]) and test.df == pytest.approx(df)
    assert test.p == pytest.approx(t_two_sided_p(t, df), rel=1e-6)
    # the interval is symmetric about the difference and p = 0.05 would put its end at 0: its half-width is the
    # 97.5% quantile times the SE, which lies between the df = 4 and the normal quantile here (df > 4)
    half = (test.high - test.low) / 2
    assert test.low + half == pytest.approx(test.difference)
    assert df > 4 and 1.96 * math.sqrt(a + b) < half < T_975_DF4 * math.sqrt(a + b)


def test_one_seed_or_no_spread() -> None:
    assert readout_stats.welch([71.0], [70.0, 72.0]) == Welch(0.0, None, None, None, None)
    assert readout_stats.welch([72.0, 72.0], [70.0, 70.0]) == Welch(2.0, 2.0, 2.0, None, 0.0)
    assert readout_stats.welch([72.0, 72.0], [72.0, 72.0]).p == 1.0


def test_holm_by_hand() -> None:
    """Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> non-decreasing 0.02, 0.03, 0.06,
    0.06; returned in the order given."""
    assert readout_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert readout_stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert readout_stats.holm([]) == []


def test_verdicts_use_the_adjusted_p_and_the_undecided_band() -> None:
    better, worse = Welch(2.0, 0.5, 3.5, 4.0, 0.01), Welch(-2.0, -3.5, -0.5, 4.0, 0.01)
    assert readout_stats.verdict(better, 0.04) == "better" and readout_stats.verdict(worse, 0.04) == "worse"
    assert readout_stats.verdict(better, 0.05) == "no difference"  # significant alone, not after Holm
    assert readout_stats.verdict(Welch(1.0, None, None, None, None), None) == "n/a (1 seed)"
    assert readout_stats.describe(better, 0.04) == "+2.00 [+0.50, +3.50], p 0.010 (Holm 0.040): better"
    assert [readout_stats.undecided(Welch(1.0, 0, 2, 4, p)) for p in (0.01, 0.011, 0.19, 0.2, None)] == [
        False, True, True, False, False]
