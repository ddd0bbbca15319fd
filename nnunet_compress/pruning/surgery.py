"""Physical channel removal: the pruned network is an ordinary, genuinely smaller network (no masks).

Only a smaller network is faster and lighter, and only an ordinary one can be rebuilt by nnU-Net from plans:
the compressed network class builds the parent network and calls :func:`set_channel_counts` with the counts
saved in the plans, after which the pruned checkpoint loads with strict ``load_state_dict``.

Surgery changes the existing modules in place (their parameters are replaced by new, smaller ``Parameter``
objects), so module names and state-dict keys stay those of the parent network, and aliases such as
``decoder.encoder`` (UNetDecoder keeps a reference to the encoder) see the change. An optimizer holding the old
parameters must be rebuilt.

Known limit of ``dynamic_network_architectures``' own ``compute_conv_feature_map_size`` (a VRAM estimate used by
nnU-Net's planners, not by training or inference): it assumes a decoder's transposed conv outputs as many
channels as the skip it is concatenated with, which pruning may change, and a residual block with a 1x1 skip
projection but no stride asserts that its input and output counts differ. Bookkeeping attributes are kept
consistent; those two assumptions are DNA's.
"""

from __future__ import annotations

import operator
from typing import Mapping, Sequence

import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import ChannelGroup, channel_groups, consumer_segments

NEW_CHANNEL = -1  # in an index plan: a channel that did not exist before (set_channel_counts growing a group)


def prune_channels(net: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Keep only the listed channels of each named group, removing the others from every layer that has them.

    Args:
        net: a supported U-Net (see :mod:`nnunet_compress.pruning.dependency`), changed in place.
        keep: group name -> indices of the channels to keep (unique, in range, non-empty; order is ignored,
            channels stay in their original order). Groups not named are left as they are.
    Raises:
        CompressError: unknown or non-prunable group, empty/duplicate/out-of-range indices. Nothing is changed
            then: all requests are checked before the first layer is touched.
    """
    groups = channel_groups(net)
    by_name = _groups_by_name(groups)
    plan = {}
    for name, indices in keep.items():
        group = _prunable_group(by_name, name)
        kept = _checked_indices(group, indices)
        if len(kept) != group.size:
            plan[name] = torch.tensor(kept, dtype=torch.long)
    _apply_index_plan(net, groups, plan)


def compose_keeps(first: Mapping[str, Sequence[int]], then: Mapping[str, Sequence[int]],
                  sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """The one `keep` that does what removing `first` and then `then` does, in indices of the network before `first`.

    `sizes` are the group sizes before `first`; `then`'s indices count the channels `first` left, in their original
    order. Used where several pruning steps must be recorded (or undone, or protected) as one.
    """
    out = {}
    for name in {*first, *then}:
        left = sorted(first[name]) if name in first else list(range(sizes[name]))
        out[name] = [left[i] for i in sorted(then[name])] if name in then else left
    return out


def channel_counts(net: nn.Module) -> dict[str, int]:
    """Current channel count of every prunable group, by group name: what plans save to rebuild the shape."""
    return {g.name: g.size for g in channel_groups(net) if g.prunable}


def set_channel_counts(net: nn.Module, counts: Mapping[str, int]) -> None:
    """Reshape `net` so that each named group has the given number of channels, before loading weights into it.

    Only shapes matter here (load_state_dict overwrites the values): a smaller count keeps the first channels,
    a larger one appends new channels (zero weights; norm scale 1, running variance 1). Growing is needed when one
    network object loads checkpoints of several folds that were pruned to different shapes.
    """
    groups = channel_groups(net)
    by_name = _groups_by_name(groups)
    plan = {}
    for name, count in counts.items():
        group = _prunable_group(by_name, name)
        count = _checked_count(name, count)
        if count != group.size:
            kept = torch.arange(min(count, group.size), dtype=torch.long)
            new = torch.full((max(0, count - group.size),), NEW_CHANNEL, dtype=torch.long)
            plan[name] = torch.cat([kept, new])
    _apply_index_plan(net, groups, plan)


# ---- checking the request ----------------------------------------------------------------------------------------

def _groups_by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def _prunable_group(by_name: dict[str, ChannelGroup], name: str) -> ChannelGroup:
    group = by_name.get(name)
    if group is None:
        known = [n for n, g in by_name.items() if g.prunable]
        raise CompressError(f"unknown channel group {name!r}; group names are the first producing conv of each group "
                            f"(channel_groups(net)), e.g. {known[:3]}. Were the channel counts saved for a "
                            f"different architecture?")
    if not group.prunable:
        raise CompressError(f"channel group {name!r} holds the segmentation classes and cannot be pruned; leave it "
                            f"out of the request")
    return group


def _checked_indices(group: ChannelGroup, indices: Sequence[int]) -> list[int]:
    try:
        kept = [operator.index(i) for i in indices]
    except TypeError:
        raise CompressError(f"channel indices for group {group.name!r} must be integers, got {list(indices)!r}") \
            from None
    if not kept:
        raise CompressError(f"pruning would remove every channel of group {group.name!r}; keep at least one "
                            f"(e.g. select with min_channels >= 1)")
    bad = [i for i in kept if not 0 <= i < group.size]
    if bad:
        raise CompressError(f"channel indices {bad} are out of range for group {group.name!r} with {group.size} "
                            f"channels; indices must lie in 0..{group.size - 1}")
    if len(set(kept)) != len(kept):
        raise CompressError(f"duplicate channel indices for group {group.name!r}; list each kept channel once")
    return sorted(kept)


def _checked_count(name: str, count: int) -> int:
    try:
        count = operator.index(count)
    except TypeError:
        raise CompressError(f"channel count of group {name!r} must be an integer, got {count!r}") from None
    if count < 1:
        raise CompressError(f"channel count of group {name!r} must be at least 1, got {count}")
    return count


# ---- applying an index plan --------------------------------------------------------------------------------------

@torch.no_grad()
def _apply_index_plan(net: nn.Module, groups: list[ChannelGroup], plan: dict[str, torch.Tensor]) -> None:
    """Re-index every layer touched by `plan` (group name -> old channel index per new channel, or NEW_CHANNEL).

    Consumers are re-indexed once over their whole input (all their groups at once), because the offsets of a
    concatenation shift when an earlier part of it shrinks.
    """
    if not plan:
        return
    for group in groups:
        index = plan.get(group.name)
        if index is None:
            continue
        for name in group.producers:
            _reindex_conv_outputs(net.get_submodule(name), index)
        for name in group.norms:
            _reindex_norm(net.get_submodule(name), index)
    for consumer, parts in consumer_segments(groups).items():
        if any(group.name in plan for _, group in parts):
            index = _consumer_index(parts, plan)
            _reindex_conv_inputs(net.get_submodule(consumer), index)
    sync_bookkeeping(net)


def _consumer_index(parts: list[tuple[int, ChannelGroup]], plan: dict[str, torch.Tensor]) -> torch.Tensor:
    pieces = []
    for offset, group in parts:
        index = plan.get(group.name, torch.arange(group.size, dtype=torch.long))
        pieces.append(torch.where(index >= 0, index + offset, index))
    return torch.cat(pieces)


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor, fill: float) -> torch.Tensor:
    """tensor.index_select(dim, index), where NEW_CHANNEL entries become slices filled with `fill`."""
    existing = index >= 0  # decided on the index's own device: a meta-device tensor (costing a step) has no values
    if bool(existing.all()):
        return tensor.index_select(dim, index.to(tensor.device)).clone()
    shape = list(tensor.shape)
    shape[dim] = len(index)
    out = tensor.new_full(shape, fill)
    out.index_copy_(dim, existing.nonzero().squeeze(1).to(tensor.device),
                    tensor.index_select(dim, index[existing].to(tensor.device)))
    return out


def _replace_parameter(module: nn.Module, attr: str, dim: int, index: torch.Tensor, fill: float) -> None:
    old = getattr(module, attr, None)
    if old is None:
        return
    setattr(module, attr, nn.Parameter(_take(old.data, dim, index, fill), requires_grad=old.requires_grad))


def _replace_buffer(module: nn.Module, attr: str, index: torch.Tensor, fill: float) -> None:
    old = module._buffers.get(attr)
    if old is not None:
        module._buffers[attr] = _take(old, 0, index, fill)


def _reindex_conv_outputs(conv: _ConvNd, index: torch.Tensor) -> None:
    out_dim = 1 if isinstance(conv, _ConvTransposeNd) else 0
    _replace_parameter(conv, "weight", out_dim, index, 0.0)
    _replace_parameter(conv, "bias", 0, index, 0.0)
    conv.out_channels = len(index)


def _reindex_conv_inputs(conv: _ConvNd, index: torch.Tensor) -> None:
    in_dim = 0 if isinstance(conv, _ConvTransposeNd) else 1
    _replace_parameter(conv, "weight", in_dim, index, 0.0)
    conv.in_channels = len(index)


def _reindex_norm(norm: nn.Module, index: torch.Tensor) -> None:
    _replace_parameter(norm, "weight", 0, index, 1.0)
    _replace_parameter(norm, "bias", 0, index, 0.0)
    _replace_buffer(norm, "running_mean", index, 0.0)
    _replace_buffer(norm, "running_var", index, 1.0)
    norm.num_features = len(index)


# ---- DNA's bookkeeping attributes ---------------------------------------------------------------------------------

def sync_bookkeeping(net: nn.Module) -> None:
    """Make DNA's channel-count attributes agree with the layers again (compute_conv_feature_map_size reads them).

    ``encoder.output_channels`` gets a new list: DNA stores the caller's ``features_per_stage`` list there, which may
    be the plans' own list, and that must not change behind the caller's back.
    """
    for module in net.modules():
        if isinstance(module, ConvDropoutNormReLU):
            module.input_channels = module.conv.in_channels
            module.output_channels = module.conv.out_channels
    for module in net.modules():
        if isinstance(module, StackedConvBlocks):
            module.output_channels = module.convs[-1].output_channels
        elif isinstance(module, BasicBlockD):
            module.input_channels = module.conv1.input_channels
            module.output_channels = module.conv2.output_channels
        elif isinstance(module, BottleneckD):
            module.input_channels = module.conv1.input_channels
            module.bottleneck_channels = module.conv1.output_channels
            module.output_channels = module.conv3.output_channels
    for module in net.modules():
        if isinstance(module, StackedResidualBlocks):
            module.output_channels = module.blocks[-1].output_channels
    encoder = getattr(net, "encoder", None)
    if encoder is not None and hasattr(encoder, "output_channels"):
        encoder.output_channels = [_stage_output_channels(stage) for stage in encoder.stages]


def _stage_output_channels(stage: nn.Module) -> int:
    bodies = [m for m in ([stage] + list(stage.children() if isinstance(stage, nn.Sequential) else []))
              if isinstance(m, (StackedConvBlocks, StackedResidualBlocks))]
    return bodies[0].output_channels
