"""The budget policies' safety net: never ship budget ranks that change the network's output more than the
uniform rank ratio of the same cost would.

The budget allocator (:func:`nnunet_compress.tucker.ranks.ranks_for_budget`) trades an *estimate* of error against cost,
layer by layer; the estimate is a kernel's reconstruction error, which says nothing about how much the network's
output moves when that layer changes. On a trained nnU-Net it can choose ranks that keep 0.002 foreground Dice
where the uniform ratio at the same FLOPs keeps 0.92. So after the allocator has chosen, the guard measures, on a
few calibration patches, the relative change of the whole network's output logits

    ||f_compressed(x) - f(x)|| / ||f(x)||  (summed over the patches)

for the budget ranks and for the uniform ``--rank-ratio`` whose cost is the closest to the budget without
exceeding it (found by bisection on the ratio), and keep whichever changes the output less.

Also here: the per-layer output sensitivities that make the allocator's error network-aware
(:func:`layer_sensitivities`): a Hutchinson estimate of how strongly a perturbation of each layer's output moves
the network output, from one backward pass per patch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import IOShapes, LayerCost, Ranks, metric_cost, ranks_by_ratio

# ---- costs -----------------------------------------------------------------------------------------------------

def network_fraction(layers: Mapping[str, nn.Module], ranks: Mapping[str, tuple[int, int]], io_shapes: IOShapes,
                     base: float, metric: str, layer_cost: LayerCost | None = None) -> float:
    """Fraction of the whole network's params, MACs or (predicted) seconds (`base`) left after factorising `ranks`.

    Counted as the budget allocator counts: what each factorised layer saves, taken off the network total.
    """
    cost = metric_cost(metric, layer_cost)
    saved = 0.0
    for name, pair in ranks.items():
        conv = layers[name]
        sizes = io_shapes[name]
        saved += cost(conv, *sizes, None) - cost(conv, *sizes, tuple(pair))
    return (base - saved) / base


@dataclass(frozen=True)
class BudgetSpace:
    """What a budget's cost is counted in: the layers it may factorise, every layer's input/output size, the whole
    network's total (`base`) in `metric` ("params", "flops" or "seconds") and, for seconds, the per-layer cost."""

    layers: Mapping[str, nn.Module]
    io_shapes: IOShapes
    base: float
    metric: str
    layer_cost: LayerCost | None = None

    def fraction(self, ranks: Mapping[str, tuple[int, int]]) -> float:
        """The network's cost left after factorising `ranks`, as a fraction of `base`."""
        return network_fraction(self.layers, ranks, self.io_shapes, self.base, self.metric, self.layer_cost)


@dataclass(frozen=True)
class GuardSettings:
    """How the guard compares: the cost fraction the uniform ratio may reach, the rank floor and multiple it obeys,
    and whether it competes at all (off: --no-budget-guard, only the budget candidates are compared)."""

    target: float
    min_rank: int
    multiple: int
    compare_uniform: bool = True


@dataclass(frozen=True)
class CalibrationPatches:
    """The patches the output change is measured on, and where they came from (recorded in the reports)."""

    batches: Sequence[torch.Tensor]
    source: str


def uniform_ratio_within(space: BudgetSpace, target: float, min_rank: int, multiple: int,
                         iterations: int = 40) -> tuple[float, Ranks, float] | None:
    """(ratio, ranks, cost fraction) of the largest uniform rank ratio whose cost does not exceed `target`.

    Bisection is valid because the cost only grows with the ratio: every rank grows, and a layer whose
    factorisation stops being cheaper is dropped (back to its original cost, still no more than the factorised
    one). None when even the smallest ratio (every mode at the floor) costs more than the target.
    """
    def cost(ratio: float) -> tuple[Ranks, float]:
        ranks = ranks_by_ratio(space.layers, ratio, min_rank=min_rank, multiple=multiple, io_shapes=space.io_shapes)
        return ranks, space.fraction(ranks)

    lo, hi = 1e-9, 1.0
    lo_ranks, lo_cost = cost(lo)
    if lo_cost > target:
        return None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        mid_ranks, mid_cost = cost(mid)
        if mid_cost <= target:
            lo, lo_ranks, lo_cost = mid, mid_ranks, mid_cost
        else:
            hi = mid
    return lo, lo_ranks, lo_cost


# ---- output change ---------------------------------------------------------------------------------------------

def _logits(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The full-resolution output (nnU-Net returns a list under deep supervision; its first entry)."""
    out = net(batch)
    return out[0] if isinstance(out, (list, tuple)) else out


@torch.no_grad()
def reference_outputs(net: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The uncompressed network's logits on every batch (computed once, compared against twice)."""
    was_training = net.training
    net.eval()
    try:
        return [_logits(net, b).detach().double() for b in batches]
    finally:
        net.train(was_training)


@torch.no_grad()
def output_change(net: nn.Module, ranks: Mapping[str, tuple[int, int]], batches: Sequence[torch.Tensor],
                  references: Sequence[torch.Tensor]) -> float:
    """Relative change of the logits when `net`'s layers are Tucker-factorised with `ranks` (`net` is untouched)."""
    compressed = copy.deepcopy(net)
    replace_convs(compressed, ranks)
    compressed.eval()
    diff2 = ref2 = 0.0
    for batch, reference in zip(batches, references):
        out = _logits(compressed, batch).double()
        diff2 += float(torch.sum((out - reference) ** 2))
        ref2 += float(torch.sum(reference ** 2))
    return math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf)


# ---- the guard -------------------------------------------------------------------------------------------------

UNIFORM = "uniform"


@dataclass
class GuardDecision:
    """What the guard compared and kept; recorded in the compression report and the plans.

    candidates: name -> {"cost": fraction of the metric, "output_change": relative change of the logits, and for
    the uniform ratio "ratio"}. The flat fields repeat the best budget candidate and the uniform ratio, the two
    numbers a reader compares.
    """

    chosen: str
    metric: str
    target: float
    candidates: dict
    calibration: str  # where the patches came from
    patches: int
    budget_cost: float = math.nan
    budget_output_change: float = math.nan
    uniform_ratio: float | None = None
    uniform_cost: float | None = None
    uniform_output_change: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The one line printed after the comparison: what was measured and which ranks are used."""
        measured = "; ".join(f"{name} ranks{_uniform_label(entry)} {entry['output_change']:.4f}"
                             for name, entry in self.candidates.items())
        head = f"budget guard (relative output change on {self.patches} {self.calibration} patches): {measured}"
        if self.chosen == UNIFORM:
            return f"{head}: the budget ranks change the output more, falling back to the uniform ranks"
        return f"{head}: using the {self.chosen} ranks"


def _uniform_label(entry: dict) -> str:
    return f" (--rank-ratio {entry['ratio']:.4f}, {entry['cost']:.4f} of the cost)" if "ratio" in entry else ""


def guard_budget_ranks(net: nn.Module, candidates: Mapping[str, Ranks], space: BudgetSpace, settings: GuardSettings,
                       patches: CalibrationPatches) -> tuple[Ranks, GuardDecision]:
    """Of the budget allocations in `candidates` (and, with settings.compare_uniform, the uniform-ratio ranks of no
    greater cost than settings.target), the one that changes the network's output least on the patches.

    Ties keep the earlier candidate, budget ranks before the uniform ones (they spend the budget as asked). The
    uniform ranks compete only if their cost is within the target, so falling back never breaks the budget.
    """
    batches = patches.batches
    if not batches:
        raise CompressError("the budget guard needs calibration patches; pass -i IMAGES or --calibration-patches 1+")
    references = reference_outputs(net, batches)
    entries: dict[str, dict] = {}
    ranks_of: dict[str, Ranks] = {}
    for name, ranks in candidates.items():
        same = next((other for other, r in ranks_of.items() if r == dict(ranks)), None)
        entries[name] = dict(entries[same]) if same is not None else \
            {"cost": space.fraction(ranks),
             "output_change": output_change(net, ranks, batches, references)}
        ranks_of[name] = dict(ranks)
    best_budget = min(entries, key=lambda n: entries[n]["output_change"])
    decision = GuardDecision(best_budget, space.metric, settings.target, entries, patches.source, len(batches),
                             entries[best_budget]["cost"], entries[best_budget]["output_change"])
    uniform = uniform_ratio_within(space, settings.target, settings.min_rank, settings.multiple) \
        if settings.compare_uniform else None
    if uniform is not None and uniform[1]:
        ratio, uniform_ranks, uniform_cost = uniform
        change = output_change(net, uniform_ranks, batches, references)
        entries[UNIFORM] = {"ratio": ratio, "cost": uniform_cost, "output_change": change}
        ranks_of[UNIFORM] = uniform_ranks
        decision.uniform_ratio, decision.uniform_cost, decision.uniform_output_change = ratio, uniform_cost, change
        if change < decision.budget_output_change:
            decision.chosen = UNIFORM
    return ranks_of[decision.chosen], decision


# ---- sensitivities ---------------------------------------------------------------------------------------------

def layer_sensitivities(net: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[torch.Tensor],
                        seed: int = 0) -> dict[str, float]:
    """Per layer, how much a relative perturbation of its output moves the network output (relative, squared).

    If a layer's output y (n elements) gets i.i.d. noise of total relative size e (``||δ|| = e·||y||``), the network
    output f changes by ``E||J δ||² = e² ||y||² ||J||_F² / n``, J the Jacobian of f with respect to y. Hutchinson:
    ``||J||_F² = E_v ||Jᵀ v||²`` for a standard normal v in output space, and ``Jᵀ v`` is the gradient of ⟨v, f⟩
    with respect to y, so ONE backward pass per patch gives every layer's weight

        w = ||Jᵀv||² ||y||² / (n ||f||²),

    the factor that turns a layer's relative squared error into the network's relative squared output change.
    The budget allocator multiplies its kernel-error estimate by it, so that a layer whose errors the network
    amplifies is cut less than one whose errors it damps. Outputs are captured by forward hooks that hand the
    network a copy, so LeakyReLU(inplace=True) downstream cannot overwrite what we differentiate against.
    """
    targets = {id(conv): name for name, conv in layers.items()}
    totals = {name: 0.0 for name in layers}
    generator = torch.Generator().manual_seed(seed)
    was_training = net.training
    net.eval()
    try:
        for batch in batches:
            captured: dict[str, torch.Tensor] = {}

            def capture(module, _inputs, output):
                captured[targets[id(module)]] = output
                return output.clone()

            handles = [conv.register_forward_hook(capture) for conv in layers.values()]
            try:
                with torch.enable_grad():
                    # an input that requires grad makes every activation differentiable, frozen weights or not
                    out = _logits(net, batch.clone().requires_grad_(True))
                    probe = torch.randn(out.shape, generator=generator, dtype=out.dtype)
                    names = [n for n in layers if n in captured]
                    grads = torch.autograd.grad((out * probe).sum(), [captured[n] for n in names],
                                                allow_unused=True)
            finally:
                for handle in handles:
                    handle.remove()
            f2 = float(torch.sum(out.detach().double() ** 2))
            for name, grad in zip(names, grads):
                if grad is None or f2 <= 0:
                    continue
                y = captured[name].detach().double()
                totals[name] += float(torch.sum(grad.double() ** 2)) * float(torch.sum(y ** 2)) / (y.numel() * f2)
    finally:
        net.train(was_training)
    return {name: total / max(len(batches), 1) for name, total in totals.items()}


