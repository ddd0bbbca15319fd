"""Which channels of an nnU-Net U-Net must be removed together: the channel dependency map.

Removing output channel c of a convolution is only a valid surgery if every tensor that carries channel c is
treated alike: the norm layer over it, every layer that reads it (at the right offset when it is concatenated
with another tensor), and every other convolution whose output is *added* to it. A :class:`ChannelGroup` is one
such set of channels; pruning picks channels inside a group, and surgery applies the pick to all of its members.

Supported: ``dynamic_network_architectures``' ``PlainConvUNet`` and ``ResidualEncoderUNet`` (2d and 3d; BasicBlockD
and BottleneckD blocks; BatchNorm/InstanceNorm; optional dropout; strided-conv or pooling downsampling; deep
supervision heads), and any module that holds such an ``.encoder`` (PlainConvEncoder / ResidualEncoder) and
``.decoder`` (UNetDecoder) and computes ``decoder(encoder(x))``. Names are relative to that module.

Facts of the architecture the map relies on (dynamic_network_architectures 0.4.4):

* ``ConvDropoutNormReLU`` = conv -> [dropout] -> [norm] -> [nonlin]; its output channels are its conv's.
* ``UNetDecoder.forward`` computes ``torch.cat((transpconv(lres), skip), 1)``: the up-sampled tensor comes
  first, so the skip's channels start at offset ``transpconvs[s].out_channels`` in the first decoder conv.
  The two halves are independent groups (concatenation, not addition).
* ``BasicBlockD``/``BottleneckD`` compute ``nonlin(last_conv(...) + skip(x))``. ``skip`` is the identity, an
  average pool, or [pool ->] a 1x1 ``ConvDropoutNormReLU`` projection. With an identity/pool skip the block's
  output channels *are* its input channels, so block after block (and the ResidualEncoder's stem before the
  first stage) share one group: the stage-wide residual group. A projection starts a new group.
* Segmentation heads (``decoder.seg_layers``) produce the class channels: their groups are not prunable.

Why Torch-Pruning (1.6.1) is not used, although it was evaluated on exactly these networks:

1. With nnU-Net's default ``LeakyReLU(inplace=True)``, ``DependencyGraph.build_dependency`` crashes in the
   concat index mapping of the decoder's ``torch.cat`` (it cannot infer the channel count of the in-place output).
2. With ``inplace=False`` the ResidualEncoderUNet graph misses the norm of each block's last conv (its output is
   modified by the in-place ``out += residual``), so pruning a residual group gives a network that fails to run.
3. It needs a traced forward pass on an example input to find the groups, its groups carry no stable names that
   could be saved in plans, and it does not update the bookkeeping attributes of these classes
   (``encoder.output_channels``, ``block.output_channels``) which ``compute_conv_feature_map_size`` reads.

The few block types here state their wiring explicitly, so the map is read off the module structure instead:
no forward pass, deterministic, identical for a full-size and a pruned network (so saved channel counts can be
re-applied to a freshly built network before ``load_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from nnunet_compress.errors import CompressError

SUPPORTED = ("dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet (or a module with an .encoder "
             "of type PlainConvEncoder/ResidualEncoder and a .decoder of type UNetDecoder)")


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that exist in several layers at once and can only be removed from all of them together.

    Attributes:
        name: qualified name of the group's first producing conv (module-registration order). Stable across
            pruning, so it keys saved channel counts.
        producers: convs / transposed convs whose OUTPUT channels these are (Conv weight dim 0, ConvTranspose
            weight dim 1, and their bias).
        norms: norm layers over these channels.
        consumers: (module name, offset of this group's first channel in that module's input channels).
        activations: modules whose forward output is this group's feature map as its consumers see it (the place
            to hook for Taylor scores / Sauron distances).
        size: current number of channels.
        prunable: False for the segmentation heads' class channels.
    """

    name: str
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    activations: tuple[str, ...]
    size: int
    prunable: bool = True


def channel_groups(net: nn.Module) -> list[ChannelGroup]:
    """All channel groups of `net`, in forward order (encoder stages, then decoder stage by stage)."""
    encoder, decoder = _encoder_and_decoder(net)
    walker = _Walker(net)
    if isinstance(encoder, PlainConvEncoder):
        stage_outputs = _walk_plain_encoder(walker, encoder, "encoder")
    else:
        stage_outputs = _walk_residual_encoder(walker, encoder, "encoder")
    _walk_decoder(walker, decoder, "decoder", stage_outputs)
    groups = [walker.freeze(space) for space in walker.spaces]
    _check_consumers_are_covered(net, groups)
    return groups


# ---- what we accept --------------------------------------------------------------------------------------------

def _encoder_and_decoder(net: nn.Module) -> tuple[nn.Module, UNetDecoder]:
    encoder = getattr(net, "encoder", None)
    decoder = getattr(net, "decoder", None)
    if not isinstance(encoder, (PlainConvEncoder, ResidualEncoder)) or not isinstance(decoder, UNetDecoder):
        raise CompressError(
            f"channel pruning does not support {type(net).__name__} (encoder {type(encoder).__name__}, decoder "
            f"{type(decoder).__name__}); it supports {SUPPORTED}. Use Tucker compression for other networks")
    return encoder, decoder


def _unsupported(what: str, name: str) -> CompressError:
    return CompressError(f"channel pruning does not support {what} (at {name}); it supports {SUPPORTED} with "
                         f"plain convolutions (groups=1), BatchNorm/InstanceNorm and no squeeze-excitation")


# ---- the walk: one mutable "space" per set of coupled channels ---------------------------------------------------

@dataclass(eq=False)
class _Space:
    """A group under construction; feature maps that are added together end up in the same space."""

    prunable: bool = True
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)


class _Walker:
    """Collects spaces in creation order and checks module types on the way."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.spaces: list[_Space] = []

    def new_space(self, prunable: bool = True) -> _Space:
        space = _Space(prunable=prunable)
        self.spaces.append(space)
        return space

    def conv(self, name: str) -> _ConvNd:
        module = self.root.get_submodule(name)
        if not isinstance(module, _ConvNd) or module.groups != 1:
            raise _unsupported(f"the layer {type(module).__name__}" + (
                f" with groups={module.groups}" if isinstance(module, _ConvNd) else ""), name)
        return module

    def freeze(self, space: _Space) -> ChannelGroup:
        sizes = {name: output_channels(self.conv(name)) for name in space.producers}
        sizes.update({name: self.root.get_submodule(name).num_features for name in space.norms})
        if len(set(sizes.values())) != 1:
            raise CompressError(f"layers that must share channels have different channel counts {sizes}; the network "
                                f"was changed outside nnunet-compress — rebuild it from its plans")
        return ChannelGroup(name=space.producers[0], producers=tuple(space.producers), norms=tuple(space.norms),
                            consumers=tuple(space.consumers), activations=tuple(space.activations),
                            size=next(iter(sizes.values())), prunable=space.prunable)


def output_channels(conv: _ConvNd) -> int:
    """Output channels of a conv or transposed conv (its weight layouts differ, its attribute does not)."""
    return conv.out_channels


Inputs = list[tuple[_Space, int]]  # the spaces a layer reads, with their channel offsets (torch.cat order)


def _read(walker: _Walker, inputs: Inputs, conv_name: str) -> None:
    walker.conv(conv_name)
    for space, offset in inputs:
        space.consumers.append((conv_name, offset))


def _produce_conv_block(walker: _Walker, block: ConvDropoutNormReLU, name: str, space: _Space) -> None:
    """Register a ConvDropoutNormReLU's conv (and norm) as producers of `space`."""
    walker.conv(f"{name}.conv")
    space.producers.append(f"{name}.conv")
    norm = getattr(block, "norm", None)
    if norm is not None:
        if not isinstance(norm, _NormBase):
            raise _unsupported(f"the norm layer {type(norm).__name__}", f"{name}.norm")
        space.norms.append(f"{name}.norm")


def _walk_conv_block(walker: _Walker, block: ConvDropoutNormReLU, name: str, inputs: Inputs) -> _Space:
    """A plain conv block: reads `inputs`, outputs a new group whose feature map is the block's output."""
    _read(walker, inputs, f"{name}.conv")
    space = walker.new_space()
    _produce_conv_block(walker, block, name, space)
    space.activations.append(name)
    return space


def _walk_stacked_convs(walker: _Walker, stacked: StackedConvBlocks, name: str, inputs: Inputs) -> _Space:
    for i, block in enumerate(stacked.convs):
        space = _walk_conv_block(walker, block, f"{name}.convs.{i}", inputs)
        inputs = [(space, 0)]
    return space


def _stage_body(stage: nn.Module, name: str, body_type: type) -> tuple[nn.Module, str]:
    """The StackedConvBlocks / StackedResidualBlocks of an encoder stage, which may sit behind a pooling layer."""
    if isinstance(stage, body_type):
        return stage, name
    if isinstance(stage, nn.Sequential):
        bodies = [(m, f"{name}.{i}") for i, m in enumerate(stage) if isinstance(m, body_type)]
        others = [m for m in stage if not isinstance(m, body_type) and not _is_pool(m)]
        if len(bodies) == 1 and not others:
            return bodies[0]
    raise _unsupported(f"an encoder stage of type {type(stage).__name__}", name)


def _is_pool(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd))


def _walk_plain_encoder(walker: _Walker, encoder: PlainConvEncoder, name: str) -> list[_Space]:
    inputs: Inputs = []  # the image: not a channel group
    stage_outputs = []
    for s, stage in enumerate(encoder.stages):
        body, body_name = _stage_body(stage, f"{name}.stages.{s}", StackedConvBlocks)
        space = _walk_stacked_convs(walker, body, body_name, inputs)
        stage_outputs.append(space)
        inputs = [(space, 0)]
    return stage_outputs


def _walk_residual_encoder(walker: _Walker, encoder: ResidualEncoder, name: str) -> list[_Space]:
    current: Optional[_Space] = None  # None = the image
    if encoder.stem is not None:
        current = _walk_stacked_convs(walker, encoder.stem, f"{name}.stem", [])
    stage_outputs = []
    for s, stage in enumerate(encoder.stages):
        body, body_name = _stage_body(stage, f"{name}.stages.{s}", StackedResidualBlocks)
        for b, block in enumerate(body.blocks):
            current = _walk_residual_block(walker, block, f"{body_name}.blocks.{b}", current)
        stage_outputs.append(current)
    return stage_outputs


def _walk_residual_block(walker: _Walker, block: nn.Module, name: str, current: Optional[_Space]) -> _Space:
    """conv chain + skip, summed: returns the group of the block's (post-addition) output."""
    if getattr(block, "apply_se", False):
        raise _unsupported("squeeze-excitation in residual blocks", name)
    if isinstance(block, BasicBlockD):
        chain = ["conv1", "conv2"]
    elif isinstance(block, BottleneckD):
        chain = ["conv1", "conv2", "conv3"]
    else:
        raise _unsupported(f"the residual block {type(block).__name__}", name)
    inputs: Inputs = [(current, 0)] if current is not None else []
    for part in chain[:-1]:  # inner convs: each its own group, seen by the next conv
        space = _walk_conv_block(walker, getattr(block, part), f"{name}.{part}", inputs)
        inputs = [(space, 0)]
    last = f"{name}.{chain[-1]}"
    _read(walker, inputs, f"{last}.conv")
    projection = _skip_projection(block, name)
    if projection is not None:
        output = walker.new_space()
    elif current is not None:
        output = current  # identity / pooling skip: the sum lives in the input's channels
    else:
        output = walker.new_space(prunable=False)  # the image itself is added: its channels are fixed
    _produce_conv_block(walker, getattr(block, chain[-1]), last, output)
    if projection is not None:
        proj_block, proj_name = projection
        _read(walker, [(current, 0)] if current is not None else [], f"{proj_name}.conv")
        _produce_conv_block(walker, proj_block, proj_name, output)
    output.activations.append(name)
    return output


def _skip_projection(block: nn.Module, name: str) -> Optional[tuple[ConvDropoutNormReLU, str]]:
    skip = block.skip
    if not isinstance(skip, nn.Module):
        return None  # DNA stores the identity skip as a lambda
    parts = list(skip) if isinstance(skip, nn.Sequential) else [skip]
    projections = [(m, f"{name}.skip.{i}") for i, m in enumerate(parts) if isinstance(m, ConvDropoutNormReLU)]
    if len(projections) > 1 or any(not _is_pool(m) and not isinstance(m, ConvDropoutNormReLU) for m in parts):
        raise _unsupported("this residual skip path", f"{name}.skip")
    return projections[0] if projections else None


def _walk_decoder(walker: _Walker, decoder: UNetDecoder, name: str, skips: list[_Space]) -> None:
    if len(skips) != len(decoder.stages) + 1:
        raise _unsupported("a decoder whose stage count does not match the encoder's", name)
    lres = skips[-1]
    for s, stage in enumerate(decoder.stages):
        transp = f"{name}.transpconvs.{s}"
        _read(walker, [(lres, 0)], transp)
        if not isinstance(walker.conv(transp), _ConvTransposeNd):
            raise _unsupported("a decoder up-sampling layer that is not a transposed conv", transp)
        up = walker.new_space()
        up.producers.append(transp)
        up.activations.append(transp)
        # UNetDecoder.forward: torch.cat((transpconv(lres), skip), 1) -> the skip starts after the up-sampled maps
        offset = output_channels(walker.conv(transp))
        lres = _walk_stacked_convs(walker, stage, f"{name}.stages.{s}", [(up, 0), (skips[-(s + 2)], offset)])
        seg = f"{name}.seg_layers.{s}"
        _read(walker, [(lres, 0)], seg)
        head = walker.new_space(prunable=False)
        head.producers.append(seg)
        head.activations.append(seg)


def _check_consumers_are_covered(net: nn.Module, groups: list[ChannelGroup]) -> None:
    """Every consumer's input channels must be tiled exactly by its groups, else surgery would corrupt it."""
    segments: dict[str, list[tuple[int, int]]] = {}
    for group in groups:
        for consumer, offset in group.consumers:
            segments.setdefault(consumer, []).append((offset, group.size))
    for consumer, parts in segments.items():
        expected = 0
        for offset, size in sorted(parts):
            if offset != expected:
                break
            expected += size
        if expected != net.get_submodule(consumer).in_channels:
            raise CompressError(f"the input channels of {consumer} do not match the layers feeding it; the network "
                                f"was changed outside nnunet-compress — rebuild it from its plans")


def consumer_segments(groups: list[ChannelGroup]) -> dict[str, list[tuple[int, ChannelGroup]]]:
    """For each consuming layer, the groups it reads, ordered by their offset in its input channels."""
    segments: dict[str, list[tuple[int, ChannelGroup]]] = {}
    for group in groups:
        for consumer, offset in group.consumers:
            segments.setdefault(consumer, []).append((offset, group))
    return {name: sorted(parts, key=lambda p: p[0]) for name, parts in segments.items()}


def prunable_groups(net: nn.Module) -> list[ChannelGroup]:
    """The channel groups of `net` that pruning may shrink, in the dependency map's order."""
    return [g for g in channel_groups(net) if g.prunable]
