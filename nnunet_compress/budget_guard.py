"""The budget policies' safety net: never ship budget ranks that change the network's output more than the
uniform rank ratio of the same cost would.

The budget allocator (:func:`nnunet_compress.ranks.ranks_for_budget`) trades an *estimate* of error against cost,
layer by layer; the estimate is a kernel's reconstruction error, which says nothing about how much the network's
output moves when that layer changes. On a trained nnU-Net it once chose ranks that kept 0.002 foreground Dice
where the uniform ratio at the same FLOPs kept 0.92. So after the allocator has spoken we measure, on a few
calibration patches, the relative change of the whole network's output logits

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
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.ranks import IOShapes, Ranks, ranks_by_ratio
from nnunet_compress.tucker import conv_costs, replace_convs

_METRIC_INDEX = {"params": 0, "flops": 1}


# ---- costs -----------------------------------------------------------------------------------------------------

def network_fraction(layers: Mapping[str, nn.Module], ranks: Mapping[str, tuple[int, int]], io_shapes: IOShapes,
                     base: int, metric: str) -> float:
    """Fraction of the whole network's params or MACs (`base`) left after factorising `ranks`.

    Counted as the budget allocator counts: what each factorised layer saves, taken off the network total.
    """
    index = _METRIC_INDEX[metric]
    saved = 0
    for name, pair in ranks.items():
        conv = layers[name]
        sizes = io_shapes[name]
        saved += conv_costs(conv, *sizes)[index] - conv_costs(conv, *sizes, ranks=tuple(pair))[index]
    return (base - saved) / base


def uniform_ratio_within(layers: Mapping[str, nn.Module], io_shapes: IOShapes, base: int, metric: str,
                         target: float, min_rank: int, multiple: int, iterations: int = 40
                         ) -> tuple[float, Ranks, float] | None:
    """(ratio, ranks, cost fraction) of the largest uniform rank ratio whose cost does not exceed `target`.

    Bisection is valid because the cost only grows with the ratio: every rank grows, and a layer whose
    factorisation stops being cheaper is dropped (back to its original cost, still no more than the factorised
    one). None when even the smallest ratio (every mode at the floor) costs more than the target.
    """
    def cost(ratio: float) -> tuple[Ranks, float]:
        ranks = ranks_by_ratio(layers, ratio, min_rank=min_rank, multiple=multiple, io_shapes=io_shapes)
        return ranks, network_fraction(layers, ranks, io_shapes, base, metric)

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

@dataclass
class GuardDecision:
    """What the guard compared and kept; recorded in the compression report and the plans."""

    chosen: str  # "budget" or "uniform"
    metric: str
    target: float
    budget_cost: float
    budget_output_change: float
    uniform_ratio: float | None
    uniform_cost: float | None
    uniform_output_change: float | None
    calibration: str  # where the patches came from
    patches: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The one line printed when the guard falls back (or keeps the budget ranks)."""
        if self.chosen == "uniform":
            return (f"budget guard: the --target-{self.metric} ranks change the output by "
                    f"{self.budget_output_change:.4f} (relative, on {self.patches} {self.calibration} patches), the "
                    f"uniform --rank-ratio {self.uniform_ratio:.4f} at {self.uniform_cost:.4f} of the {self.metric} "
                    f"by {self.uniform_output_change:.4f}: using the uniform ranks")
        if self.uniform_ratio is None:
            return (f"budget guard: no uniform ratio fits the budget; keeping the budget ranks (output change "
                    f"{self.budget_output_change:.4f})")
        return (f"budget guard: keeping the --target-{self.metric} ranks (output change {self.budget_output_change:.4f} "
                f"vs {self.uniform_output_change:.4f} for the uniform --rank-ratio {self.uniform_ratio:.4f})")


def guard_budget_ranks(net: nn.Module, layers: Mapping[str, nn.Module], budget_ranks: Ranks, io_shapes: IOShapes,
                       base: int, metric: str, target: float, min_rank: int, multiple: int,
                       batches: Sequence[torch.Tensor], calibration: str) -> tuple[Ranks, GuardDecision]:
    """The budget ranks, or the uniform-ratio ranks of no greater cost where those change the output less.

    Ties keep the budget ranks (they spend the budget as asked). The uniform ranks compete only if their cost is
    within the target, so falling back never breaks the budget.
    """
    if not batches:
        raise CompressError("the budget guard needs calibration patches; pass -i IMAGES or --calibration-patches 1+")
    references = reference_outputs(net, batches)
    budget_change = output_change(net, budget_ranks, batches, references)
    budget_cost = network_fraction(layers, budget_ranks, io_shapes, base, metric)
    uniform = uniform_ratio_within(layers, io_shapes, base, metric, target, min_rank, multiple)
    if uniform is None or not uniform[1]:
        decision = GuardDecision("budget", metric, target, budget_cost, budget_change, None, None, None,
                                 calibration, len(batches))
        return budget_ranks, decision
    ratio, uniform_ranks, uniform_cost = uniform
    uniform_change = output_change(net, uniform_ranks, batches, references)
    chosen = "uniform" if uniform_change < budget_change else "budget"
    decision = GuardDecision(chosen, metric, target, budget_cost, budget_change, ratio, uniform_cost,
                             uniform_change, calibration, len(batches))
    return (uniform_ranks if chosen == "uniform" else budget_ranks), decision


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


CalibrationSource = Callable[[], tuple[list[torch.Tensor], str]]
