"""Rank selection: the Tucker ranks of a network under a :class:`~nnunet_compress.tucker.ranks.RankPolicy`, the
one entry (:func:`select_ranks`) that ``tucker``, ``plan tucker`` and ``totalseg`` go through.

The non-budget policies (ratio, energy, ranks file) are rules of :mod:`nnunet_compress.tucker.ranks`. A budget
(``--target-params / -flops / -latency``) is allocated greedily by the same module, checked on calibration
patches against the uniform ratio of no greater cost (:mod:`nnunet_compress.tucker.budget_guard`) and, in
seconds, calibrated against the network measured on the CPU engine (:mod:`nnunet_compress.budgets`). Why this
sits with the workflows: the default calibration patches are synthetic CT phantoms through nnU-Net's
preprocessing (:mod:`nnunet_compress.nnunet.calibration`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

from torch import nn

from nnunet_compress.budgets.calibration import LatencyTerms, calibrated_allocation, measured_uniform
from nnunet_compress.budgets.cost_model import tucker_requirements
from nnunet_compress.budgets.measured import latency_terms, measured_fraction
from nnunet_compress.costs import count_parameters, input_channels, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.calibration import CalibrationSource, synthetic_calibration
from nnunet_compress.tucker import ranks as R
from nnunet_compress.tucker.budget_guard import (
    UNIFORM,
    BudgetSpace,
    CalibrationPatches,
    GuardSettings,
    guard_budget_ranks,
    layer_sensitivities,
)
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import RankPolicy, rank_floor


@dataclass
class RankSelection:
    """The chosen ranks, and for budget policies what the guard compared (None otherwise or when it is off) and,
    for --target-latency, what the latency calibration measured."""

    ranks: dict[str, tuple[int, int]]
    guard: dict | None = None
    latency: LatencyTerms | None = None


@dataclass(frozen=True)
class BudgetTerms:
    """What a budget policy spends: metric, target fraction of `base` (for seconds: the predicted goal that the
    measured calibration settled on), the per-layer cost (seconds only) and the latency measurements."""

    metric: str
    target: float
    base: float
    layer_cost: R.LayerCost | None = None
    latency: LatencyTerms | None = None

    def space(self, layers: dict, io_shapes: dict) -> BudgetSpace:
        return BudgetSpace(layers, io_shapes, self.base, self.metric, self.layer_cost)


def select_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...],
                 calibration: CalibrationSource | None = None, progress=print) -> RankSelection:
    """Ranks by `policy` for every layer to factorise (layers where factorising would not be cheaper are left
    out); budget policies are checked against the uniform ratio of the same cost.

    calibration: a callable returning (list of input batches, description) for the budget policies' guard and
    sensitivities, called at most once here and only when they need it (the patches cost a preprocessing run);
    None uses synthetic CT phantoms without plans (a bare network: z-scored HU). A latency budget also times the
    network on the CPU engine (:mod:`nnunet_compress.budgets.measured`).
    """
    policy.validate()
    layers, io_shapes = _layers_and_shapes(net, policy, patch_size)
    if not policy.is_budget:
        return RankSelection(_policy_ranks(policy, layers, io_shapes))
    if calibration is None:
        calibration = synthetic_calibration(None, None, None, input_channels(net), patch_size,
                                            policy.calibration_patches, policy.calibration_seed)
    patches = functools.cache(calibration)  # the sensitivities and the guard share one set of patches
    terms = _budget_terms(net, policy, layers, io_shapes, patch_size, progress)
    candidates, goal = _budget_candidates(net, policy, patch_size, patches, layers, io_shapes, terms, progress)
    terms = dataclasses.replace(terms, target=goal)
    if len(candidates) == 1 and not policy.guard:
        ranks, guard = next(iter(candidates.values())), None
    else:
        settings = GuardSettings(_guard_target(terms, layers, io_shapes, candidates), policy.min_rank,
                                 policy.multiple, compare_uniform=policy.guard)
        ranks, decision = guard_budget_ranks(net, candidates, terms.space(layers, io_shapes), settings,
                                             CalibrationPatches(*patches()))
        progress(decision.line())
        guard = decision.to_dict()
    if terms.latency is not None and ranks not in [r for r, _ in terms.latency.measured]:
        fraction = measured_fraction(net, factorised_copy(net, ranks), network_input_shape(net, patch_size),
                                     terms.latency)
        terms.latency.measured.append((ranks, fraction))
        terms.latency.measured_fraction = fraction
        progress(f"latency budget: the kept ranks measured {fraction:.3f} of the original's time")
    return RankSelection(ranks, guard, terms.latency)


def _guard_target(terms: BudgetTerms, layers: dict, io_shapes: dict, candidates: dict) -> float:
    """The cost the uniform ratio may reach in the guard's comparison: the budget's target, or for seconds the
    budget ranks' own predicted cost where that is higher (a goal the floors stopped short of)."""
    if terms.metric != "seconds":
        return terms.target
    space = terms.space(layers, io_shapes)
    return max([terms.target] + [space.fraction(r) for r in candidates.values()])


def _layers_and_shapes(net: nn.Module, policy: RankPolicy, patch_size) -> tuple[dict, dict]:
    """The layers the policy may factorise (every conv for a ranks file) and every layer's input/output size."""
    if policy.kind() == "ranks":
        layers = R.decomposable_layers(net, include_stem=True, include_pointwise=True)
    else:
        layers = R.decomposable_layers(net, include_stem=policy.include_stem,
                                       include_pointwise=policy.include_pointwise)
    return layers, layer_io_shapes(net, tuple(patch_size))


def network_input_shape(net: nn.Module, patch_size) -> tuple[int, ...]:
    """(channels, *patch): the input of one patch, as the engine timings take it."""
    return (input_channels(net), *tuple(int(s) for s in patch_size))


def factorised_copy(net: nn.Module, ranks: dict) -> nn.Module:
    """A copy of `net` with the factorised structure of `ranks` (default weights: timing depends on shapes only)."""
    compressed = copy.deepcopy(net)
    replace_convs(compressed, ranks, decompose=False)
    return compressed


def rank_floors(layers: dict, policy: RankPolicy) -> dict[str, tuple[int, int]]:
    """Each layer's lowest allowed (rank_out, rank_in): where the latency model's timings must start."""
    return {n: (rank_floor(c.out_channels, policy.min_rank, policy.multiple),
                rank_floor(c.in_channels, policy.min_rank, policy.multiple)) for n, c in layers.items()}


def _budget_terms(net: nn.Module, policy: RankPolicy, layers: dict, io_shapes: dict, patch_size,
                  progress) -> BudgetTerms:
    """The budget's metric, target and base; for --target-latency the engine's timings of the original and the
    cost model (measured now, or read from this machine's cache)."""
    metric, target = policy.budget
    if metric == "params":
        return BudgetTerms(metric, target, count_parameters(net))
    if metric == "flops":
        return BudgetTerms(metric, target, total_macs(net, io_shapes))
    latency = latency_terms(net, network_input_shape(net, patch_size), policy.cost_model,
                            lambda: tucker_requirements(layers, io_shapes, rank_floors(layers, policy)), progress)
    return BudgetTerms(metric, target, latency.base_seconds, latency.layer_cost, latency)


def _policy_ranks(policy: RankPolicy, layers: dict, io_shapes: dict) -> dict:
    """Ranks of the non-budget policies (ratio, energy, ranks file)."""
    kind = policy.kind()
    only_cheaper = not policy.replace_all
    if kind == "ranks":
        return R.ranks_fixed(layers, policy.ranks, io_shapes=io_shapes, only_cheaper=only_cheaper,
                             min_rank=policy.min_rank, multiple=policy.multiple)
    if kind == "ratio":
        return R.ranks_by_ratio(layers, policy.ratio, min_rank=policy.min_rank, multiple=policy.multiple,
                                io_shapes=io_shapes, only_cheaper=only_cheaper)
    return R.ranks_by_energy(layers, policy.energy, multiple=policy.multiple, io_shapes=io_shapes,
                             only_cheaper=only_cheaper, min_rank=policy.min_rank)


def _budget_candidates(net: nn.Module, policy: RankPolicy, patch_size, patches: CalibrationSource, layers: dict,
                       io_shapes: dict, terms: BudgetTerms, progress=print) -> tuple[dict[str, dict], float]:
    """The budget allocations `policy.budget_error` asks for, by name ("kernel", "sensitivity" or both), and the
    goal they were allocated at.

    The goal is the budget's target, except for a latency budget: it first finds, with the first allocation, the
    predicted goal at which the whole network's MEASURED time meets the target, and allocates the others at it.
    """
    params, macs = count_parameters(net), total_macs(net, io_shapes)

    def allocate(kind: str, target: float) -> dict:
        weights = None
        if kind == "sensitivity":
            batches, _ = patches()
            weights = layer_sensitivities(net, {n: c for n, c in layers.items() if n in io_shapes}, batches,
                                          seed=policy.calibration_seed)
        seconds = terms.base if terms.metric == "seconds" else None
        budget = R.NetworkBudget(target, params, macs, terms.metric, seconds=seconds, layer_cost=terms.layer_cost)
        return R.ranks_for_budget(layers, io_shapes, budget, multiple=policy.multiple, min_rank=policy.min_rank,
                                  weights=weights)

    if terms.metric != "seconds":  # fail before measuring anything (seconds: judged on the measured network)
        R.check_budget_reachable(layers, io_shapes, R.NetworkBudget(terms.target, params, macs, terms.metric),
                                 multiple=policy.multiple, min_rank=policy.min_rank)
    kinds = ("kernel", "sensitivity") if policy.budget_error == "best" else (policy.budget_error,)
    if terms.latency is None:
        return {kind: allocate(kind, terms.target) for kind in kinds}, terms.target
    input_shape = network_input_shape(net, patch_size)
    space = terms.space(layers, io_shapes)

    def measure(ranks: dict) -> float:
        if not ranks:  # nothing factorised: the original itself (timing it would only measure noise)
            return 1.0
        fraction = measured_fraction(net, factorised_copy(net, ranks), input_shape, terms.latency)
        terms.latency.measured.append((ranks, fraction))
        return fraction

    floor = f" (every decomposable layer at the rank floor --min-rank {policy.min_rank})"
    try:
        first, goal = calibrated_allocation(terms.target, lambda g: allocate(kinds[0], g), space.fraction, measure,
                                            terms.latency, progress)
    except CompressError as e:
        # the per-layer model left out layers the network runs faster factorised: measure the uniform family
        progress(f"latency budget: {e}; trying uniform rank ratios, measured")

        def uniform(ratio: float) -> dict:
            return R.ranks_by_ratio(layers, ratio, min_rank=policy.min_rank, multiple=policy.multiple,
                                    io_shapes=io_shapes)
        ranks, _ = measured_uniform(terms.target, uniform, measure, terms.latency, progress, floor_hint=floor)
        return {UNIFORM: ranks}, space.fraction(ranks)
    return {kinds[0]: first, **{kind: allocate(kind, goal) for kind in kinds[1:]}}, goal
