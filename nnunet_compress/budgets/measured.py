"""``--target-latency`` on the engine: the original timed per patch, the cost model built for it, candidates
timed against it, and the per-layer seconds of the reports. Shared by the Tucker and the pruning budgets.

* :func:`latency_terms` measures the original network's seconds per patch on the engine (OpenVINO where it is
  installed and not switched off, else torch's CPU path) and builds the per-layer cost model the allocators spend
  the budget with (``--cost-model measured``: :mod:`.latency_model`, fitted to timings of this machine and
  cached; ``flops``: MACs × the network's seconds per MAC).
* :func:`measured_fraction` times a compressed network against the original, which :mod:`.calibration` uses to
  correct the prediction; :func:`pruning_latency` sets the same up for pruning.
* :func:`layer_seconds` and :func:`pruned_layer_seconds` give the reports their per-layer predicted and measured
  seconds.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Mapping

import torch
from torch import nn

from nnunet_compress.budgets.calibration import LatencyTerms
from nnunet_compress.budgets.channels import PredictedSeconds
from nnunet_compress.budgets.cost_model import ConvSite, FlopsCostModel, channel_requirements
from nnunet_compress.budgets.latency_model import measured_model
from nnunet_compress.budgets.timing import engine_in_use, patch_seconds, time_conv
from nnunet_compress.costs import COST_MODELS, conv_costs, layer_io_shapes, total_macs
from nnunet_compress.settings import check_choice


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
