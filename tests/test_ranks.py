"""Rank policies: hand-computed ranks, kernels with known spectra, and budgets checked on the built network.

The budget policy is checked from the outside: the chosen ranks are applied to a copy of the network and its
parameters (sum of p.numel()) and FLOPs (torch's FlopCounterMode) are counted there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.costs import conv_costs, layer_io_shapes
from nnunet_compress.errors import CompressError
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import (
    NetworkBudget,
    decomposable_layers,
    keep_only_cheaper,
    ranks_by_energy,
    ranks_by_ratio,
    ranks_fixed,
    ranks_for_budget,
    ratio_rank,
    round_rank,
)

torch.set_num_threads(1)

PATCH = (16, 16, 16)


def plain_unet_3d() -> PlainConvUNet:
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [8, 16, 32], nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, True, nn.InstanceNorm3d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True).eval()


def residual_unet_3d() -> ResidualEncoderUNet:
    torch.manual_seed(0)
    return ResidualEncoderUNet(1, 3, [8, 16, 32], nn.Conv3d, 3, [1, 2, 2], [1, 2, 2], 3, [1, 1], True,
                               nn.InstanceNorm3d, {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU,
                               {"inplace": True}, deep_supervision=True).eval()


def plain_unet_2d() -> PlainConvUNet:
    torch.manual_seed(0)
    return PlainConvUNet(2, 3, [8, 16, 32], nn.Conv2d, 3, [1, 2, 2], 2, 4, 2, True, nn.InstanceNorm2d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True).eval()


def all_convs(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


# ---- which layers ----------------------------------------------------------------------------------------------

def test_decomposable_layers_of_plain_unet():
    net = plain_unet_3d()
    names = list(decomposable_layers(net))
    assert "encoder.stages.0.0.convs.0.conv" not in names  # the stem
    assert not any("seg_layers" in n for n in names)  # 1x1x1 heads
    assert names == [n for n in all_convs(net) if n != "encoder.stages.0.0.convs.0.conv" and "seg_layers" not in n]
    assert "decoder.transpconvs.0" in names and "encoder.stages.0.0.convs.1.conv" in names
    assert list(decomposable_layers(net, include_stem=True, include_pointwise=True)) == all_convs(net)
    with_stem = decomposable_layers(net, include_stem=True)
    assert next(iter(with_stem)) == "encoder.stages.0.0.convs.0.conv"


def test_decomposable_layers_of_residual_and_2d_unets():
    net = residual_unet_3d()
    names = list(decomposable_layers(net))
    assert "encoder.stem.convs.0.conv" not in names
    assert not any(".skip." in n or "seg_layers" in n for n in names)  # 1x1x1 projections and heads
    assert "encoder.stages.0.blocks.0.conv1.conv" in names
    assert len(names) == len(all_convs(net)) - 1 - 2 - 2  # stem, two projections, two heads
    net2d = plain_unet_2d()
    assert "encoder.stages.0.0.convs.0.conv" not in decomposable_layers(net2d)
    assert all(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in decomposable_layers(net2d).values())


def test_grouped_convs_are_never_decomposable():
    net = nn.Sequential(nn.Conv3d(1, 8, 3), nn.Conv3d(8, 8, 3, groups=4), nn.Conv3d(8, 8, 3))
    assert list(decomposable_layers(net, include_stem=True)) == ["0", "2"]


# ---- ratio -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, ratio, min_rank, multiple, expected", [
    (320, 0.3, 8, 1, 96),
    (32, 0.1, 8, 1, 8),  # ceil(3.2) = 4 < min_rank
    (32, 0.3, 8, 1, 10),  # ceil(9.6)
    (4, 0.3, 8, 1, 4),  # min_rank capped at the channel count
    (100, 0.55, 1, 1, 55),  # 100 * 0.55 is 55.000000000000007 in floating point
    (64, 0.3, 8, 8, 24),  # ceil(19.2) = 20 -> 24
    (320, 0.3, 8, 8, 96),  # already a multiple
    (20, 0.9, 8, 8, 20),  # 18 -> 24, capped at 20
    (32, 1.0, 8, 1, 32),
])
def test_ratio_rule_by_hand(channels, ratio, min_rank, multiple, expected):
    assert ratio_rank(channels, ratio, min_rank, multiple) == expected


def test_round_rank():
    assert round_rank(9, 8, 320) == 16
    assert round_rank(16, 8, 320) == 16
    assert round_rank(13, 8, 12) == 12
    assert round_rank(5, 1, 12) == 5
    with pytest.raises(CompressError, match="multiple"):
        round_rank(5, 0, 12)


def test_ranks_by_ratio_order_and_filtering():
    layers = {"wide": nn.Conv3d(320, 256, 3), "narrow": nn.Conv3d(32, 32, 3), "up": nn.ConvTranspose3d(320, 256, 2)}
    ranks = ranks_by_ratio(layers, 0.3, min_rank=8)
    assert ranks == {"wide": (77, 96), "narrow": (10, 10), "up": (77, 96)}  # (rank_out, rank_in)
    assert ranks_by_ratio(layers, 0.3, min_rank=8, multiple=8) == {"wide": (80, 96), "narrow": (16, 16),
                                                                    "up": (80, 96)}
    # at ratio 1 no layer is cheaper: none is returned, unless the caller asks for every layer
    assert ranks_by_ratio(layers, 1.0) == {}
    assert ranks_by_ratio(layers, 1.0, only_cheaper=False)["narrow"] == (32, 32)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(CompressError, match=r"outside \(0, 1\]"):
        ranks_by_ratio({"a": nn.Conv3d(8, 8, 3)}, ratio)


def test_bad_min_rank_and_multiple_are_refused():
    with pytest.raises(CompressError, match="minimum rank"):
        ranks_by_ratio({"a": nn.Conv3d(8, 8, 3)}, 0.5, min_rank=0)
    with pytest.raises(CompressError, match="multiple"):
        ranks_by_ratio({"a": nn.Conv3d(8, 8, 3)}, 0.5, multiple=0)


# ---- energy ----------------------------------------------------------------------------------------------------

def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))[0]


def orthogonal_cp_kernel(singular_values: list[float], out_ch: int, in_ch: int, taps: int) -> torch.Tensor:
    """W = Σ_j s_j a_j ⊗ b_j ⊗ c_j with orthonormal a, b, c: both channel unfoldings have singular values s_j."""
    g = torch.Generator().manual_seed(4)
    n = len(singular_values)
    a, b, c = orthonormal(out_ch, n, g), orthonormal(in_ch, n, g), orthonormal(taps, n, g)
    return torch.einsum("j,oj,ij,tj->oit", torch.tensor(singular_values, dtype=torch.float64), a, b, c)


def conv_with_kernel(kernel: torch.Tensor, transposed: bool = False) -> nn.Module:
    """A 3x3 Conv2d with kernel (out, in, 9); transposed: a ConvTranspose2d holding it as (in, out, 3, 3)."""
    out_ch, in_ch = kernel.shape[:2]
    weight = kernel.reshape(out_ch, in_ch, 3, 3)
    if transposed:
        layer, weight = nn.ConvTranspose2d(in_ch, out_ch, 3), weight.transpose(0, 1)
    else:
        layer = nn.Conv2d(in_ch, out_ch, 3)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("energy, expected_rank", [(0.5, 1), (0.63, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_rule_on_known_singular_values(energy, expected_rank):
    # squared singular values 9, 4, 1, 0.25 of 14.25: cumulative shares 0.632, 0.912, 0.982, 1
    layer = conv_with_kernel(orthogonal_cp_kernel([3, 2, 1, 0.5], 12, 10, 9))
    ranks = ranks_by_energy({"k": layer}, energy, only_cheaper=False, min_rank=1)
    assert ranks == {"k": (expected_rank, expected_rank)}


@pytest.mark.parametrize("transposed", [False, True])
def test_energy_rule_tells_the_channel_modes_apart(transposed):
    # out-channel unfolding of rank 1, in-channel unfolding of rank 3
    g = torch.Generator().manual_seed(5)
    a = torch.randn(12, dtype=torch.float64, generator=g)
    m = torch.randn(10, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 9, dtype=torch.float64, generator=g)
    layer = conv_with_kernel(torch.einsum("o,it->oit", a, m), transposed=transposed)
    assert ranks_by_energy({"k": layer}, 1.0, only_cheaper=False, min_rank=1) == {"k": (1, 3)}
    assert ranks_by_energy({"k": layer}, 1.0, multiple=4, only_cheaper=False, min_rank=1) == {"k": (4, 4)}


def test_bad_energy_is_refused():
    for energy in (0, 1.01, -1):
        with pytest.raises(CompressError, match="energy"):
            ranks_by_energy({"a": nn.Conv3d(8, 8, 3)}, energy)


# ---- fixed -----------------------------------------------------------------------------------------------------

def test_ranks_fixed_validates():
    net = plain_unet_3d()
    layers = decomposable_layers(net, include_stem=True, include_pointwise=True)
    name = "decoder.stages.0.convs.0.conv"  # 32 -> 16 channels
    assert ranks_fixed(layers, {name: [4, 8]}, min_rank=4) == {name: (4, 8)}
    with pytest.raises(CompressError, match="999") as info:
        ranks_fixed(layers, {name: [999, 4]})
    assert name in str(info.value) and "1..16" in str(info.value)
    with pytest.raises(CompressError, match="rank_in 0"):
        ranks_fixed(layers, {name: [4, 0]})
    with pytest.raises(CompressError, match="unknown layer 'decoder.nope'"):
        ranks_fixed(layers, {"decoder.nope": [4, 4]})
    for bad in ([4], [4, 4, 4], "44", [4.5, 4], 4, [True, 4]):
        with pytest.raises(CompressError, match="two integers"):
            ranks_fixed(layers, {name: bad})
    with pytest.raises(CompressError, match="non-empty"):
        ranks_fixed(layers, {})
    # ranks that would make the layer bigger are dropped like in every policy
    assert ranks_fixed(layers, {name: [16, 32]}, min_rank=4) == {}


# ---- cheaper only ----------------------------------------------------------------------------------------------

def test_keep_only_cheaper_drops_bigger_replacements():
    layers = {"small": nn.Conv3d(8, 8, 3), "big_rank": nn.Conv3d(16, 16, 3), "head": nn.Conv3d(16, 3, 1),
              "up": nn.ConvTranspose3d(16, 16, 2, stride=2)}
    io = {"small": ((8, 8, 8), (8, 8, 8)), "big_rank": ((8, 8, 8), (8, 8, 8)), "head": ((8, 8, 8), (8, 8, 8)),
          "up": ((4, 4, 4), (8, 8, 8))}
    ranks = {"small": (2, 2), "big_rank": (15, 15), "head": (3, 3), "up": (16, 1)}
    kept = keep_only_cheaper(layers, ranks, io)
    for name, r in ranks.items():
        p0, m0 = conv_costs(layers[name], *io[name])
        p1, m1 = conv_costs(layers[name], *io[name], ranks=r)
        assert (name in kept) == (p1 < p0 and m1 < m0)
    # big_rank: 16*15 + 15*15*27 + 15*16 + 16 = 6571 < 6928 parameters (and MACs at equal resolution)
    assert kept == {"small": (2, 2), "big_rank": (15, 15)}
    # "up": fewer parameters (416 < 2064) but more MACs, its last factor running at the 8x larger output
    p0, m0 = conv_costs(layers["up"], *io["up"])
    p1, m1 = conv_costs(layers["up"], *io["up"], ranks=(16, 1))
    assert p1 < p0 and m1 > m0
    # "head": a 1x1x1 conv at rank (1, 1): 16 + 1 + 3 + 3 = 23 < 51 parameters, so it is kept at (1, 1) ...
    assert keep_only_cheaper(layers, {"head": (1, 1)}, io) == {"head": (1, 1)}
    # ... but not at (3, 3): 48 + 9 + 9 + 3 = 69 > 51
    assert keep_only_cheaper(layers, {"head": (3, 3)}, io) == {}


# ---- budget ----------------------------------------------------------------------------------------------------

def network_costs(net: nn.Module, patch: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, MACs) counted on the module itself: sum of numel, FlopCounterMode / 2."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 1, *patch))
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def unet_and_costs():
    net = plain_unet_3d()
    params, macs = network_costs(net, PATCH)
    return net, layer_io_shapes(net, PATCH), params, macs


@pytest.mark.parametrize("metric, target, multiple", [("params", 0.5, 1), ("flops", 0.4, 1), ("params", 0.3, 8),
                                                     ("flops", 0.25, 4)])
def test_budget_reaches_target_on_the_built_network(unet_and_costs, metric, target, multiple):
    net, io, base_params, base_macs = unet_and_costs
    layers = decomposable_layers(net)
    ranks = ranks_for_budget(layers, io, NetworkBudget(target, base_params, base_macs, metric), multiple=multiple,
                             min_rank=1)
    assert ranks and set(ranks) <= set(layers)
    compressed = copy.deepcopy(net)
    replace_convs(compressed, ranks, decompose=False)
    params, macs = network_costs(compressed, PATCH)
    achieved = params / base_params if metric == "params" else macs / base_macs
    assert achieved <= target
    assert achieved > target - 0.1  # greedy stops as soon as the target is met: no gross overshoot
    for name, (r_out, r_in) in ranks.items():
        conv = layers[name]
        assert r_out == conv.out_channels or r_out % multiple == 0
        assert r_in == conv.in_channels or r_in % multiple == 0
    assert keep_only_cheaper(layers, ranks, io) == ranks


def low_rank_conv(out_ch: int, in_ch: int, r_out: int, r_in: int, seed: int) -> nn.Conv3d:
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, 3, generator=g)
    layer = nn.Conv3d(in_ch, out_ch, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ab...,oa,ib->oi...", core, torch.randn(out_ch, r_out, generator=g),
                                        torch.randn(in_ch, r_in, generator=g)))
    return layer


def test_budget_cuts_the_exactly_low_rank_layer_first():
    torch.manual_seed(6)
    layers = {"random": nn.Conv3d(16, 16, 3, padding=1), "low_rank": low_rank_conv(16, 16, 2, 3, seed=7)}
    io = {name: ((8, 8, 8), (8, 8, 8)) for name in layers}
    originals = {n: conv_costs(c, *io[n]) for n, c in layers.items()}
    base_params = sum(p for p, _ in originals.values())
    base_macs = sum(m for _, m in originals.values())
    # the target is met exactly when the low-rank layer sits at its true ranks and the other is untouched
    low_params = conv_costs(layers["low_rank"], *io["low_rank"], ranks=(2, 3))[0]
    target = (originals["random"][0] + low_params) / base_params + 1e-9
    assert ranks_for_budget(layers, io, NetworkBudget(target, base_params, base_macs), min_rank=1) == {"low_rank": (2, 3)}
    # a tighter target has to cut the random layer too, but the low-rank one keeps its exact ranks: cutting
    # below them discards more energy than the random layer's smallest directions hold
    tighter = ranks_for_budget(layers, io, NetworkBudget(0.5, base_params, base_macs), min_rank=1)
    assert tighter["low_rank"] == (2, 3) and "random" in tighter


def test_budget_counts_the_rest_of_the_network():
    layers = {"a": nn.Conv3d(16, 16, 3)}
    io = {"a": ((8, 8, 8), (8, 8, 8))}
    p0, m0 = conv_costs(layers["a"], *io["a"])
    # the decomposable layer is half the network: even at rank (1, 1) at most half of it can go
    floor = p0 + conv_costs(layers["a"], *io["a"], ranks=(1, 1))[0]
    with pytest.raises(CompressError, match=f"{floor / (2 * p0):.4f}"):
        ranks_for_budget(layers, io, NetworkBudget(0.5, 2 * p0, 2 * m0), min_rank=1)
    ranks = ranks_for_budget(layers, io, NetworkBudget(0.6, 2 * p0, 2 * m0), min_rank=1)
    r_params = conv_costs(layers["a"], *io["a"], ranks=ranks["a"])[0]
    assert (p0 + r_params) / (2 * p0) <= 0.6


def test_budget_unreachable_names_smallest_fraction(unet_and_costs):
    net, io, base_params, base_macs = unet_and_costs
    layers = decomposable_layers(net)
    lowest = {n: (min(8, c.out_channels), min(8, c.in_channels)) for n, c in layers.items()}
    saved = sum(conv_costs(c, *io[n])[0] - conv_costs(c, *io[n], ranks=lowest[n])[0] for n, c in layers.items()
                if n in keep_only_cheaper(layers, {n: lowest[n]}, io))
    smallest = (base_params - saved) / base_params
    with pytest.raises(CompressError, match=f"keeps {smallest:.4f} of its params; choose --target-params"):
        ranks_for_budget(layers, io, NetworkBudget(smallest - 0.01, base_params, base_macs), min_rank=8)


@pytest.mark.parametrize("budget, kwargs, message", [({"target": 0}, {}, r"outside \(0, 1\)"),
                                                     ({"target": 1}, {}, "outside"),
                                                     ({"target": 0.5, "metric": "latency"}, {},
                                                      "not one of params, flops, seconds"),
                                                     ({"target": 0.5, "metric": "seconds"}, {}, "needs a cost model"),
                                                     ({"target": 0.5}, {"multiple": 0}, "multiple")])
def test_budget_bad_input(unet_and_costs, budget, kwargs, message):
    net, io, base_params, base_macs = unet_and_costs
    with pytest.raises(CompressError, match=message):
        ranks_for_budget(decomposable_layers(net), io, NetworkBudget(params=base_params, macs=base_macs, **budget),
                         **kwargs)


def test_layers_not_run_by_the_measured_pass_are_left_out():
    # nnU-Net predicts without deep supervision: the lower-resolution heads exist but never run
    net = plain_unet_3d()
    net.decoder.deep_supervision = False
    io = layer_io_shapes(net, PATCH)
    assert "decoder.seg_layers.0" not in io and "decoder.seg_layers.1" in io
    layers = decomposable_layers(net, include_stem=True, include_pointwise=True)
    ranks = ranks_fixed(layers, {"decoder.seg_layers.0": [1, 1], "decoder.seg_layers.1": [1, 1]}, io_shapes=io,
                        min_rank=1)
    assert ranks == {"decoder.seg_layers.1": (1, 1)}
    assert "decoder.seg_layers.0" not in ranks_by_ratio(layers, 0.1, min_rank=1, io_shapes=io)
    params, macs = network_costs(net, PATCH)
    assert "decoder.seg_layers.0" not in ranks_for_budget(layers, io, NetworkBudget(0.5, params, macs), min_rank=1)


def test_policies_drop_layers_that_would_grow():
    # Conv2d(2 -> 16, 3x3): 16*2*9 + 16 = 304 parameters. At rank (16, 2) the factors cost
    # 2*2 + 2*16*9 + 16*16 + 16 = 564; at (4, 1) only 2 + 36 + 64 + 16 = 118.
    torch.manual_seed(8)
    layers = {"thin": nn.Conv2d(2, 16, 3)}
    assert ranks_by_ratio(layers, 1.0, min_rank=1) == {}
    assert ranks_by_ratio(layers, 0.25, min_rank=1) == {"thin": (4, 1)}
    # a random kernel needs every direction for all its energy: full ranks, hence not cheaper, hence dropped
    assert ranks_by_energy(layers, 1.0, only_cheaper=False, min_rank=1) == {"thin": (16, 2)}
    assert ranks_by_energy(layers, 1.0, min_rank=1) == {}
