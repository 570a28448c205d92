"""The statistics of the read-out comparison: Welch's t-test between two rows' seeds, Holm's correction across
every verdict a table makes, and the rule that says which rows need more seeds.

A 2-standard-error rule at 3 seeds is a t-test at p = 0.12-0.18 (Welch df 2-4), and a table of ~20 such verdicts
finds a few "differences" by chance; the p-values here are exact for normal per-seed scores with unequal variances,
and Holm's step-down keeps the chance of any false "better"/"worse" in a table under ALPHA (docs/readouts.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from scipy import stats

ALPHA = 0.05  # family-wise error rate of a table's verdicts (Holm)
CONFIDENCE = 0.95  # the interval shown for each difference
# A comparison whose uncorrected p lies in this open interval is neither clearly there nor clearly absent at 3
# seeds: both rows get MORE_SEEDS seeds (the driver's rule).
UNDECIDED = (0.01, 0.2)
MORE_SEEDS = 5


@dataclasses.dataclass(frozen=True)
class Welch:
    """row minus reference: the difference of the means, its 95% interval, Welch's df and two-sided p (None when a
    side has one seed)."""
    difference: float
    low: float | None
    high: float | None
    df: float | None
    p: float | None


def welch(row: Sequence[float], reference: Sequence[float]) -> Welch:
    """Welch's unequal-variance t-test of mean(row) - mean(reference) (scipy.stats.ttest_ind, equal_var=False)."""
    difference = math.fsum(row) / len(row) - math.fsum(reference) / len(reference)
    if len(row) < 2 or len(reference) < 2:
        return Welch(difference, None, None, None, None)
    if max(row) == min(row) and max(reference) == min(reference):  # no spread at all: the t statistic is undefined
        return Welch(difference, difference, difference, None, 1.0 if difference == 0 else 0.0)
    result = stats.ttest_ind(row, reference, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return Welch(difference, float(interval.low), float(interval.high), float(result.df), float(result.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times (m - i + 1), made
    non-decreasing, capped at 1. An adjusted p under ALPHA keeps the family-wise error rate under ALPHA."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def verdict(test: Welch, adjusted_p: float | None) -> str:
    """"better"/"worse" when the Holm-adjusted p is under ALPHA, else "no difference"; "n/a" without a test."""
    if test.p is None or adjusted_p is None:
        return "n/a (1 seed)"
    if adjusted_p >= ALPHA:
        return "no difference"
    return "better" if test.difference > 0 else "worse"


def undecided(test: Welch) -> bool:
    """Whether a comparison's uncorrected p falls in UNDECIDED (its rows then get MORE_SEEDS seeds)."""
    return test.p is not None and UNDECIDED[0] < test.p < UNDECIDED[1]


def describe(test: Welch, adjusted_p: float | None) -> str:
    """One verdict as the table prints it: difference, 95% interval, p (Holm-adjusted p) and the verdict."""
    if test.p is None:
        return f"{test.difference:+.2f}: {verdict(test, adjusted_p)}"
    return (f"{test.difference:+.2f} [{test.low:+.2f}, {test.high:+.2f}], p {test.p:.3f} (Holm {adjusted_p:.3f}): "
            f"{verdict(test, adjusted_p)}")
