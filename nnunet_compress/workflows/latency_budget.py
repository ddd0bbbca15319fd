"""``--target-latency``: budgets in seconds per patch on the CPU engine that will run the model.

Three pieces, shared by the Tucker and the pruning budgets:

* :func:`latency_terms` measures the original network's seconds per patch on the engine (OpenVINO where it is
  installed and not switched off, else torch's CPU path) and builds the per-layer cost model the allocators spend
  the budget with (``--cost-model measured``: :mod:`nnunet_compress.inference.latency_model`, fitted to timings
  of this machine and cached; ``flops``: MACs × the network's seconds per MAC).
* :func:`calibrated_allocation` closes the loop the per-layer model leaves open: the allocation is made for a
  *predicted* fraction, the whole compressed network is then timed against the original (interleaved, same
  process), and the predicted goal is corrected by what was measured until the measured fraction is within
  ``tolerance`` of the target. A sum of per-layer times misses fusions, layout changes and the layers that are
  not decomposed; the measurement does not.
* :func:`layer_seconds` gives the reports their per-layer predicted and measured seconds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from nnunet_compress.costs import COST_MODELS, conv_costs, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.inference.conv_timing import ConvSite, engine_in_use, patch_seconds, time_conv
from nnunet_compress.inference.latency_model import FlopsCostModel, channel_requirements, measured_model
from nnunet_compress.pruning.latency import PredictedSeconds
from nnunet_compress.settings import check_choice

TOLERANCE = 0.05  # a measured fraction within 5% of the target is accepted
ROUNDS = 4  # allocations tried at corrected goals before settling for the best measured one


@dataclass
class LatencyTerms:
    """What a latency budget is spent in: the engine, the original's measured seconds, the per-layer model."""

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


def latency_terms(net: nn.Module, input_shape: tuple[int, ...], cost_model: str, needed: Callable[[], Mapping],
                  progress=print) -> LatencyTerms:
    """Measure the original per patch and build the cost model. `needed()` gives the sites the search may visit
    (called only for the measured model); `input_shape` is (channels, *patch)."""
    check_choice("--cost-model", cost_model, COST_MODELS)
    engine, threads = engine_in_use(), torch.get_num_threads()
    prepared: dict = {}
    base = patch_seconds([net], input_shape, engine, threads, prepared=prepared)[0]
    progress(f"latency budget: the original runs {base:.3f} s per patch {'x'.join(map(str, input_shape[1:]))} on "
             f"{engine} ({threads} threads); cost model: {cost_model}")
    if cost_model == "measured":
        model = measured_model(needed(), engine, threads, progress=progress)
    else:
        macs = total_macs(net, layer_io_shapes(net, tuple(input_shape[1:])))
        model = FlopsCostModel(base / max(macs, 1))
    return LatencyTerms(engine, threads, cost_model, base, model, prepared=prepared)


def measured_fraction(original: nn.Module, compressed: nn.Module, input_shape, terms: LatencyTerms) -> float:
    """Seconds per patch of `compressed` over the original's, timed interleaved in this process."""
    before, after = patch_seconds([original, compressed], input_shape, terms.engine, terms.threads,
                                  prepared=terms.prepared)
    for key in [k for k in terms.prepared if k[0] == id(compressed)]:
        del terms.prepared[key]  # candidates are timed once; only the original's compiled model is reused
    return after / before


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


def layer_seconds(conv: nn.Module, in_spatial, out_spatial, ranks, terms: LatencyTerms) -> dict:
    """Predicted and measured seconds of one layer before and after factorising it with `ranks` (out, in)."""
    def measured(site_ranks) -> float:
        if site_ranks is None:
            return time_conv(ConvSite.of(conv, in_spatial), conv.in_channels, conv.out_channels, terms.engine,
                             terms.threads)
        rank_out, rank_in = site_ranks
        return (time_conv(ConvSite.pointwise(in_spatial), conv.in_channels, rank_in, terms.engine, terms.threads)
                + time_conv(ConvSite.of(conv, in_spatial), rank_in, rank_out, terms.engine, terms.threads)
                + time_conv(ConvSite.pointwise(out_spatial), rank_out, conv.out_channels, terms.engine,
                            terms.threads))
    return {"predicted_before": terms.layer_cost(conv, in_spatial, out_spatial, None),
            "predicted_after": terms.layer_cost(conv, in_spatial, out_spatial, tuple(ranks)),
            "measured_before": measured(None), "measured_after": measured(tuple(ranks))}


def pruning_latency(net: nn.Module, input_shape: tuple[int, ...], cost_model: str, min_channels: int,
                    min_keep_fraction: float, progress=print):
    """For pruning to a latency target: (predicted seconds, measure(network) -> measured fraction, terms).

    The cost model covers every convolution from its floor (--min-channels / --min-keep-fraction) to its full
    channel counts; `measure` times a pruned network against an untouched copy of the original, interleaved.
    """
    original = copy.deepcopy(net).eval()
    io_shapes = layer_io_shapes(net, tuple(input_shape[1:]))

    def floor(channels: int) -> int:
        return min(channels, max(min_channels, math.ceil(min_keep_fraction * channels)))

    def needed():
        return channel_requirements((conv, io_shapes[name][0], (floor(conv.in_channels), conv.in_channels),
                                     (floor(conv.out_channels), conv.out_channels))
                                    for name, conv in net.named_modules()
                                    if isinstance(conv, nn.modules.conv._ConvNd) and name in io_shapes)
    terms = latency_terms(original, input_shape, cost_model, needed, progress)  # `net` changes: never cache it
    predicted = PredictedSeconds(net, io_shapes, terms.base_seconds, terms.model.layer_seconds)

    def measure(pruned: nn.Module) -> float:
        fraction = measured_fraction(original, pruned, input_shape, terms)
        terms.measured_fraction = fraction
        return fraction
    return predicted, measure, terms


def pruned_layer_seconds(original: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...],
                         terms: LatencyTerms) -> dict[str, dict]:
    """Per convolution of a pruned network: channels, MFLOPs, predicted and measured seconds before and after
    (the pruning report's per-layer table of a latency target)."""
    io_shapes = layer_io_shapes(original, tuple(input_shape[1:]))
    after = dict(pruned.named_modules())
    rows = {}
    for name, conv in original.named_modules():
        if not isinstance(conv, nn.modules.conv._ConvNd) or name not in io_shapes or name not in after:
            continue
        now = after[name]
        site = ConvSite.of(conv, io_shapes[name][0])
        rows[name] = {"channels_before": [conv.in_channels, conv.out_channels],
                      "channels_after": [now.in_channels, now.out_channels],
                      "mflops_before": 2 * conv_costs(conv, *io_shapes[name])[1] / 1e6,
                      "mflops_after": 2 * conv_costs(now, *io_shapes[name])[1] / 1e6,
                      "predicted_before": terms.model.layer_seconds(conv, *io_shapes[name]),
                      "predicted_after": terms.model.layer_seconds(conv, *io_shapes[name], None,
                                                                   (now.in_channels, now.out_channels)),
                      "measured_before": time_conv(site, conv.in_channels, conv.out_channels, terms.engine,
                                                   terms.threads),
                      "measured_after": time_conv(site, now.in_channels, now.out_channels, terms.engine,
                                                  terms.threads)}
    return rows
