"""TotalSegmentator-sized networks for the benchmarks, original and compressed.

Random weights stand in for trained ones: speed depends on shapes, not on values (Tucker ranks by ratio and
pruning by L1 norm need no data). The weights are initialised with nnU-Net's own ``InitWeights_He`` so that
activations have realistic scales (denormals or overflow would distort CPU timings).

Compressed networks are built exactly as the plugin builds them: Tucker through ``choose_ranks`` +
``replace_convs`` (what ``nnunet-compress tucker`` does), pruning through the channel-group surgery with L1
filter importance (what ``nnunet-compress prune --method l1`` does), kept at a comparable FLOP count.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_compress.costs import count_parameters, patch_flops
from nnunet_compress.pruning.dependency import channel_groups
from nnunet_compress.pruning.importance import l1_importance
from nnunet_compress.pruning.surgery import prune_channels
from nnunet_compress.totalseg import shapes
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import choose_ranks


@dataclass(frozen=True)
class Architecture:
    """The benchmarks' view of one TotalSegmentator configuration; the facts come from
    :mod:`nnunet_compress.totalseg.shapes` (docs/totalsegmentator_architecture.md), the one place that holds them."""

    name: str
    features: tuple[int, ...]
    num_classes: int
    patch: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def n_stages(self) -> int:
        return len(self.features)


def _view(key: str, arch: shapes.Architecture) -> Architecture:
    return Architecture(key, tuple(arch.features), arch.num_outputs, tuple(arch.patch_size), (arch.spacing_mm,) * 3)


# 1.5 mm part models (organs: 25 outputs incl. background) and the 3 mm --fast model (118 outputs).
ARCHITECTURES = {"1.5mm": _view("1.5mm", shapes.ARCH_1_5MM_ORGANS), "3mm": _view("3mm", shapes.ARCH_3MM)}


def build_original(arch: Architecture, seed: int = 0) -> nn.Module:
    """PlainConvUNet as nnU-Net plans it for TotalSegmentator, He-initialised, eval mode, no deep supervision."""
    torch.manual_seed(seed)
    n = arch.n_stages
    net = PlainConvUNet(1, n, list(arch.features), nn.Conv3d, 3, [1] + [2] * (n - 1), 2, arch.num_classes, 2,
                        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    net.apply(InitWeights_He(1e-2))
    return net.eval()


PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def as_compressed_unet(arch: Architecture, original: nn.Module) -> nn.Module:
    """The original as the plugin's CompressedUNet (no compression yet), holding the same weights.

    Compressed variants are derived from this, so they run CompressedUNet.forward exactly as nnUNetv2_predict
    runs a compressed model folder (fast paths included).
    """
    from nnunet_compress.network import CompressedUNet
    n = arch.n_stages
    net = CompressedUNet(1, arch.num_classes, PLAIN_CONV_UNET, n_stages=n, features_per_stage=list(arch.features),
                         conv_op=nn.Conv3d, kernel_sizes=3, strides=[1] + [2] * (n - 1), n_conv_per_stage=2,
                         n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)
    net.load_state_dict(original.state_dict())
    return net.eval()


class FastOriginal(nn.Module):
    """The uncompressed network run with the same fast paths, for an honest "best original" baseline."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        from nnunet_compress.inference.torch_paths import fast_convolutions
        with fast_convolutions(x):
            return self.net(x)


def tucker(net: nn.Module, ratio: float, patch: tuple[int, ...], multiple: int = 1, decompose: bool = False
           ) -> nn.Module:
    """A Tucker-factorised copy at channel ratio `ratio` (the paper's rule, min rank 8).

    decompose=False gives the factorised structure with default-initialised factors: the same shapes and hence
    the same speed as a real decomposition, without minutes of HOOI on a 2-core machine.
    """
    out = copy.deepcopy(net)
    ranks = choose_ranks(out, RankPolicy(ratio=ratio, min_rank=8, multiple=multiple), patch)
    replace_convs(out, ranks, decompose=decompose)
    return out.eval()


def prune_to_ratio(net: nn.Module, keep: float, multiple: int = 1) -> nn.Module:
    """A copy with every prunable channel group cut to ceil(keep·C) channels (rounded up to `multiple`), L1-chosen.

    A uniform channel ratio k cuts conv FLOPs by about k² (both channel modes shrink), so keep≈sqrt(FLOP target).
    """
    out = copy.deepcopy(net)
    groups = channel_groups(out)
    scores = l1_importance(out, groups)
    plan = {}
    for g in groups:
        if not g.prunable:
            continue
        count = min(g.size, max(1, math.ceil(math.ceil(g.size * keep) / multiple) * multiple))
        order = torch.argsort(scores[g.name], descending=True)[:count]
        plan[g.name] = sorted(order.tolist())
    prune_channels(out, plan)
    return out.eval()


def flops(net: nn.Module, patch: tuple[int, ...]) -> int:
    """FLOPs of one forward pass (torch's FlopCounterMode on a meta-device copy: shapes only)."""
    return patch_flops(net, 1, patch)


def params(net: nn.Module) -> int:
    return count_parameters(net)
