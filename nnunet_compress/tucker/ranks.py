"""Which layers to factorise, and with which Tucker ranks.

Every policy returns ``{layer name: (rank_out, rank_in)}`` holding ONLY the layers that are to be replaced: a
factorised layer is kept only when it is cheaper than the original in parameters AND in multiply-accumulates
(see :func:`keep_only_cheaper`); near full rank the three factors together cost more than the original kernel,
and replacing such a layer would make the network bigger, slower and less exact at once.

Policies:
- :func:`ranks_by_ratio`  the paper's rule, one channel ratio for every layer;
- :func:`ranks_by_energy` per mode, the smallest rank keeping a share of the kernel's energy (squared singular
  values of that mode's unfolding), so layers with a fast-decaying spectrum get cut harder;
- :func:`ranks_fixed`     ranks given by the user, validated;
- :func:`ranks_for_budget` a global parameter or FLOP target for the whole network, spent greedily where the
  estimated reconstruction error per unit of saved cost is lowest.

Every policy honours the same rank floor: no mode gets a rank below ``min(min_rank, channels)`` rounded up to
the rank multiple (:func:`rank_floor`). A rank of 1 or 2 lets a layer see one or two linear combinations of its
inputs; on a trained nnU-Net the budget allocator, left without a floor, can choose such ranks and wreck the
segmentation (foreground Dice 0.92 -> 0.002 at the FLOPs where a uniform ratio keeps 0.92). The fixed-rank policy
refuses a rank below the floor instead of raising it silently: the user asked for that rank, and should lower
``min_rank`` explicitly if they mean it.

Ranks may be rounded up to a multiple (e.g. 8): GPUs run thin convolutions with channel counts that are not
multiples of 8 erratically slowly.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_compress.costs import COST_MODELS, conv_costs, is_pointwise
from nnunet_compress.errors import CompressError
from nnunet_compress.settings import Settings, check_choice, format_number_tag
from nnunet_compress.tucker.decomposition import channel_modes

Ranks = dict[str, tuple[int, int]]
IOShapes = Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]

DECOMPOSABLE_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# ---- which layers ----------------------------------------------------------------------------------------------


def decomposable_layers(net: nn.Module, include_stem: bool = False, include_pointwise: bool = False
                        ) -> dict[str, nn.Module]:
    """Every dense 2-d/3-d Conv/ConvTranspose of `net` in module order, by qualified name.

    Left out unless asked: the stem, i.e. the first conv in module order, which consumes the network input
    (``encoder.stages.0.0.convs.0.conv`` in PlainConvUNet, ``encoder.stem.convs.0.conv`` in ResidualEncoderUNet):
    with 1 or a few input channels it has almost nothing to gain and its errors reach every later layer. Also
    left out: 1×1(×1) convs (segmentation heads, residual projections), whose factorisation is never cheaper at
    useful ranks. Grouped convs are always left out (Tucker-2 needs dense channel mixing). Names are those of
    ``named_modules()``, which lists a module registered twice (nnU-Net's ``.conv`` / ``.all_modules.0``) once,
    under its first name.
    """
    layers: dict[str, nn.Module] = {}
    first_conv_seen = False
    for name, module in net.named_modules():
        if not isinstance(module, DECOMPOSABLE_TYPES):
            continue
        is_stem = not first_conv_seen
        first_conv_seen = True
        if module.groups != 1:
            continue
        if is_stem and not include_stem:
            continue
        if is_pointwise(module.kernel_size) and not include_pointwise:
            continue
        layers[name] = module
    return layers


# ---- rank arithmetic -------------------------------------------------------------------------------------------

def _check_multiple(multiple: int) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise CompressError(f"rank multiple {multiple!r} must be a positive integer (1 = no rounding, 8 suits GPUs)")


def round_rank(r: int, multiple: int, full: int) -> int:
    """`r` rounded UP to a multiple of `multiple`, capped at the channel count `full` (and at least 1)."""
    _check_multiple(multiple)
    rounded = math.ceil(max(int(r), 1) / multiple) * multiple
    return int(min(full, rounded))


def rank_floor(channels: int, min_rank: int, multiple: int = 1) -> int:
    """The lowest rank any policy may give a mode with `channels` channels.

    min_rank is capped at the channel count (a 4-channel mode keeps all 4 under the default floor of 8, i.e. it
    cannot be cut) and then rounded up to `multiple`, because a rank that is not a multiple is never chosen.
    """
    return round_rank(min(int(min_rank), int(channels)), multiple, channels)


def ratio_rank(channels: int, ratio: float, min_rank: int = 8, multiple: int = 1) -> int:
    """The reference code's rule R = min(C, max(min_rank, ceil(C·ratio))), then rounded up to `multiple`."""
    # round() first: 100 * 0.55 is 55.00000000000001 in floating point, and ceil() would make it 56, not 55
    raw = math.ceil(round(channels * ratio, 9))
    return round_rank(min(channels, max(min_rank, raw)), multiple, channels)


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float, np.floating)) or not 0 < ratio <= 1:
        raise CompressError(f"rank ratio {ratio!r} is outside (0, 1]; e.g. 0.3 keeps 30% of each layer's channels "
                            f"as its rank")


def _check_min_rank(min_rank: int) -> None:
    if isinstance(min_rank, bool) or not isinstance(min_rank, (int, np.integer)) or min_rank < 1:
        raise CompressError(f"minimum rank {min_rank!r} must be a positive integer")


# ---- cost filter -----------------------------------------------------------------------------------------------

def _spatial_sizes(name: str, conv: nn.Module, io_shapes: IOShapes | None
                   ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(input, output) spatial size of the layer; None when the measured forward pass did not run it."""
    if io_shapes is None:  # same resolution on both sides: the comparison becomes a per-voxel one
        ones = (1,) * len(conv.kernel_size)
        return ones, ones
    if name not in io_shapes:
        return None
    in_spatial, out_spatial = io_shapes[name]
    return tuple(in_spatial), tuple(out_spatial)


def is_cheaper(conv: nn.Module, ranks: tuple[int, int], in_spatial: tuple[int, ...],
               out_spatial: tuple[int, ...]) -> bool:
    """Whether the factorised layer costs strictly less than the original in parameters and in MACs."""
    params0, macs0 = conv_costs(conv, in_spatial, out_spatial)
    params1, macs1 = conv_costs(conv, in_spatial, out_spatial, ranks=ranks)
    return params1 < params0 and macs1 < macs0


def keep_only_cheaper(layers: Mapping[str, nn.Module], ranks: Mapping[str, tuple[int, int]],
                      io_shapes: IOShapes | None = None) -> Ranks:
    """`ranks` without the layers whose replacement is not cheaper in params AND in MACs than the original.

    io_shapes None compares at equal input/output resolution, where the MAC comparison equals the parameter one.
    Layers missing from io_shapes were not run by the forward pass that measured it (e.g. the deep-supervision
    heads of a network built with deep_supervision=False, as nnU-Net predicts): they are left out too, since
    factorising a layer that inference does not run buys nothing.
    """
    kept: Ranks = {}
    for name, layer_ranks in ranks.items():
        if name not in layers:
            raise CompressError(f"ranks given for '{name}', which is not among the decomposable layers")
        conv = layers[name]
        sizes = _spatial_sizes(name, conv, io_shapes)
        r_out, r_in = int(layer_ranks[0]), int(layer_ranks[1])
        if sizes is not None and is_cheaper(conv, (r_out, r_in), *sizes):
            kept[name] = (r_out, r_in)
    return kept


def _finish(layers: Mapping[str, nn.Module], ranks: Ranks, io_shapes: IOShapes | None, only_cheaper: bool) -> Ranks:
    return keep_only_cheaper(layers, ranks, io_shapes) if only_cheaper else ranks


# ---- policies --------------------------------------------------------------------------------------------------

def ranks_by_ratio(layers: Mapping[str, nn.Module], ratio: float, min_rank: int = 8, multiple: int = 1,
                   io_shapes: IOShapes | None = None, only_cheaper: bool = True) -> Ranks:
    """The paper's rule: every mode keeps ceil(C·ratio) channels (at least min_rank, at most C)."""
    _check_ratio(ratio)
    _check_min_rank(min_rank)
    _check_multiple(multiple)
    ranks = {name: (ratio_rank(conv.out_channels, ratio, min_rank, multiple),
                    ratio_rank(conv.in_channels, ratio, min_rank, multiple))
             for name, conv in layers.items()}
    return _finish(layers, ranks, io_shapes, only_cheaper)


def mode_energies(conv: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (descending) of the out- and in-channel unfoldings of the kernel.

    Always one value per channel, zeros included, so that entries r.. are what a rank r discards even when the
    unfolding has fewer non-zero singular values than channels (e.g. the stem: 32 outputs, 1 input × 27 taps).
    Computed as the eigenvalues of the C×C Gram matrix of the unfolding: the same numbers as squared singular
    values, at a fraction of the cost of an SVD of a 320 × 8640 unfolding (what matters for a 30 M network).
    """
    weight = conv.weight.detach().double().cpu().numpy()
    energies = []
    for mode in channel_modes(conv):
        unfolding = np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)
        eigenvalues = np.linalg.eigvalsh(unfolding @ unfolding.T)[::-1]
        energies.append(np.clip(eigenvalues, 0.0, None))  # round-off can make zeros slightly negative
    return energies[0], energies[1]


def energy_rank(squared_singular_values: np.ndarray, energy: float, multiple: int = 1) -> int:
    """Smallest rank whose leading squared singular values hold at least `energy` of their sum."""
    full = len(squared_singular_values)
    total = float(np.sum(squared_singular_values))
    if total <= 0:  # an all-zero kernel: any rank reconstructs it
        return round_rank(1, multiple, full)
    kept = np.cumsum(squared_singular_values) / total
    rank = int(np.searchsorted(kept, energy - 1e-12, side="left")) + 1
    return round_rank(min(rank, full), multiple, full)


def ranks_by_energy(layers: Mapping[str, nn.Module], energy: float, multiple: int = 1,
                    io_shapes: IOShapes | None = None, only_cheaper: bool = True, min_rank: int = 8) -> Ranks:
    """Per mode, the smallest rank keeping `energy` of the squared singular values of that mode's unfolding,
    but never below the rank floor (:func:`rank_floor`): a fast-decaying spectrum says little about what a rank
    of 1 costs the network's output."""
    if not isinstance(energy, (int, float, np.floating)) or not 0 < energy <= 1:
        raise CompressError(f"energy {energy!r} is outside (0, 1]; e.g. 0.9 keeps 90% of each kernel mode's energy")
    _check_multiple(multiple)
    _check_min_rank(min_rank)
    ranks: Ranks = {}
    for name, conv in layers.items():
        out_energy, in_energy = mode_energies(conv)
        ranks[name] = (max(energy_rank(out_energy, energy, multiple), rank_floor(conv.out_channels, min_rank, multiple)),
                       max(energy_rank(in_energy, energy, multiple), rank_floor(conv.in_channels, min_rank, multiple)))
    return _finish(layers, ranks, io_shapes, only_cheaper)


def ranks_fixed(layers: Mapping[str, nn.Module], spec: Mapping[str, Sequence[int]],
                io_shapes: IOShapes | None = None, only_cheaper: bool = True, min_rank: int = 8,
                multiple: int = 1) -> Ranks:
    """User-given ranks ``{layer name: [rank_out, rank_in]}``, validated against the layers' channel counts,
    the rank floor and the rank multiple.

    A rank below the floor is refused, not raised: the file states what the user wants, so silently changing it
    would hide the problem; who means rank 2 says so with ``min_rank`` 2 (``--min-rank 2``).
    """
    _check_min_rank(min_rank)
    _check_multiple(multiple)
    if not isinstance(spec, Mapping) or not spec:
        raise CompressError("the ranks file must be a non-empty JSON object {layer name: [rank_out, rank_in]}")
    ranks: Ranks = {}
    for name, given in spec.items():
        if name not in layers:
            known = list(layers)
            hint = ", ".join(known[:4]) + (", ..." if len(known) > 4 else "")
            raise CompressError(f"unknown layer '{name}' in the ranks; decomposable layers are named as in "
                                f"named_modules(), e.g. {hint}")
        ranks[name] = _validated_pair(name, layers[name], given)
        _check_floor_and_multiple(name, layers[name], ranks[name], min_rank, multiple)
    return _finish(layers, ranks, io_shapes, only_cheaper)


def _check_floor_and_multiple(name: str, conv: nn.Module, ranks: tuple[int, int], min_rank: int,
                              multiple: int) -> None:
    """Refuse a fixed rank below the floor or off the multiple grid (full rank is always allowed)."""
    for what, rank, channels in (("rank_out", ranks[0], conv.out_channels), ("rank_in", ranks[1], conv.in_channels)):
        floor = rank_floor(channels, min_rank, multiple)
        if rank < floor:
            capped = f", capped at the layer's {channels} channels" if channels < min_rank else ""
            raise CompressError(f"layer '{name}': {what} {rank} is below the rank floor {floor} (--min-rank "
                                f"{min_rank}{capped}); give at least {floor}, or pass --min-rank {rank} if you "
                                f"mean a rank that low")
        if rank != channels and rank % multiple:
            raise CompressError(f"layer '{name}': {what} {rank} is not a multiple of --rank-multiple {multiple} "
                                f"(nor the full {channels}); use {rank // multiple * multiple or multiple} or "
                                f"{round_rank(rank, multiple, channels)}, or pass --rank-multiple 1")


def _validated_pair(name: str, conv: nn.Module, given) -> tuple[int, int]:
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != 2 or \
            not all(_is_integral(r) for r in given):
        raise CompressError(f"layer '{name}': ranks must be two integers [rank_out, rank_in], got {given!r}")
    r_out, r_in = int(given[0]), int(given[1])
    for what, rank, channels in (("rank_out", r_out, conv.out_channels), ("rank_in", r_in, conv.in_channels)):
        if not 1 <= rank <= channels:
            raise CompressError(f"layer '{name}': {what} {rank} is outside 1..{channels} (its channel count); "
                                f"choose a rank between 1 and {channels}")
    return r_out, r_in


def _is_integral(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, float) and value.is_integer()


# ---- global budget ---------------------------------------------------------------------------------------------

_METRICS = ("params", "flops", "seconds")
_FLAGS = {"params": "--target-params", "flops": "--target-flops", "seconds": "--target-latency"}

# (conv, input spatial size, output spatial size, Tucker ranks (out, in) or None for the conv itself) -> cost
LayerCost = Callable[[nn.Module, tuple, tuple, "tuple[int, int] | None"], float]


@dataclass(frozen=True)
class NetworkBudget:
    """A whole-network budget: keep `target` × the network's total `metric` ("params", "flops" or "seconds").

    The totals are the WHOLE network's, so layers that are not decomposed count too: `params` and `macs` always
    (they also decide whether a factorisation is cheaper than its layer); for seconds, `seconds` is the network's
    measured time per patch and `layer_cost` a latency model's per-layer prediction, so that what is not
    decomposed, norms and activations included, counts in full.
    """

    target: float
    params: int
    macs: int
    metric: str = "params"
    seconds: float | None = None
    layer_cost: LayerCost | None = None

    @property
    def base(self) -> float | None:
        """The network's total in the budget's metric."""
        return {"params": self.params, "flops": self.macs, "seconds": self.seconds}.get(self.metric)


def metric_cost(metric: str, layer_cost: LayerCost | None = None) -> LayerCost:
    """The per-layer cost of a budget metric: parameters or MACs counted, or seconds from `layer_cost` (a
    latency model's ``layer_seconds``, see :mod:`nnunet_compress.budgets.cost_model`)."""
    if metric == "seconds":
        if layer_cost is None:
            raise CompressError("a latency budget needs a cost model (the layers' predicted seconds)")
        return layer_cost
    if metric not in _METRICS:
        raise CompressError(f"budget metric {metric!r} is not one of {', '.join(_METRICS)}")
    index = _METRICS.index(metric)
    return lambda conv, in_spatial, out_spatial, ranks=None: conv_costs(conv, in_spatial, out_spatial,
                                                                         ranks=ranks)[index]


@dataclass
class _BudgetLayer:
    """Greedy state of one layer: its rank ladders, current position, and what its spectrum says about error."""

    name: str
    conv: nn.Module
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    ladders: tuple[list[int], list[int]]  # allowed ranks per mode (out, in), descending from full
    energies: tuple[np.ndarray, np.ndarray]  # squared singular values per mode (out, in)
    norm2: float  # ||W||²
    cost: LayerCost  # the budget metric of the layer, factorised (ranks) or not (None)
    unit: float = 1.0  # smallest saving that counts in a step's priority: one parameter/MAC, or a nanosecond
    weight: float = 1.0  # how much the network amplifies this layer's relative error (1: kernel error alone)
    position: list[int] = field(default_factory=lambda: [0, 0])
    version: int = 0

    @property
    def ranks(self) -> tuple[int, int]:
        return self.ladders[0][self.position[0]], self.ladders[1][self.position[1]]

    def ranks_after_step(self, mode: int) -> tuple[int, int] | None:
        if self.position[mode] + 1 >= len(self.ladders[mode]):
            return None
        ranks = list(self.ranks)
        ranks[mode] = self.ladders[mode][self.position[mode] + 1]
        return ranks[0], ranks[1]

    def tucker_cost(self, ranks: tuple[int, int]) -> float:
        return self.cost(self.conv, self.in_spatial, self.out_spatial, ranks)

    def saving(self, ranks: tuple[int, int]) -> int:
        """What replacing the layer with these ranks saves in the metric; 0 if it would not be replaced."""
        if not is_cheaper(self.conv, ranks, self.in_spatial, self.out_spatial):
            return 0
        original = self.cost(self.conv, self.in_spatial, self.out_spatial, None)
        return max(0, original - self.tucker_cost(ranks))  # a factorisation predicted slower saves nothing

    def step_priority(self, mode: int) -> tuple[float, int] | None:
        """(estimated relative squared error added per unit of cost saved, cost saved) of one step down."""
        after = self.ranks_after_step(mode)
        if after is None:
            return None
        before = self.ranks
        discarded = float(np.sum(self.energies[mode][after[mode]:before[mode]]))
        added_error = self.weight * discarded / self.norm2 if self.norm2 > 0 else 0.0
        cost_saved = self.tucker_cost(before) - self.tucker_cost(after)
        return added_error / max(cost_saved, self.unit), cost_saved


def rank_ladder(full: int, multiple: int, min_rank: int) -> list[int]:
    """Allowed ranks of one mode, descending: full, then multiples of `multiple` down to the rank floor."""
    floor = rank_floor(full, min_rank, multiple)
    largest_below_full = (full - 1) // multiple * multiple
    return [full] + [r for r in range(largest_below_full, floor - 1, -multiple) if r >= 1]


def ranks_for_budget(layers: Mapping[str, nn.Module], io_shapes: IOShapes, budget: NetworkBudget, *,
                     multiple: int = 1, min_rank: int = 8, weights: Mapping[str, float] | None = None) -> Ranks:
    """Ranks that bring the WHOLE network to `budget` (a fraction of its parameters, MACs or seconds), losing as
    little as possible.

    Greedy from full ranks: repeatedly lower one mode of one layer by one step (to the next multiple of
    `multiple`) where the estimated relative squared reconstruction error added per unit of cost saved is
    lowest, until the network total is at or below the target (for seconds: or every layer is at its floor; what
    is reachable is judged on the measured network, not on predictions). The error estimate is the truncated-HOSVD bound:
    discarding singular values of a mode unfolding adds their squares to ||W - Ŵ||², and we normalise by ||W||²
    so that layers of any scale compare. Costs are measured on the factorised layer (which always shrinks with
    the rank); a layer only counts as saving once its factorisation is cheaper than the original in params and
    MACs, and only such layers are returned. Layers missing from io_shapes (not run by its forward pass) are
    left out. A heap with lazily invalidated entries keeps this fast for large networks.

    `weights` (layer -> factor, e.g. :func:`nnunet_compress.tucker.budget_guard.layer_sensitivities`) scale each layer's
    error estimate by how much the network amplifies it, so the error being traded is the network output's
    rather than the kernel's; layers without a weight count 1.
    """
    states, base, goal = _budget_states(layers, io_shapes, budget, multiple, min_rank)
    for state in states:
        state.weight = _checked_weight(state.name, (weights or {}).get(state.name, 1.0))

    total = base
    counter = itertools.count()
    heap: list[tuple[float, int, int, int, int, int]] = []

    def push_steps(index: int) -> None:
        state = states[index]
        for mode in (0, 1):
            priority = state.step_priority(mode)
            if priority is not None:
                ratio, saved = priority
                heapq.heappush(heap, (ratio, -saved, next(counter), index, mode, state.version))

    for index in range(len(states)):
        push_steps(index)
    while total > goal and heap:
        _, _, _, index, mode, version = heapq.heappop(heap)
        state = states[index]
        if version != state.version:
            continue  # the layer changed since this entry was computed
        before = state.saving(state.ranks)
        state.position[mode] += 1
        state.version += 1
        total -= state.saving(state.ranks) - before
        push_steps(index)
    chosen = {s.name: s.ranks for s in states if s.saving(s.ranks) > 0}
    return keep_only_cheaper(layers, chosen, io_shapes)


def check_budget_reachable(layers: Mapping[str, nn.Module], io_shapes: IOShapes, budget: NetworkBudget, *,
                           multiple: int = 1, min_rank: int = 8) -> None:
    """Refuse bad budget input and budgets the rank floor cannot meet, before anything costly is measured."""
    _budget_states(layers, io_shapes, budget, multiple, min_rank)


def _budget_states(layers: Mapping[str, nn.Module], io_shapes: IOShapes, budget: NetworkBudget, multiple: int,
                   min_rank: int) -> tuple[list["_BudgetLayer"], float, float]:
    """Validated greedy start: (per-layer states at full rank, network total, goal in the metric)."""
    metric, target = budget.metric, budget.target
    if metric not in _METRICS:
        raise CompressError(f"budget metric {metric!r} is not one of {', '.join(_METRICS)}")
    if not isinstance(target, (int, float, np.floating)) or not 0 < target < 1:
        raise CompressError(f"target {target!r} is outside (0, 1); it is the fraction of the original network "
                            f"to keep, e.g. 0.2")
    _check_multiple(multiple)
    _check_min_rank(min_rank)
    if io_shapes is None:
        raise CompressError("a parameter/FLOP budget needs the layers' input/output sizes; pass "
                            "costs.layer_io_shapes(net, patch_size)")
    base = budget.base
    cost = metric_cost(metric, budget.layer_cost)
    if base is None or not base > 0:
        raise CompressError(f"the network's total {metric} must be positive, got {base}")
    # layers the measured forward pass did not run are left out, as in keep_only_cheaper
    states = [_budget_layer(name, conv, io_shapes, cost, multiple, min_rank, 1e-9 if metric == "seconds" else 1.0)
              for name, conv in layers.items() if name in io_shapes]
    goal = target * base
    if metric != "seconds":  # predicted seconds are corrected by measurement afterwards (budgets.calibration),
        _check_reachable(states, base, goal, target, metric, min_rank, multiple)  # which judges reachability
    return states, base, goal


def _checked_weight(name: str, weight) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise CompressError(f"layer '{name}': error weight {weight!r} must be finite and non-negative")
    return weight


def _budget_layer(name: str, conv: nn.Module, io_shapes: IOShapes, cost: LayerCost, multiple: int,
                  min_rank: int, unit: float) -> _BudgetLayer:
    in_spatial, out_spatial = io_shapes[name]
    ladders = (rank_ladder(conv.out_channels, multiple, min_rank), rank_ladder(conv.in_channels, multiple, min_rank))
    norm2 = float(torch.sum(conv.weight.detach().double() ** 2))
    return _BudgetLayer(name, conv, in_spatial, out_spatial, ladders, mode_energies(conv), norm2, cost=cost, unit=unit)


def _check_reachable(states: list[_BudgetLayer], base: float, goal: float, target: float, metric: str,
                     min_rank: int, multiple: int) -> None:
    """Fail early, naming the best fraction possible: every layer at its lowest allowed ranks."""
    best = base - sum(max(0.0, s.saving((s.ladders[0][-1], s.ladders[1][-1]))) for s in states)
    if best > goal:
        flag = _FLAGS[metric]
        raise CompressError(f"{flag} {target:g} cannot be reached: with all {len(states)} decomposable layers at "
                            f"the rank floor (--min-rank {min_rank}, --rank-multiple {multiple}) the network keeps "
                            f"{best / base:.4f} of its {metric}; choose {flag} {math.ceil(best / base * 1e4) / 1e4:.4f} "
                            f"or more, or lower --min-rank (ranks below 8 can wreck a trained model) / include more "
                            f"layers (--include-stem, --include-pointwise)")


# ---- the policy: which of the rules above, with which settings -------------------------------------------

@dataclass
class RankPolicy(Settings):
    """How ranks are chosen: exactly one of ratio / ranks / energy / target_params / target_flops /
    target_latency."""

    label = "rank policy"

    ratio: float | None = None
    ranks: dict[str, list[int]] | None = None
    energy: float | None = None
    target_params: float | None = None
    target_flops: float | None = None
    target_latency: float | None = None  # fraction of the original's measured seconds per patch on the CPU engine
    min_rank: int = 8
    multiple: int = 1
    include_stem: bool = False
    include_pointwise: bool = False
    replace_all: bool = False  # also replace layers whose factorisation is not cheaper (e.g. full-rank checks)
    # budget policies only (see nnunet_compress.tucker.budget_guard):
    guard: bool = True  # fall back to the uniform ratio of no greater cost where it changes the output less
    # allocator's per-layer error: the bare "kernel" reconstruction error, "sensitivity"-weighted, or "best": both
    # allocations, keeping the one that changes the network output least on the calibration patches. "kernel" is
    # the default: on the trained tiny nnU-Net at 0.18 of the FLOPs the sensitivity-weighted allocation changed the
    # held-out outputs more than the kernel one (benchmarks/budget_policies.py), and it costs a backward pass per
    # patch.
    budget_error: str = "kernel"
    calibration_patches: int = 4  # patches the guard and the sensitivities are measured on
    calibration_seed: int = 0  # which patches (and which synthetic phantoms) are cut, and the sensitivity probes
    # target_latency only: how a layer's seconds are predicted, "measured" (timings of this machine's engine, see
    # nnunet_compress.budgets.cost_model) or "flops" (its MACs x the network's seconds per MAC)
    cost_model: str = "measured"

    def kind(self) -> str:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise CompressError("choose exactly one rank policy: --rank-ratio, --ranks, --energy, "
                                "--target-params, --target-flops or --target-latency")
        return given[0]

    def validate(self) -> "RankPolicy":
        kind = self.kind()
        if kind == "ratio" and not 0 < self.ratio <= 1:
            raise CompressError(f"--rank-ratio {self.ratio} is outside (0, 1]; e.g. 0.3 keeps 30% of the channels "
                                f"as rank")
        if kind == "energy" and not 0 < self.energy <= 1:
            raise CompressError(f"--energy {self.energy} is outside (0, 1]; e.g. 0.9 keeps 90% of the energy")
        for name in ("target_params", "target_flops", "target_latency"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                what = "time per patch" if name == "target_latency" else "network"
                raise CompressError(f"--{name.replace('_', '-')} {value} is outside (0, 1); it is the fraction "
                                    f"of the original {what} to keep, e.g. 0.2")
        if self.min_rank < 1:
            raise CompressError(f"--min-rank {self.min_rank} must be at least 1")
        if self.multiple < 1:
            raise CompressError(f"--rank-multiple {self.multiple} must be at least 1")
        check_choice("--budget-error", self.budget_error, BUDGET_ERRORS)
        check_choice("--cost-model", self.cost_model, COST_MODELS)
        if self.calibration_patches < 1:
            raise CompressError(f"--calibration-patches {self.calibration_patches} must be at least 1")
        return self

    @property
    def is_budget(self) -> bool:
        return self.kind() in ("target_params", "target_flops", "target_latency")

    @property
    def budget(self) -> tuple[str, float] | None:
        """(metric, target fraction) of a budget policy: "params", "flops" or "seconds"; None otherwise."""
        kind = self.kind()
        metric = {"target_params": "params", "target_flops": "flops", "target_latency": "seconds"}.get(kind)
        return (metric, getattr(self, kind)) if metric else None

    @property
    def needs_weights(self) -> bool:
        return self.kind() in ("energy", "target_params", "target_flops", "target_latency")

    def tag(self) -> str:
        kind = self.kind()
        suffix = "" if self.multiple == 1 else f"m{self.multiple}"
        if kind == "ratio":
            return f"tucker{format_number_tag(self.ratio)}{suffix}"
        if kind == "energy":
            return f"tuckerE{format_number_tag(self.energy)}{suffix}"
        if kind == "target_params":
            return f"tuckerP{format_number_tag(self.target_params)}{suffix}"
        if kind == "target_flops":
            return f"tuckerF{format_number_tag(self.target_flops)}{suffix}"
        if kind == "target_latency":
            return f"tuckerL{format_number_tag(self.target_latency)}{suffix}"
        return "tuckerRanks"

    def to_dict(self) -> dict:
        """The policy as recorded in plans and reports; the budget-only settings only for budget policies."""
        d = super().to_dict()
        if not self.is_budget:
            for key in _BUDGET_ONLY:
                d.pop(key, None)
        if self.kind() != "target_latency":
            d.pop("cost_model", None)
        return d

BUDGET_ERRORS = ("best", "kernel", "sensitivity")

_KINDS = ("ratio", "ranks", "energy", "target_params", "target_flops", "target_latency")
_BUDGET_ONLY = ("guard", "budget_error", "calibration_patches", "calibration_seed", "cost_model")
