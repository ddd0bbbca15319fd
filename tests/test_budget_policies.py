"""The rank floor holds for every policy; the report flags layers at the floor; budgets the floor cannot meet fail.

Small conv nets with hand-computed ranks; no nnU-Net training (the end-to-end checks are in test_e2e_tucker.py).
"""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_compress.costs import count_parameters, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.tucker.ranks import (
    NetworkBudget,
    RankPolicy,
    decomposable_layers,
    rank_floor,
    ranks_by_energy,
    ranks_by_ratio,
    ranks_fixed,
    ranks_for_budget,
)
from nnunet_compress.workflows.tucker import build_report, choose_ranks

torch.set_num_threads(1)

PATCH = (16, 16, 16)


def plain_unet_3d(features=(8, 16, 32)) -> PlainConvUNet:
    torch.manual_seed(0)
    n = len(features)
    return PlainConvUNet(1, n, list(features), nn.Conv3d, 3, [1] + [2] * (n - 1), 2, 3, 2, True, nn.InstanceNorm3d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=False).eval()


def rank_one_conv(out_ch: int, in_ch: int, seed: int = 0) -> nn.Conv3d:
    """A kernel of exact multilinear rank (1, 1): the energy rule alone would give it ranks (1, 1)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv3d(in_ch, out_ch, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("o,i,xyz->oixyz", torch.randn(out_ch, generator=g),
                                        torch.randn(in_ch, generator=g), torch.randn(3, 3, 3, generator=g)))
    return layer


def lowest_ranks(ranks: dict, layers: dict) -> list[tuple[str, str, int, int]]:
    """(layer, mode, rank, floor) for every mode below the default floor of 8 — what must never appear."""
    bad = []
    for name, (r_out, r_in) in ranks.items():
        conv = layers[name]
        for mode, r, c in (("out", r_out, conv.out_channels), ("in", r_in, conv.in_channels)):
            if r < rank_floor(c, 8):
                bad.append((name, mode, r, rank_floor(c, 8)))
    return bad


# ---- the floor itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, min_rank, multiple, expected", [
    (32, 8, 1, 8), (4, 8, 1, 4),  # capped at the channel count: a 4-channel mode cannot be cut under floor 8
    (32, 5, 8, 8), (12, 5, 8, 8), (6, 5, 8, 6), (32, 1, 1, 1)])
def test_rank_floor_by_hand(channels, min_rank, multiple, expected):
    assert rank_floor(channels, min_rank, multiple) == expected


# ---- every policy honours it -----------------------------------------------------------------------------------

def test_energy_policy_is_raised_to_the_floor():
    layers = {"r1": rank_one_conv(16, 24)}
    # premise: the spectrum alone asks for ranks (1, 1)
    assert ranks_by_energy(layers, 0.99, only_cheaper=False, min_rank=1) == {"r1": (1, 1)}
    assert ranks_by_energy(layers, 0.99, only_cheaper=False) == {"r1": (8, 8)}  # the default floor 8
    assert ranks_by_energy(layers, 0.99, only_cheaper=False, min_rank=4) == {"r1": (4, 4)}
    assert ranks_by_energy(layers, 0.99, only_cheaper=False, min_rank=4, multiple=8) == {"r1": (8, 8)}
    # a 4-channel side keeps all its channels under floor 8
    assert ranks_by_energy({"thin": rank_one_conv(16, 4)}, 0.99, only_cheaper=False) == {"thin": (8, 4)}


def test_ratio_policy_keeps_the_floor():
    layers = decomposable_layers(plain_unet_3d((16, 32, 64)))
    ranks = ranks_by_ratio(layers, 0.05)  # ceil(0.05·C) is 1..4 for every layer
    assert ranks and not lowest_ranks(ranks, layers)
    assert all(min(r) == 8 for r in ranks.values())


def test_fixed_ranks_below_the_floor_are_refused_with_layer_and_floor():
    layers = decomposable_layers(plain_unet_3d(), include_stem=True, include_pointwise=True)
    name = "decoder.stages.0.convs.0.conv"  # 32 -> 16
    with pytest.raises(CompressError) as info:
        ranks_fixed(layers, {name: [4, 8]}, only_cheaper=False)
    message = str(info.value)
    assert name in message and "rank_out 4 is below the rank floor 8" in message and "--min-rank 4" in message
    # the user who means rank 4 says so
    assert ranks_fixed(layers, {name: [4, 8]}, only_cheaper=False, min_rank=4) == {name: (4, 8)}
    # capped at the channel count: the 1-input-channel stem can keep its single input channel
    stem = "encoder.stages.0.0.convs.0.conv"
    assert ranks_fixed(layers, {stem: [8, 1]}, only_cheaper=False) == {stem: (8, 1)}
    with pytest.raises(CompressError, match="not a multiple of --rank-multiple 8"):
        ranks_fixed(layers, {name: [12, 16]}, only_cheaper=False, multiple=8)
    assert ranks_fixed(layers, {name: [16, 32]}, only_cheaper=False, multiple=8) == {name: (16, 32)}  # full


@pytest.mark.parametrize("metric, target", [("flops", 0.35), ("params", 0.3)])
def test_budget_policy_keeps_the_floor(metric, target):
    net = plain_unet_3d((16, 32, 64))
    layers, io = decomposable_layers(net), layer_io_shapes(net, PATCH)
    base_params, base_macs = count_parameters(net), total_macs(net, io)
    # premise: without a floor the greedy allocator goes below 8 somewhere (random kernels, flat spectra)
    unfloored = ranks_for_budget(layers, io, NetworkBudget(target, base_params, base_macs, metric), min_rank=1)
    assert lowest_ranks(unfloored, layers)
    floored = ranks_for_budget(layers, io, NetworkBudget(target, base_params, base_macs, metric))
    assert floored and not lowest_ranks(floored, layers)
    with_multiple = ranks_for_budget(layers, io, NetworkBudget(target, base_params, base_macs, metric), multiple=8)
    for name, pair in with_multiple.items():
        conv = layers[name]
        for r, c in zip(pair, (conv.out_channels, conv.in_channels)):
            assert r >= rank_floor(c, 8) and (r == c or r % 8 == 0)


def test_choose_ranks_passes_the_floor_to_every_policy():
    """The CLI's path (RankPolicy -> choose_ranks): --min-rank reaches the energy and budget policies too."""
    net = plain_unet_3d((16, 32, 64))
    layers = decomposable_layers(net)
    for policy in (RankPolicy(ratio=0.05), RankPolicy(energy=0.3), RankPolicy(target_flops=0.35),
                   RankPolicy(target_params=0.3)):
        ranks = choose_ranks(net, policy, PATCH)
        assert ranks and not lowest_ranks(ranks, layers), policy
    # --min-rank 2 is honoured as asked: lower ranks become possible. The guard is off here: on these random
    # weights it falls back to the uniform ratio (every rank >= 8), which would hide what the allocator chose.
    loose = choose_ranks(net, RankPolicy(target_flops=0.35, min_rank=2, guard=False), PATCH)
    assert lowest_ranks(loose, layers)


# ---- report ----------------------------------------------------------------------------------------------------

def test_report_flags_layers_at_the_floor():
    net = plain_unet_3d((16, 32, 64))
    layers = decomposable_layers(net)
    a, b, c = "encoder.stages.1.0.convs.1.conv", "encoder.stages.2.0.convs.0.conv", "decoder.stages.0.convs.0.conv"
    assert (layers[a].out_channels, layers[a].in_channels) == (32, 32)
    ranks = {a: (8, 16), b: (32, 8), c: (16, 16)}
    policy = RankPolicy(ranks={k: list(v) for k, v in ranks.items()})
    report = build_report(net, ranks, {}, PATCH, policy, "3d_fullres")
    flags = {r.name: r.at_floor for r in report.layers}
    assert flags == {a: ["out"], b: ["in"], c: []}
    assert report.floor_layers == [a, b] and report.rank_floor["layers"] == [a, b]
    markdown = report.to_markdown()
    assert "2 layer(s) have a rank at the floor (--min-rank 8)" in markdown
    assert f"| {a} | (32, 32, 3x3x3) | [8, 16] | floor: out |" in markdown
    # under --min-rank 4 rank 8 is above the floor: nothing is flagged
    low = build_report(net, ranks, {}, PATCH, RankPolicy(ranks={}, min_rank=4), "3d_fullres")
    assert low.floor_layers == [] and "at the floor (" not in low.to_markdown()


# ---- a budget the floor cannot meet ----------------------------------------------------------------------------

def test_unreachable_budget_says_what_the_floor_allows():
    net = plain_unet_3d((16, 32, 64))
    layers, io = decomposable_layers(net), layer_io_shapes(net, PATCH)
    base_params, base_macs = count_parameters(net), total_macs(net, io)
    floor_ranks = ranks_by_ratio(layers, 1e-6, io_shapes=io)  # every mode at its floor, where that is cheaper
    net_floor = base_macs - sum(_saved_macs(layers[n], io[n], r) for n, r in floor_ranks.items())
    lowest = net_floor / base_macs
    with pytest.raises(CompressError) as info:
        ranks_for_budget(layers, io, NetworkBudget(lowest - 0.02, base_params, base_macs, "flops"))
    message = str(info.value)
    assert f"keeps {lowest:.4f} of its flops" in message and "--min-rank 8" in message
    assert "choose --target-flops" in message and "\n" not in message
    # the suggested fraction itself is reachable
    suggested = float(message.split("choose --target-flops ")[1].split()[0])
    assert suggested >= lowest and ranks_for_budget(layers, io, NetworkBudget(suggested, base_params, base_macs, "flops"))


def _saved_macs(conv, sizes, ranks) -> int:
    from nnunet_compress.costs import conv_costs
    return conv_costs(conv, *sizes)[1] - conv_costs(conv, *sizes, ranks=ranks)[1]


# ---- the guard: budget ranks vs the uniform ratio of no greater cost -------------------------------------------

from nnunet_compress.tucker.budget_guard import (  # noqa: E402
    BudgetSpace,
    CalibrationPatches,
    GuardSettings,
    guard_budget_ranks,
    layer_sensitivities,
    network_fraction,
    output_change,
    reference_outputs,
    uniform_ratio_within,
)


class TwoConvs(nn.Module):
    """x -> first (16->16, 3x3x3) -> LeakyReLU -> second (16->16, 3x3x3): small enough to reason about by hand."""

    def __init__(self, first: nn.Conv3d, second: nn.Conv3d):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(nn.functional.leaky_relu(self.first(x), 0.1))


def identity_like_conv(channels: int, seed: int) -> nn.Conv3d:
    """A kernel whose channel unfoldings have a flat spectrum: a random orthogonal channel mix at the centre tap
    plus small random taps. Every rank below full throws away a proportional share of the signal."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    q = torch.linalg.qr(torch.randn(channels, channels, generator=g))[0]
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(channels, channels, 3, 3, 3, generator=g))
        layer.weight[:, :, 1, 1, 1] += q
    return layer


def exactly_low_rank_conv(channels: int, rank: int, seed: int) -> nn.Conv3d:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    core = torch.randn(rank, rank, 3, 3, 3, generator=g)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ab...,oa,ib->oi...", core, torch.randn(channels, rank, generator=g) / 4,
                                        torch.randn(channels, rank, generator=g) / 4))
    return layer


@pytest.fixture(scope="module")
def two_convs():
    net = TwoConvs(identity_like_conv(16, seed=1), exactly_low_rank_conv(16, 4, seed=2)).eval()
    layers = {"first": net.first, "second": net.second}
    io = {name: ((8, 8, 8), (8, 8, 8)) for name in layers}
    base = sum(conv_costs_of(c, io[n])[1] for n, c in layers.items())
    batches = [torch.randn(1, 16, 8, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    return net, layers, io, base, batches


def conv_costs_of(conv, sizes, ranks=None):
    from nnunet_compress.costs import conv_costs
    return conv_costs(conv, *sizes, ranks=ranks)


def guard(net, layers, candidates, io, base, target, batches, compare_uniform=True):
    """The guard on a FLOP budget with rank floor 4, multiple 1 and patches labelled "test"."""
    return guard_budget_ranks(net, candidates, BudgetSpace(layers, io, base, "flops"),
                              GuardSettings(target, min_rank=4, multiple=1, compare_uniform=compare_uniform),
                              CalibrationPatches(batches, "test"))


def test_uniform_ratio_is_the_largest_within_the_budget(two_convs):
    net, layers, io, base, _ = two_convs
    target = 0.45
    ratio, ranks, cost = uniform_ratio_within(BudgetSpace(layers, io, base, "flops"), target, min_rank=4, multiple=1)
    assert cost <= target
    assert cost == pytest.approx(network_fraction(layers, ranks, io, base, "flops"))
    # hand check: both layers 16 -> 16 at the same rank r, cost per layer 16r + 27r² + 16r MACs per voxel of
    # 6912: r = 8 gives (256 + 1728) / 6912 = 0.287, r = 9: (288 + 2187) / 6912 = 0.358, r = 10: 0.4167,
    # r = 11: (352 + 3267) / 6912 = 0.5236 > 0.45; so the uniform ratio keeps rank 10
    assert ranks == {"first": (10, 10), "second": (10, 10)}
    assert ratio == pytest.approx(10 / 16, abs=1e-8)  # the largest ratio with ceil(16·ratio) = 10
    # no ratio fits a budget below the floor's cost
    assert uniform_ratio_within(BudgetSpace(layers, io, base, "flops"), 0.05, min_rank=4, multiple=1) is None


def test_output_change_is_zero_for_lossless_ranks_and_grows_with_the_cut(two_convs):
    net, layers, io, base, batches = two_convs
    refs = reference_outputs(net, batches)
    assert output_change(net, {"second": (4, 4)}, batches, refs) < 1e-5  # its exact multilinear rank
    small, large = (output_change(net, {"first": (r, r)}, batches, refs) for r in (12, 4))
    assert 0.05 < small < large


def test_guard_falls_back_when_the_budget_ranks_hurt_the_output_more(two_convs):
    """Budget ranks that cut the flat-spectrum layer to (4, 4) and leave the exactly-rank-4 layer alone cost
    (16·4 + 27·16 + 16·4 + 6912) / 13824 = 0.536 of the MACs. The uniform ratio within that cost cuts BOTH
    layers to rank 11 (cost 0.5236): lossless on the second (rank 4 < 11), and it keeps 11 of the first's
    16 directions instead of 4. So it must change the output less, and the guard must take it."""
    net, layers, io, base, batches = two_convs
    budget = {"first": (4, 4)}
    target = network_fraction(layers, budget, io, base, "flops")
    assert target == pytest.approx((64 + 432 + 64 + 6912) / 13824)
    ranks, decision = guard(net, layers, {"budget": budget}, io, base, target, batches)
    assert decision.chosen == "uniform" and ranks == {"first": (11, 11), "second": (11, 11)}
    assert decision.uniform_output_change < decision.budget_output_change
    assert decision.uniform_cost <= target and decision.budget_cost == pytest.approx(target)
    assert "falling back to the uniform ranks" in decision.line() and "\n" not in decision.line()
    record = decision.to_dict()
    assert record["budget_output_change"] > record["uniform_output_change"] > 0
    assert record["candidates"]["uniform"]["output_change"] == record["uniform_output_change"]
    assert record["candidates"]["budget"]["output_change"] == record["budget_output_change"]
    # without the uniform comparison (--no-budget-guard) the budget ranks stay, however bad
    kept, alone = guard(net, layers, {"budget": budget}, io, base, target, batches, compare_uniform=False)
    assert kept == budget and alone.chosen == "budget" and alone.uniform_output_change is None


def test_guard_keeps_budget_ranks_that_hurt_less(two_convs):
    net, layers, io, base, batches = two_convs
    budget = {"second": (4, 4)}  # lossless: output change ~0, the uniform ratio must cut the first layer too
    target = network_fraction(layers, budget, io, base, "flops")
    ranks, decision = guard(net, layers, {"budget": budget}, io, base, target, batches)
    assert decision.chosen == "budget" and ranks == budget
    assert decision.budget_output_change < 1e-5 < decision.uniform_output_change


# ---- sensitivities ---------------------------------------------------------------------------------------------

class DampedBranch(nn.Module):
    """f = loud(x) + 0.01·quiet(x), with identical kernels: the network damps quiet's errors 100-fold."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Conv3d(4, 8, 3, padding=1)
        self.quiet = nn.Conv3d(4, 8, 3, padding=1)
        self.quiet.load_state_dict(self.loud.state_dict())

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


def test_guard_picks_the_best_of_several_budget_allocations(two_convs):
    net, layers, io, base, batches = two_convs
    bad, good = {"first": (4, 4)}, {"second": (4, 4)}
    target = max(network_fraction(layers, r, io, base, "flops") for r in (bad, good))
    ranks, decision = guard(net, layers, {"kernel": bad, "sensitivity": good}, io, base, target, batches)
    assert decision.chosen == "sensitivity" and ranks == good
    assert set(decision.candidates) == {"kernel", "sensitivity", "uniform"}
    assert decision.budget_output_change == decision.candidates["sensitivity"]["output_change"]


def test_sensitivities_measure_how_the_network_amplifies_a_layer():
    torch.manual_seed(0)
    net = DampedBranch()
    layers = {"loud": net.loud, "quiet": net.quiet}
    batches = [torch.randn(1, 4, 12, 12, 12, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    w = layer_sensitivities(net, layers, batches)
    # both Jacobians are multiples of the identity (1 and 0.01) and both outputs equal y: exactly 1e-4 apart
    assert w["quiet"] / w["loud"] == pytest.approx(1e-4, rel=1e-6)
    # loud: ||v||² ||y||² / (n ||1.01 y||²) with ||v||² ≈ n (Hutchinson, 13824 entries per patch)
    assert w["loud"] == pytest.approx(1 / 1.01 ** 2, rel=0.05)


def test_weights_steer_the_allocator_to_the_damped_layer():
    torch.manual_seed(3)
    layers = {"a": nn.Conv3d(32, 32, 3), "b": nn.Conv3d(32, 32, 3)}
    layers["b"].load_state_dict(layers["a"].state_dict())
    io = {n: ((8, 8, 8), (8, 8, 8)) for n in layers}
    base_params = sum(conv_costs_of(c, io[n])[0] for n, c in layers.items())
    base_macs = sum(conv_costs_of(c, io[n])[1] for n, c in layers.items())
    even = ranks_for_budget(layers, io, NetworkBudget(0.7, base_params, base_macs), min_rank=8)
    assert set(even) == {"a", "b"}  # identical layers, equal weights: both get cut
    steered = ranks_for_budget(layers, io, NetworkBudget(0.7, base_params, base_macs), min_rank=8,
                               weights={"a": 1.0, "b": 1e-4})
    assert list(steered) == ["b"]  # the budget is met by cutting only the layer whose errors the network damps


def test_calibration_seed_picks_other_patches_and_is_recorded():
    from nnunet_compress.workflows.tucker import synthetic_calibration
    same_a, _ = synthetic_calibration(None, None, None, 1, PATCH, 2, seed=0)()
    same_b, _ = synthetic_calibration(None, None, None, 1, PATCH, 2, seed=0)()
    other, source = synthetic_calibration(None, None, None, 1, PATCH, 2, seed=1)()
    assert source == "synthetic CT" and [b.shape for b in other] == [(1, 1, *PATCH)] * 2
    assert all(torch.equal(a, b) for a, b in zip(same_a, same_b))
    assert not any(torch.equal(a, b) for a, b in zip(same_a, other))
    assert RankPolicy(target_flops=0.3, calibration_seed=1).to_dict()["calibration_seed"] == 1
    assert "calibration_seed" not in RankPolicy(ratio=0.3).to_dict()  # budget-only, like --calibration-patches
