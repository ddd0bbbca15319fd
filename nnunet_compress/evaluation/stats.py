"""Paired tests of base vs compressed per class, with multiple-comparison correction.

The question a compression report must answer per class is "is there evidence that the compressed model scores
differently from the base on the same cases?" (the Tucker paper: "no evidence of difference for 113 of 117
classes"). Scores of the same case are paired and rarely normal, so the test is scipy's Wilcoxon signed-rank test
on the per-case differences. With one test per class, some would come out "significant" by chance alone, so the
p-values of one compressed model are corrected across its classes: Holm (controls the family-wise error rate; the
default) or Benjamini-Hochberg (controls the false discovery rate; less conservative with a hundred classes).

The corrections are written out here rather than taken from statsmodels, which nnU-Net does not pull in; each is a
few lines and is tested against hand-computed values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CORRECTIONS = ("holm", "bh", "none")


@dataclass
class PairedTest:
    """Wilcoxon signed-rank test of compressed - base over the cases where both scores exist."""

    n_pairs: int
    mean_difference: float  # compressed - base
    median_difference: float
    statistic: float
    p_value: float  # NaN where no test is possible (fewer than one non-zero difference)


def paired_wilcoxon(base: Sequence[float], compressed: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test; cases where either score is NaN (class absent) are left out.

    All differences zero (identical predictions) means no evidence of a difference: p = 1. Zero differences
    among non-zero ones are dropped (scipy's default 'wilcox' zero method), and scipy picks the exact null
    distribution for small samples without ties. Note that with n pairs the smallest possible two-sided p is
    2 / 2**n: below 6 cases no class can ever reach p < 0.05.
    """
    from scipy.stats import wilcoxon
    a, b = np.asarray(base, dtype=float), np.asarray(compressed, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = b[keep] - a[keep]
    n = int(diff.size)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan)
    mean, median = float(diff.mean()), float(np.median(diff))
    if not np.any(diff != 0):
        return PairedTest(n, mean, median, 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about small samples / ties; we report n alongside p
        result = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return PairedTest(n, mean, median, float(result.statistic), float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (NaNs stay NaN and do not count as tests).

    Written here because scipy has no Holm correction and statsmodels would be a dependency for ten lines.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])  # step-down: adjusted p never decreases along the ranking
        out[i] = min(1.0, running)
    return out.tolist()


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy's false_discovery_control); NaNs stay NaN and are not tests."""
    from scipy.stats import false_discovery_control
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    if valid.any():
        out[valid] = false_discovery_control(p[valid], method="bh")
    return out.tolist()


def adjust(p_values: Sequence[float], method: str) -> list[float]:
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    if method == "none":
        return [float(p) for p in p_values]
    raise ValueError(f"unknown correction {method!r} (choose from {', '.join(CORRECTIONS)})")
