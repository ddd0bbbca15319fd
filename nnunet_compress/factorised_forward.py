"""CPU inference of a Tucker-factorised PlainConvUNet that keeps its activations factorised between layers.

Why: see :mod:`nnunet_compress.factorised_maps` — a compressed network's full-width feature maps, not its
FLOPs, were what its CPU time was made of. This module walks nnU-Net's PlainConvUNet (``PlainConvEncoder`` +
``UNetDecoder``) the way their ``forward`` methods do, but hands every normalised activation to its consumers as a
factorised map, so that the next 1×1 factor reduces it block by block. Two more exact rewrites remove the decoder's
full-width tensors:

* the skip concatenation feeds a 1×1 factor W = [W_up, W_skip], so W · cat(up, skip) = W_up · up + W_skip · skip;
* the transposed conv before it is itself factorised, up = U_t z_t + b_t, so W_up · up = (W_up U_t) z_t + W_up b_t:
  the upsampled map and the concatenation are never formed, and the transposed conv's last factor folds into a
  (r × r_t) matrix.

Everything the rewrite does not recognise — a plain conv, a dropout, a residual encoder, pooling — runs as the
ordinary module on the materialised input, so the walk is exact for any PlainConvUNet and simply saves less.
Parameters and modules are untouched. :class:`~nnunet_compress.network.CompressedUNet` uses it at CPU inference
when the network has factorised layers (switch: ``fast_inference.OPTIONS.factorised_activations``).
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_compress.factorised_maps import AffineMap, FactorisedMap, affine_instance_norm, apply_pointwise
from nnunet_compress.fast_inference import is_pointwise
from nnunet_compress.norm_folding import activation_slope, foldable, folded_block, folded_core, instance_norm_tail
from nnunet_compress.tucker import TuckerConv

Activation = torch.Tensor | FactorisedMap | AffineMap


def supported(net: nn.Module) -> bool:
    """Whether `net` has the PlainConvUNet structure this walk reproduces (else the caller uses net's forward)."""
    from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    encoder, decoder = getattr(net, "encoder", None), getattr(net, "decoder", None)
    if type(encoder) is not PlainConvEncoder or type(decoder) is not UNetDecoder:
        return False
    if type(encoder).forward is not PlainConvEncoder.forward or type(decoder).forward is not UNetDecoder.forward:
        return False
    stages_ok = all(len(stage) == 1 and type(stage[0]) is StackedConvBlocks for stage in encoder.stages)
    stages_ok = stages_ok and all(type(stage) is StackedConvBlocks for stage in decoder.stages)
    return stages_ok and any(isinstance(m, TuckerConv) for m in net.modules())  # nothing to gain without


def dense(x: Activation) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.materialize()


def forward(net: nn.Module, x: torch.Tensor):
    """``net.decoder(net.encoder(x))`` for a :func:`supported` net, with factorised activations in between."""
    skips: list[Activation] = []
    h: Activation = x
    for stage in net.encoder.stages:
        for block in stage[0].convs:
            h = run_block(block, h)
        skips.append(h)
    return decode(net.decoder, skips)


def run_block(block: nn.Module, x: Activation) -> Activation:
    """One ConvDropoutNormReLU: factorised output where the chain allows it, else the module itself."""
    chain = getattr(block, "all_modules", None)
    if isinstance(chain, nn.Sequential) and foldable(chain):
        return folded_block(chain, x)
    if isinstance(chain, nn.Sequential) and _normalised_plain_conv(chain):
        return affine_instance_norm(chain[0](dense(x)), chain[1], activation_slope(chain[2] if len(chain) > 2
                                                                                    else None))
    return block(dense(x))


def _normalised_plain_conv(chain: nn.Sequential) -> bool:
    """A plain (unfactorised) conv followed by an InstanceNorm tail, e.g. the stem."""
    return len(chain) > 0 and type(chain[0]) in (nn.Conv2d, nn.Conv3d) \
        and instance_norm_tail(chain, chain[0].out_channels)


def decode(decoder: nn.Module, skips: list[Activation]):
    """UNetDecoder.forward with factorised activations (same outputs, same deep-supervision order)."""
    lres = skips[-1]
    seg_outputs = []
    last = len(decoder.stages) - 1
    for s, stage in enumerate(decoder.stages):
        blocks = list(stage.convs)
        h = merged_upsampling_block(decoder.transpconvs[s], lres, skips[-(s + 2)], blocks[0])
        if h is None:
            h = torch.cat((decoder.transpconvs[s](dense(lres)), dense(skips[-(s + 2)])), 1)
        else:
            blocks = blocks[1:]
        for block in blocks:
            h = run_block(block, h)
        if decoder.deep_supervision:
            seg_outputs.append(segmentation(decoder.seg_layers[s], h))
        elif s == last:
            seg_outputs.append(segmentation(decoder.seg_layers[-1], h))
        lres = h
    seg_outputs = seg_outputs[::-1]
    return seg_outputs if decoder.deep_supervision else seg_outputs[0]


def merged_upsampling_block(transpconv: nn.Module, lres: Activation, skip: Activation, block: nn.Module
                            ) -> FactorisedMap | None:
    """transposed conv → cat with the skip → first decoder block, without the upsampled map or the concatenation.

    Applies when the transposed conv and the block's conv are both factorised (see the module docstring); returns
    None otherwise, and the caller runs the ordinary modules.
    """
    chain = getattr(block, "all_modules", None)
    if not (isinstance(transpconv, TuckerConv) and transpconv.transposed and transpconv[2].groups == 1
            and isinstance(chain, nn.Sequential) and foldable(chain)):
        return None
    conv = chain[0]
    first = conv[0].weight.flatten(1)  # (rank_in, C_up + C_skip)
    up_channels = transpconv.out_channels
    if first.shape[1] != up_channels + (skip.channels if not isinstance(skip, torch.Tensor) else skip.shape[1]):
        return None
    w_up, w_skip = first[:, :up_channels], first[:, up_channels:]
    z_t = transpconv[1](apply_pointwise(lres, transpconv[0].weight.flatten(1)))  # the thin core of the transposed conv, at the skip's resolution
    u_t = transpconv[2].weight.flatten(1)
    bias = w_up @ transpconv[2].bias if transpconv[2].bias is not None else None
    reduced = apply_pointwise(skip, w_skip, bias)
    if reduced.shape[2:] != z_t.shape[2:]:
        raise RuntimeError(f"upsampled {tuple(z_t.shape[2:])} and skip {tuple(reduced.shape[2:])} differ in size")
    combined = w_up @ u_t  # (rank_in, rank_t)
    batch = reduced.shape[0]
    flat, z_flat = reduced.view(batch, reduced.shape[1], -1), z_t.reshape(batch, z_t.shape[1], -1)
    for b in range(batch):
        flat[b].addmm_(combined, z_flat[b])
    return folded_core(chain, reduced)


def segmentation(layer: nn.Module, h: Activation) -> torch.Tensor:
    """The segmentation head (a 1×1 conv) applied to h; a factorised h is reduced block by block."""
    if isinstance(h, torch.Tensor) or not _is_pointwise(layer):
        return layer(dense(h))
    return h.project(layer.weight.flatten(1), layer.bias)


def _is_pointwise(layer: nn.Module) -> bool:
    return (type(layer) in (nn.Conv2d, nn.Conv3d) and layer.padding_mode == "zeros"
            and is_pointwise(layer.weight, layer.stride, layer.padding, layer.groups))
