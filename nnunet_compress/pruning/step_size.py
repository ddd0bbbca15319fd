"""The step that reaches a pruning target removes only as many channels as reaching it takes.

Why: a Taylor step removes a share of the prunable channels, but the share of the cost those channels carry varies
from step to step, because the global ranking takes channels from cheap deep layers in one step and from expensive
full-resolution layers in the next. On the tiny demo model, steps of 10% of the channels removed between 7% and
24% of the FLOPs. The step that crossed the target went on past it: five of nine fine-tuning runs of
``benchmarks/distillation.py`` with a FLOP target of 0.5 ended at 0.41-0.44 of the parent's FLOPs. Those runs lost
filters the user had not asked to lose, and runs with the same target differed in cost by a quarter, so their Dice
could not be compared. The crossing step is therefore cut to the fewest of its lowest-ranked channels that still
reach the target.

The search is a bisection over the number of channels removed. Each candidate is costed on a meta-device copy of
the network (shapes only, no data, no compute), by the same FLOP counter that judges the target. A latency target is
not cut this way: its stop is measured on the engine after the step, because predicted seconds proved a poor guide
to where a step lands (see :func:`nnunet_compress.pruning.taylor.prune_until_target`).
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from nnunet_compress.costs import count_parameters, patch_flops
from nnunet_compress.pruning.surgery import prune_channels

Keep = dict[str, list[int]]

SIZED_METRICS = ("flops", "params")  # targets whose cost after a step can be computed from the shapes alone


def fewest_channels_reaching(choose: Callable[[int], Keep], reaches: Callable[[Keep], bool], n_max: int) -> Keep:
    """The keep of ``choose(n)`` for the smallest ``n <= n_max`` whose keep `reaches` the target.

    `choose(n)` keeps all but the ``n`` lowest-ranked channels. When removing ``n_max`` does not reach the target,
    the step is left as planned (``choose(n_max)``): the target is for later steps. Assumes that removing more of
    the ranking never raises the cost, which holds because ``choose(n + 1)`` removes what ``choose(n)`` removes
    and one channel more (for the global ranking; the per-layer scope's proportional split is close to it, and
    there a bisection still ends at a count that reaches the target).
    """
    planned = choose(n_max)
    if not planned or not reaches(planned):
        return planned
    low, high, best = 1, n_max, planned  # choose(high) reaches the target
    while low < high:
        middle = (low + high) // 2
        candidate = choose(middle)
        if candidate and reaches(candidate):
            high, best = middle, candidate
        else:
            low = middle + 1
    return best


class CostAfterStep:
    """The network's cost after a candidate step, as a fraction of `reference`, without touching the network.

    Built once per step from a meta-device copy; every candidate prunes a copy of that copy.
    """

    def __init__(self, net: nn.Module, metric: str, reference: float, input_channels: int, patch_size):
        if metric not in SIZED_METRICS:
            raise ValueError(f"a step can only be sized for {SIZED_METRICS}, not {metric!r}")
        self.meta = copy.deepcopy(net).to("meta")
        self.metric, self.reference = metric, float(reference)
        self.input_channels, self.patch_size = input_channels, tuple(patch_size)

    def fraction(self, keep: Keep) -> float:
        candidate = copy.deepcopy(self.meta)
        prune_channels(candidate, keep)
        if self.metric == "params":
            return count_parameters(candidate) / self.reference
        return patch_flops(candidate, self.input_channels, self.patch_size) / self.reference

    def reaches(self, target: float) -> Callable[[Keep], bool]:
        return lambda keep: self.fraction(keep) <= target
