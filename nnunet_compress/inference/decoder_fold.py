"""The graph the CPU engine is given: the decoder's skip concatenations folded into the convolutions around them.

Why: the head of every decoder stage computes ``cat(up(x), skip)`` — a map of twice the stage's channels, written
once and read once — and, in a Tucker-factorised network, feeds it straight into a 1×1 factor ``U``. Everything
between the upsampling and the end of that factor is linear, so the same numbers come out of

    cat(up(x), skip) → 1×1 U        ≡        up'(x) + 1×1 U_skip(skip)

where ``U = [U_up | U_skip]`` is split by input channel and ``up' = U_up ∘ up`` is the upsampling with ``U_up``
multiplied into its output channels (a transposed conv's kernel, or the last 1×1 factor of a factorised one). The
concatenated map and the full-width upsampled map are never formed, and the upsampling computes ``rank_in``
channels instead of the stage's width. Measured on OpenVINO (``benchmarks/engine_rewrites.py``, TotalSegmentator's
1.5 mm network at Tucker 0.25, 2 threads), a patch ran 1.12× faster at 96³ and 1.16× at 128³.

It is exact in real arithmetic (float rounding aside), so it is an inference-time rewrite only: the module the
network *is* — its state dict, training, torch's path — is unchanged, and nothing here is saved. Only nnU-Net's
``UNetDecoder`` stages that begin with a Tucker-factorised conv
(:class:`~nnunet_compress.tucker.decomposition.TuckerConv`) are folded; any other stage is traced as it is, and a
network with none (an uncompressed or pruned one) is given to the engine unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnunet_compress.tucker.decomposition import TuckerConv

# part of the engine's cache key: a converted model is reused only by the same graph rewrite
GRAPH_VERSION = "decoder-fold-1"


class FoldedStage(nn.Module):
    """One decoder stage with its concatenation folded: ``rest(up(low) + skip_proj(skip))``."""

    def __init__(self, up: nn.Module, skip_proj: nn.Module, rest: nn.Module):
        super().__init__()
        self.up = up
        self.skip_proj = skip_proj
        self.rest = rest

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.rest(self.up(low) + self.skip_proj(skip))


class ConcatStage(nn.Module):
    """A decoder stage as nnU-Net runs it (kept where the fold does not apply)."""

    def __init__(self, up: nn.Module, block: nn.Module):
        super().__init__()
        self.up = up
        self.block = block

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.up(low), skip), 1))


class FoldedUNet(nn.Module):
    """Encoder, decoder stages (folded where possible) and the last segmentation layer: deep supervision off."""

    def __init__(self, encoder: nn.Module, stages: list[nn.Module], seg_layer: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.stages = nn.ModuleList(stages)
        self.seg_layer = seg_layer
        self.folded = sum(isinstance(s, FoldedStage) for s in stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        low = skips[-1]
        for s, stage in enumerate(self.stages):
            low = stage(low, skips[-(s + 2)])
        return self.seg_layer(low)


def engine_graph(net: nn.Module) -> nn.Module:
    """The module to hand an inference engine for `net` (a U-Net with ``.encoder``/``.decoder``): folded copy or `net`.

    Returns `net` itself where nothing can be folded (no factorised stage head, another decoder class, deep
    supervision on). The folded module shares the encoder and the untouched layers with `net`; folded layers are
    new tensors, computed here without gradients.
    """
    decoder = getattr(net, "decoder", None)
    if type(decoder).__name__ != "UNetDecoder" or getattr(decoder, "deep_supervision", True):
        return net
    stages = []
    for up, block in zip(decoder.transpconvs, decoder.stages):
        folded = fold_stage(up, block)
        stages.append(folded if folded is not None else ConcatStage(up, block))
    folded = FoldedUNet(net.encoder, stages, decoder.seg_layers[-1])
    return folded.eval() if folded.folded else net


def fold_stage(up: nn.Module, block: nn.Module) -> FoldedStage | None:
    """``block(cat(up(x), skip))`` as a :class:`FoldedStage`, or None where the stage has another shape."""
    convs = getattr(block, "convs", None)
    if not isinstance(convs, nn.Sequential) or len(convs) == 0:
        return None
    head = convs[0]
    tucker = getattr(head, "conv", None)
    ops = getattr(head, "all_modules", None)
    if not isinstance(tucker, TuckerConv) or tucker.transposed or not isinstance(ops, nn.Sequential) \
            or ops[0] is not tucker:
        return None
    pointwise = tucker[0]  # (rank_in, up_channels + skip_channels, 1, ...), no bias
    up_channels = _output_channels(up)
    if up_channels is None or pointwise.bias is not None or up_channels >= pointwise.in_channels:
        return None
    with torch.no_grad():
        matrix = pointwise.weight.flatten(1)
        up_folded = _multiply_into_output(up, matrix[:, :up_channels])
        skip_proj = _pointwise(matrix[:, up_channels:], like=pointwise)
    rest = nn.Sequential(tucker[1], tucker[2], *list(ops)[1:], *list(convs)[1:])
    return FoldedStage(up_folded, skip_proj, rest)


def _output_channels(up: nn.Module) -> int | None:
    if isinstance(up, TuckerConv):
        return up.out_channels
    if isinstance(up, nn.modules.conv._ConvTransposeNd) and up.groups == 1:
        return up.out_channels
    return None


def _multiply_into_output(up: nn.Module, matrix: torch.Tensor) -> nn.Module:
    """``x ↦ matrix · up(x)`` (channel-wise) as one module of `up`'s kind, with ``matrix.shape[0]`` outputs."""
    if isinstance(up, TuckerConv):  # only the last 1×1 factor changes
        last = up[2]
        weight = torch.einsum("rc,ca...->ra...", matrix, last.weight)
        new_last = _pointwise(weight.flatten(1), like=last, bias=_mapped_bias(matrix, last.bias))
        return nn.Sequential(up[0], up[1], new_last)
    # transposed conv: weight (in, out, *k), bias (out,)
    folded = copy.deepcopy(up)
    folded.weight = nn.Parameter(torch.einsum("rc,ic...->ir...", matrix, up.weight), requires_grad=False)
    bias = _mapped_bias(matrix, up.bias)
    folded.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    folded.out_channels = matrix.shape[0]
    return folded


def _mapped_bias(matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else matrix @ bias


def _pointwise(matrix: torch.Tensor, like: nn.Module, bias: torch.Tensor | None = None) -> nn.Module:
    """A 1×1 convolution of `like`'s dimensionality with weight `matrix` (out, in)."""
    dims = len(like.kernel_size)
    conv = type(like)(matrix.shape[1], matrix.shape[0], kernel_size=1, bias=bias is not None,
                      device=matrix.device, dtype=matrix.dtype)
    conv.weight = nn.Parameter(matrix.reshape(*matrix.shape, *([1] * dims)).clone(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return conv
