"""Calibration of a budget in seconds against the measured network: the loop that corrects the per-layer
prediction by whole-network measurements, and what it records.

:func:`calibrated_allocation` closes the loop the per-layer model leaves open: the allocation is made for a
*predicted* fraction, the whole compressed network is then timed against the original (interleaved, same process),
and the predicted goal is corrected by what was measured until the measured fraction is within ``tolerance`` of
the target. A sum of per-layer times misses fusions, layout changes and the layers that are not decomposed; the
measurement does not. :func:`measured_uniform` is the fallback along the uniform rank ratio. Both take the
allocator and the measurement as callables, so nothing here runs an engine itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from nnunet_compress.errors import CompressError

TOLERANCE = 0.05  # a measured fraction within 5% of the target is accepted
ROUNDS = 4  # allocations tried at corrected goals before settling for the best measured one


@dataclass
class LatencyTerms:
    """What a latency budget is spent in: the engine, the original's measured seconds, the per-layer model; and
    the record of what was measured (calibration rounds, every timed allocation, the kept one's fraction), which
    the calibration loop and the callers' measurements add to and the reports and plans show."""

    engine: str
    threads: int
    cost_model: str
    base_seconds: float
    model: object  # LatencyModel or FlopsCostModel: .layer_seconds(conv, in_spatial, out_spatial, ranks, channels)
    rounds: list[dict] = field(default_factory=list)  # calibration: predicted goal, predicted, measured fractions
    measured_fraction: float | None = None  # of the kept allocation, measured against the original
    measured: list = field(default_factory=list)  # (allocation, measured fraction) of every timed allocation
    prepared: dict = field(default_factory=dict, repr=False)  # the original's compiled engine call, kept

    def layer_cost(self, conv: nn.Module, in_spatial, out_spatial, ranks=None) -> float:
        return self.model.layer_seconds(conv, in_spatial, out_spatial, ranks)

    def to_dict(self) -> dict:
        return {"engine": self.engine, "threads": self.threads, "cost_model": self.cost_model,
                "base_seconds": self.base_seconds, "rounds": self.rounds,
                "measured_fraction": self.measured_fraction}


def calibrated_allocation(target: float, allocate: Callable[[float], object], predicted: Callable[[object], float],
                          measure: Callable[[object], float], terms: LatencyTerms, progress=print,
                          rounds: int = ROUNDS, tolerance: float = TOLERANCE, floor_hint: str = ""):
    """The allocation whose MEASURED fraction of the original's time is closest to `target` from below (within
    `tolerance` above it at most).

    allocate(goal) -> allocation at a predicted fraction `goal` (as close as the floors allow); predicted(a) -> its
    predicted fraction; measure(a) -> its measured fraction. Each round corrects the goal by how much of the
    predicted SAVING was measured (k = measured saving / predicted saving; next goal = 1 - (1 - target) / k): the
    per-layer model times convolutions one by one, and a whole network on an engine that fuses and re-lays-out
    saves more or less than their sum, roughly in proportion. Returns (allocation, goal); the rounds are recorded
    in ``terms.rounds``. A target that even the floors cannot meet is refused, naming what they reach.
    """
    goal, tried = target, []
    for _ in range(rounds):
        allocation = allocate(goal)
        fraction, expected = measure(allocation), predicted(allocation)
        terms.rounds.append({"predicted_goal": goal, "predicted": expected, "measured": fraction})
        tried.append((allocation, goal, fraction))
        progress(f"latency budget: predicted {expected:.3f}, measured {fraction:.3f} of the original's time "
                 f"(target {target:g})")
        if abs(fraction - target) <= tolerance * target:
            break
        at_floor = expected > goal + 1e-6  # the allocator ran out of steps before reaching the goal
        if at_floor and fraction > target:
            break
        k = (1 - fraction) / (1 - expected) if expected < 1 and fraction < 1 else 1.0
        goal = min(0.999, max(1e-3, 1 - (1 - target) / max(k, 1e-3)))
    within = [t for t in tried if t[2] <= target * (1 + tolerance)]
    if not within:
        best = min(t[2] for t in tried)
        raise unreachable(target, terms, best, floor_hint)
    allocation, goal, fraction = max(within, key=lambda t: t[2])
    terms.measured_fraction = fraction
    return allocation, goal


def unreachable(target: float, terms: LatencyTerms, fastest: float, floor_hint: str = "") -> CompressError:
    """The error for a latency target that even the fastest allowed allocation misses, naming what it reaches."""
    at_least = math.ceil(round(fastest * 100, 6)) / 100
    return CompressError(f"--target-latency {target:g} cannot be reached on {terms.engine}: the fastest allocation "
                         f"allowed{floor_hint} measured {fastest:.3f} of the original's time per patch; choose "
                         f"--target-latency {at_least:.2f} or more{', or lower the floor' if floor_hint else ''}")


def measured_uniform(target: float, ranks_at: Callable[[float], object], measure: Callable[[object], float],
                     terms: LatencyTerms, progress=print, tolerance: float = TOLERANCE, steps: int = 5,
                     floor_hint: str = ""):
    """The largest uniform rank ratio whose MEASURED fraction of the original's time meets `target` (bisection on
    the ratio, `steps` measurements after the one at the floor); returns (ranks, ratio).

    The fallback when the per-layer model cannot reach a target the network can: timed one by one, a factorised
    low-resolution layer can look slower than the original (three calls instead of one), so the allocator leaves
    it out, while inside the whole network the engine runs it faster. Measuring the uniform family settles it.
    """
    lowest = ranks_at(1e-6)  # every mode at the rank floor
    fraction = measure(lowest)
    terms.rounds.append({"uniform_ratio": 0.0, "measured": fraction})
    if fraction > target * (1 + tolerance):
        raise unreachable(target, terms, fraction, floor_hint)
    lo, lo_ranks, lo_fraction, hi = 1e-6, lowest, fraction, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        ranks = ranks_at(mid)
        fraction = measure(ranks)
        terms.rounds.append({"uniform_ratio": mid, "measured": fraction})
        if fraction <= target * (1 + tolerance):
            lo, lo_ranks, lo_fraction = mid, ranks, fraction
        else:
            hi = mid
    progress(f"latency budget: the uniform --rank-ratio {lo:.3f} measured {lo_fraction:.3f} of the original's time")
    terms.measured_fraction = lo_fraction
    return lo_ranks, lo

