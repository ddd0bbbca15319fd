"""Channel importance: first-order Taylor scores (the method) and filter L1 norms (the baseline), and selection.

Taylor (Molchanov et al., CVPR 2019): removing feature map a_c changes the quantity y that is back-propagated
by approximately Σ_positions a_c · ∂y/∂a_c (first-order Taylor expansion around a_c, evaluated at a_c → 0).
The score of channel c is the square of that sum, per sample, summed over the batch and averaged over batches.

Two choices of y, which differ only in who calls ``backward``:

* ``mode='output_normalized'`` (default; after Sapkota et al., MIUA 2023, "Neural Network Pruning for Real-time
  Polyp Segmentation"): the gradient starts at the network OUTPUT and is normalised there:
  :meth:`TaylorImportance.output_normalized_backward` back-propagates, for every sample b, the voxel-wise
  cross-entropy gradient at the output (against the labels, or the network's own argmax where there are none)
  scaled to unit norm, so no sample dominates the scores and one-shot pruning needs no labels. By default every
  voxel's gradient is also weighted by 1 / (voxels of its class in that sample), so that each class present
  carries the same share of the gradient: in 3D CT a thin vessel has a hundred times fewer voxels than the
  liver, and an unweighted cross-entropy gradient let pruning remove the filters that only the vessel needed
  (the tiny nnU-Net lost its vessel class entirely at 60% of the FLOPs).
  Why not G_b = y_b/||y_b||, the gradient of the logits' norm: it ranks channels by how much they move the
  logits' magnitude, not the decision; on the tiny nnU-Net it pruned the last decoder layer to 3 channels and
  destroyed the segmentation.
* ``mode='loss'`` (classic Molchanov): y is the training LOSS; the caller computes it and calls
  ``loss.backward()`` (unscaled, or set :attr:`TaylorImportance.grad_scale` to the GradScaler's scale).

Per-layer normalisation of the scores is a separate step (:func:`normalize_per_layer`), so either score can be
ranked globally with or without it.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import ChannelGroup

MODES = ("output_normalized", "loss")
SCOPES = ("global", "layer")
NetworkOutput = Union[torch.Tensor, Sequence[torch.Tensor]]


def full_resolution_output(output: NetworkOutput) -> torch.Tensor:
    """The full-resolution prediction: the tensor itself, or element 0 of a deep-supervision list."""
    if isinstance(output, (list, tuple)):
        if not output:
            raise CompressError("the network returned an empty list; expected a tensor or a deep-supervision list")
        output = output[0]
    if not torch.is_tensor(output):
        raise CompressError(f"expected the network output (a tensor or deep-supervision list), got "
                            f"{type(output).__name__}")
    return output


def output_normalized_backward(output: NetworkOutput, target: Optional[torch.Tensor] = None,
                               balance_classes: bool = True) -> None:
    """Back-propagate, from the full-resolution output y, each sample's loss gradient scaled to unit norm.

    The gradient is that of the voxel-wise cross-entropy of y against `target` (integer labels, shape (B, 1, ...)
    or (B, ...)), or, without labels, against the network's own prediction argmax(y) — so calibration images
    need no annotations. With `balance_classes` each voxel's term is weighted by 1 / (number of voxels of its
    label in the same sample), so every class present in a sample contributes equally however small it is.
    Scaling every sample's output gradient G_b to ||G_b|| = 1 keeps any one sample (and any class with large
    logits) from dominating the accumulated scores. Parameters receive gradients too (as after any backward);
    zero them before the next optimizer step.
    """
    y = full_resolution_output(output)
    if not y.requires_grad:
        raise CompressError("the network output does not require gradients; run the forward pass for Taylor "
                            "scoring with gradients enabled (not under torch.no_grad() or inference_mode())")
    logits = y.detach().float().requires_grad_(True)
    if target is None:
        labels = logits.detach().argmax(1)
    else:
        labels = target[:, 0] if target.dim() == y.dim() else target
        labels = labels.long().clamp(0, y.shape[1] - 1)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        if balance_classes:
            loss = loss * inverse_class_frequency(labels, y.shape[1]).to(loss.dtype)
        (gradient,) = torch.autograd.grad(loss.sum(), logits)
    norms = gradient.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    gradient = gradient / norms.view(-1, *([1] * (y.dim() - 1)))
    y.backward(gradient.to(y.dtype))


def inverse_class_frequency(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-voxel weight 1 / (voxels of the voxel's label in its sample), shape of `labels` (B, ...)."""
    flat = labels.flatten(1)
    counts = torch.zeros(flat.shape[0], num_classes, device=labels.device, dtype=torch.float32)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return (1.0 / counts.gather(1, flat)).view_as(labels)


class TaylorImportance:
    """Accumulates first-order Taylor scores of every prunable group over the backward passes it observes.

    A forward hook on each of the group's activation modules (:attr:`ChannelGroup.activations`) attaches a
    gradient hook to the module's output a; when the gradient g = ∂y/∂a arrives it adds Σ_b (Σ_pos a_bc g_bc)²
    to channel c's sum. Scores of a group are summed over its activation modules (a residual group's channels are
    seen after every block of the stage) and divided by the number of backward passes.

    Use an unwrapped network (not torch.compile'd). Hooks only fire for forward passes run with gradients enabled.
    After pruning, the groups change: :meth:`remove` this object and create a new one.
    """

    def __init__(self, net: nn.Module, groups: Sequence[ChannelGroup], mode: str = "output_normalized"):
        if mode not in MODES:
            raise CompressError(f"unknown Taylor mode {mode!r}; use one of {MODES}")
        self.net = net
        self.mode = mode
        self.groups = [g for g in groups if g.prunable]
        self.grad_scale = 1.0  # 'loss' mode under a GradScaler: gradients arrive multiplied by the scale
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._backward_counts: dict[str, int] = {}
        for group in self.groups:
            for activation in group.activations:
                module = net.get_submodule(activation)
                self._handles.append(module.register_forward_hook(self._forward_hook(group, activation)))

    # ---- hooks ------------------------------------------------------------------------------------------------
    def _forward_hook(self, group: ChannelGroup, activation: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_tensor(output) and output.requires_grad:
                # the detached view shares storage but not the autograd node: no reference cycle through the hook
                output.register_hook(self._gradient_hook(group, activation, output.detach()))
        return hook

    def _gradient_hook(self, group: ChannelGroup, activation: str, values: torch.Tensor) -> Callable:
        def hook(gradient: torch.Tensor) -> None:
            if values.shape[1] != group.size:
                raise CompressError(f"{activation} has {values.shape[1]} channels but its group had {group.size} "
                                    f"when scoring started; create a new TaylorImportance after pruning")
            per_sample = (values.float() * gradient.detach().float()).flatten(2).sum(-1) / self.grad_scale
            self._add(group.name, per_sample.pow(2).sum(0))
            self._backward_counts[activation] = self._backward_counts.get(activation, 0) + 1
        return hook

    def _add(self, name: str, contribution: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] += contribution
        else:
            self._sums[name] = contribution.clone()

    # ---- results ----------------------------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Backward passes seen (the most any activation received; normally all receive the same number)."""
        return max(self._backward_counts.values(), default=0)

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean (over batches) score per channel of every prunable group, float32 on the CPU."""
        if self.num_batches == 0:
            how = ("call output_normalized_backward(net(x))" if self.mode == "output_normalized"
                   else "call loss.backward()")
            raise CompressError(f"no backward pass reached the Taylor hooks yet; run a forward pass with gradients "
                                f"enabled and {how} before asking for scores")
        return {g.name: (self._sums[g.name].cpu() / self.num_batches) if g.name in self._sums
                else torch.zeros(g.size) for g in self.groups}

    def output_normalized_backward(self, output: NetworkOutput, target: Optional[torch.Tensor] = None,
                                   balance_classes: bool = True) -> None:
        """Back-propagate the unit-norm per-sample output gradient (see the module docstring)."""
        if self.mode != "output_normalized":
            raise CompressError("this TaylorImportance is in 'loss' mode: call loss.backward() yourself, or create "
                                "it with mode='output_normalized'")
        output_normalized_backward(output, target, balance_classes)

    def reset(self) -> None:
        self._sums.clear()
        self._backward_counts.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "TaylorImportance":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def l1_importance(net: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    """L1 norm of each output filter, summed over the group's producers (the data-free baseline); CPU float32."""
    scores = {}
    for group in groups:
        if not group.prunable:
            continue
        total = torch.zeros(group.size)
        for name in group.producers:
            weight = net.get_submodule(name).weight.detach()
            out_dim = 1 if isinstance(net.get_submodule(name), _ConvTransposeNd) else 0
            total += weight.abs().transpose(0, out_dim).flatten(1).sum(1).float().cpu()
        scores[group.name] = total
    return scores


def normalize_per_layer(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each group's scores by their L2 norm.

    Raw Taylor scores differ by orders of magnitude between layers (deep, wide layers with small activations vs.
    shallow ones), so a global ranking of raw scores empties some layers and ignores others. After dividing by
    the layer's L2 norm every layer has the same total "importance mass", and the global ranking compares the
    channels' relative importance within their layers fairly. All-zero layers stay zero.
    """
    normalized = {}
    for name, values in scores.items():
        values = values.detach().float()
        norm = values.norm()
        normalized[name] = values / norm if norm > 0 else values.clone()
    return normalized


def cost_weighted_scores(scores: Mapping, channel_seconds: Mapping[str, float]) -> dict:
    """Importance per second saved: each group's scores divided by its per-channel saving relative to the mean
    saving, so that the global ranking removes first the channels that lose the least importance per second.
    Groups the cost model says save nothing are left unweighted (a tiny floor keeps the division finite)."""
    positive = [v for v in channel_seconds.values() if v > 0]
    if not positive:
        return dict(scores)
    mean = sum(positive) / len(positive)
    return {name: values / (max(channel_seconds.get(name, mean), 1e-3 * mean) / mean)
            for name, values in scores.items()}


def select_channels_to_keep(scores: Mapping[str, torch.Tensor], n_remove: int,
                            min_channels: int | Mapping[str, int] = 1,
                            scope: str = "global",
                            groups: Optional[Sequence[ChannelGroup]] = None) -> dict[str, list[int]]:
    """Choose the n_remove lowest-scoring channels to remove; return the kept indices of every group that changes.

    scope='global': the n_remove lowest scores over all groups (ties: earlier group, then lower index).
    scope='layer': n_remove is split over the groups in proportion to their sizes (largest remainder), and each
    group loses its lowest-scoring channels.
    No group goes below min_channels (one int, or a per-group mapping). If `groups` is given, its non-prunable groups are skipped and the score
    vectors are checked against the group sizes. Exactly n_remove channels are removed, or CompressError.
    """
    n_remove = _non_negative_int("n_remove", n_remove)
    if scope not in SCOPES:
        raise CompressError(f"unknown pruning scope {scope!r}; use one of {SCOPES}")
    candidates = _candidate_scores(scores, groups)
    floors = _floors(min_channels, candidates)
    capacity = {name: max(0, len(values) - floors[name]) for name, values in candidates.items()}
    if n_remove > sum(capacity.values()):
        raise CompressError(f"cannot remove {n_remove} channels while keeping the minimum channels per layer: at "
                            f"most {sum(capacity.values())} can go; lower the pruning amount or min_channels")
    if n_remove == 0:
        return {}
    if scope == "global":
        removed = _lowest_globally(candidates, capacity, n_remove)
    else:
        removed = _lowest_per_layer(candidates, _proportional_quotas(candidates, capacity, n_remove))
    return {name: [i for i in range(len(candidates[name])) if i not in gone]
            for name, gone in removed.items() if gone}


def _floors(min_channels, candidates: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per-group minimum channel count from one int for all groups or a {group: int} mapping (default 1)."""
    if isinstance(min_channels, Mapping):
        floors = {name: _non_negative_int(f"min_channels[{name}]", min_channels.get(name, 1)) for name in candidates}
    else:
        value = _non_negative_int("min_channels", min_channels)
        floors = {name: value for name in candidates}
    if any(v < 1 for v in floors.values()):
        raise CompressError("min_channels must be at least 1: a group without channels would cut the network")
    return floors


def _non_negative_int(what: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise CompressError(f"{what} must be an integer, got {value!r}") from None
    if value < 0:
        raise CompressError(f"{what} must not be negative, got {value}")
    return value


def _candidate_scores(scores: Mapping[str, torch.Tensor],
                      groups: Optional[Sequence[ChannelGroup]]) -> dict[str, torch.Tensor]:
    by_name = {g.name: g for g in groups} if groups is not None else None
    candidates = {}
    for name, values in scores.items():
        values = torch.as_tensor(values).detach().float().cpu()
        if by_name is not None:
            group = by_name.get(name)
            if group is None:
                raise CompressError(f"scores for unknown channel group {name!r}; score the groups of this network "
                                    f"(channel_groups(net)) again after pruning")
            if not group.prunable:
                continue
            if values.shape != (group.size,):
                raise CompressError(f"scores of group {name!r} have shape {tuple(values.shape)} but the group has "
                                    f"{group.size} channels; the scores are stale, score the pruned network again")
        if values.dim() != 1:
            raise CompressError(f"scores of group {name!r} must be a vector, got shape {tuple(values.shape)}")
        if bool(torch.isnan(values).any()):
            raise CompressError(f"scores of group {name!r} contain NaN (did training diverge, or AMP overflow in "
                                f"the backward pass?); re-score with finite gradients")
        candidates[name] = values
    if not candidates:
        raise CompressError("no prunable channel groups to select from")
    return candidates


def _lowest_globally(candidates: dict[str, torch.Tensor], capacity: dict[str, int],
                     n_remove: int) -> dict[str, set[int]]:
    ranked = sorted((float(v), g, c) for g, values in enumerate(candidates.values()) for c, v in enumerate(values))
    names = list(candidates)
    removed: dict[str, set[int]] = {name: set() for name in names}
    left = n_remove
    for _, g, c in ranked:
        if left == 0:
            break
        name = names[g]
        if len(removed[name]) < capacity[name]:
            removed[name].add(c)
            left -= 1
    return removed


def _proportional_quotas(candidates: dict[str, torch.Tensor], capacity: dict[str, int],
                         n_remove: int) -> dict[str, int]:
    """Split n_remove over groups by size (largest remainder), giving what a full group cannot take to the others."""
    quotas = {name: 0 for name in candidates}
    left = n_remove
    while left > 0:
        open_groups = [name for name in candidates if quotas[name] < capacity[name]]
        total = sum(len(candidates[name]) for name in open_groups)
        shares = {name: left * len(candidates[name]) / total for name in open_groups}
        grant = {name: math.floor(share) for name, share in shares.items()}
        by_remainder = sorted(open_groups, key=lambda n: -(shares[n] - grant[n]))  # stable: group order on ties
        for name in by_remainder[:left - sum(grant.values())]:
            grant[name] += 1
        for name in open_groups:
            take = min(grant[name], capacity[name] - quotas[name])
            quotas[name] += take
            left -= take
    return quotas


def _lowest_per_layer(candidates: dict[str, torch.Tensor], quotas: dict[str, int]) -> dict[str, set[int]]:
    removed = {}
    for name, values in candidates.items():
        order = torch.argsort(values, stable=True)
        removed[name] = set(order[:quotas[name]].tolist())
    return removed
