"""--target-latency: the per-convolution cost model, its cache, the allocators spending seconds, and the measured
calibration loop. Small conv nets; the engine is timed for real only on tiny shapes (milliseconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_budget_policies import plain_unet_3d  # the same small 3-stage U-Net
from torch import nn

from nnunet_compress.budgets.calibration import LatencyTerms, calibrated_allocation
from nnunet_compress.budgets.channels import PredictedSeconds
from nnunet_compress.budgets.cost_model import (
    ChannelRange,
    ConvSite,
    FlopsCostModel,
    SiteFit,
    grid,
    tucker_requirements,
)
from nnunet_compress.budgets.latency_model import LatencyModel, cache_file, load_latency_model, save_latency_model
from nnunet_compress.budgets.timing import patch_seconds, time_conv
from nnunet_compress.costs import conv_costs, count_parameters, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import prunable_groups
from nnunet_compress.pruning.importance import cost_weighted_scores
from nnunet_compress.pruning.surgery import prune_channels
from nnunet_compress.pruning.taylor import TaylorSettings, prune_until_target
from nnunet_compress.tucker.budget_guard import network_fraction
from nnunet_compress.tucker.ranks import NetworkBudget, RankPolicy, decomposable_layers, rank_floor, ranks_for_budget

torch.set_num_threads(1)
PATCH = (16, 16, 16)


def affine_cost(overhead: float = 1e-4, per_mac: float = 1e-9):
    """A hand-checkable layer cost: a fixed time per convolution call plus a time per MAC (3 calls when factorised)."""
    def cost(conv, in_spatial, out_spatial, ranks=None, channels=None):
        calls = 1 if ranks is None else 3
        return calls * overhead + per_mac * conv_costs(conv, in_spatial, out_spatial, ranks=ranks)[1]
    return cost


# ---- the fitted model -------------------------------------------------------------------------------------------

def test_nnls_fit_recovers_non_negative_coefficients_and_predicts_unseen_counts():
    truth = (2e-3, 3e-6, 4e-5, 1e-5)
    fit = SiteFit([(ci, co, truth[0] + truth[1] * ci * co + truth[2] * ci + truth[3] * co)
                   for ci in grid(4, 64) for co in grid(8, 128)])
    fit.refit()
    assert fit.coefficients == pytest.approx(truth, rel=1e-6)
    assert fit.seconds(20, 50) == pytest.approx(truth[0] + truth[1] * 1000 + truth[2] * 20 + truth[3] * 50, rel=1e-6)


def test_fit_never_predicts_fewer_channels_slower():
    """Noisy timings where fewer channels took longer: the fit keeps every coefficient >= 0 (monotone)."""
    fit = SiteFit([(8, 8, 5e-3), (8, 16, 4e-3), (16, 8, 4.5e-3), (16, 16, 6e-3)])
    fit.refit()
    assert all(c >= 0 for c in fit.coefficients)
    assert fit.seconds(8, 8) <= fit.seconds(8, 16) <= fit.seconds(16, 16)


def test_grid_spans_the_range_geometrically():
    assert grid(8, 8) == [8]
    assert grid(4, 64) == [4, 16, 64]
    assert grid(1, 2) == [1, 2]
    assert ChannelRange((4, 64), (8, 8)).points() == [(4, 8), (16, 8), (64, 8)]


def test_site_key_round_trip_and_modules():
    conv = nn.ConvTranspose3d(32, 16, 2, stride=2)
    site = ConvSite.of(conv, (6, 8, 8))
    assert site.key() == "tconv k2x2x2 s2x2x2 p0x0x0 @ 6x8x8"
    assert ConvSite.from_key(site.key()) == site
    module = site.module(5, 7)
    assert isinstance(module, nn.ConvTranspose3d) and module.weight.shape == (5, 7, 2, 2, 2)
    assert ConvSite.pointwise((4, 4)).module(3, 2).kernel_size == (1, 1)


def test_tucker_layer_is_predicted_as_its_three_convolutions():
    conv = nn.Conv3d(16, 32, 3, stride=2, padding=1)
    model = LatencyModel("torch", "v", "m", 1)
    for site, coefficients in ((ConvSite.of(conv, (8, 8, 8)), (1e-3, 1e-6, 0, 0)),
                               (ConvSite.pointwise((8, 8, 8)), (2e-4, 0, 1e-6, 0)),
                               (ConvSite.pointwise((4, 4, 4)), (3e-4, 0, 0, 2e-6))):
        model.sites[site.key()] = SiteFit([], coefficients)
    expected = (2e-4 + 1e-6 * 16) + (1e-3 + 1e-6 * 5 * 6) + (3e-4 + 2e-6 * 32)  # ranks (out 6, in 5)
    assert model.layer_seconds(conv, (8, 8, 8), (4, 4, 4), ranks=(6, 5)) == pytest.approx(expected)
    assert model.layer_seconds(conv, (8, 8, 8), (4, 4, 4)) == pytest.approx(1e-3 + 1e-6 * 16 * 32)
    assert model.layer_seconds(conv, (8, 8, 8), (4, 4, 4), channels=(10, 20)) == pytest.approx(1e-3 + 1e-6 * 200)


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_engine_timings_are_positive_and_the_model_is_grown_by_what_is_missing(engine):
    site = ConvSite.of(nn.Conv3d(4, 4, 3, padding=1), (8, 8, 8))
    assert 0 < time_conv(site, 4, 8, engine, 1) < 5
    model = LatencyModel(engine, "v", "m", 1)
    assert model.ensure({site: ChannelRange((2, 8), (4, 4))}, progress=None) == 3
    assert model.ensure({site: ChannelRange((2, 8), (4, 4))}, progress=None) == 0  # nothing new to time
    assert model.ensure({site: ChannelRange((2, 8), (4, 16))}, progress=None) == 6  # 3x3 grid minus the 3 known
    assert len(model.sites[site.key()].samples) == 9


def test_tucker_requirements_cover_the_floor_to_full_ranges():
    net = plain_unet_3d()
    layers = decomposable_layers(net)
    io = layer_io_shapes(net, PATCH)
    floors = {n: (rank_floor(c.out_channels, 4), rank_floor(c.in_channels, 4)) for n, c in layers.items()}
    needed = tucker_requirements(layers, io, floors)
    name, conv = next(iter(layers.items()))
    own = needed[ConvSite.of(conv, io[name][0])]
    assert own.c_in[0] <= floors[name][1] and own.c_in[1] >= conv.in_channels
    assert own.c_out[0] <= floors[name][0] and own.c_out[1] >= conv.out_channels
    assert ConvSite.pointwise(io[name][0]) in needed and ConvSite.pointwise(io[name][1]) in needed


# ---- the cache --------------------------------------------------------------------------------------------------

def test_cache_round_trip(tmp_path):
    model = load_latency_model("torch", 2, tmp_path)
    model.sites["conv k3x3x3 s1x1x1 p1x1x1 @ 8x8x8"] = SiteFit([(4, 4, 1e-3)], (1e-3, 0.0, 0.0, 0.0))
    path = save_latency_model(model, tmp_path)
    assert path == cache_file(tmp_path, "torch", 2) and path.exists()
    again = load_latency_model("torch", 2, tmp_path)
    assert again.sites.keys() == model.sites.keys()
    assert again.sites["conv k3x3x3 s1x1x1 p1x1x1 @ 8x8x8"].coefficients == (1e-3, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("damage", ["not json", "negative coefficient", "bad key", "wrong format"])
def test_a_corrupt_cache_is_rebuilt_with_one_notice(tmp_path, damage):
    model = load_latency_model("torch", 1, tmp_path)
    model.sites["conv k1x1x1 s1x1x1 p0x0x0 @ 4x4x4"] = SiteFit([(2, 2, 1e-4)], (1e-4, 0.0, 0.0, 0.0))
    path = save_latency_model(model, tmp_path)
    d = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{ truncated")
    else:
        if damage == "negative coefficient":
            d["sites"]["conv k1x1x1 s1x1x1 p0x0x0 @ 4x4x4"]["coefficients"][0] = -1.0
        elif damage == "bad key":
            d["sites"]["garbage"] = d["sites"].pop("conv k1x1x1 s1x1x1 p0x0x0 @ 4x4x4")
        else:
            d["format"] = 99
        path.write_text(json.dumps(d))
    notices = []
    fresh = load_latency_model("torch", 1, tmp_path, notice=notices.append)
    assert fresh.sites == {} and len(notices) == 1 and "unreadable" in notices[0] and "measuring again" in notices[0]


def test_a_cache_from_another_machine_or_engine_version_is_rebuilt(tmp_path):
    model = load_latency_model("torch", 1, tmp_path)
    model.sites["conv k1x1x1 s1x1x1 p0x0x0 @ 4x4x4"] = SiteFit([(2, 2, 1e-4)], (1e-4, 0.0, 0.0, 0.0))
    path = save_latency_model(model, tmp_path)
    d = json.loads(path.read_text())
    d["machine"] = "some other CPU | 64 cpus | aarch64"
    path.write_text(json.dumps(d))
    notices = []
    fresh = load_latency_model("torch", 1, tmp_path, notice=notices.append)
    assert fresh.sites == {} and len(notices) == 1 and "some other CPU" in notices[0]


# ---- the Tucker allocator in seconds ------------------------------------------------------------------------------

def test_seconds_budget_meets_its_predicted_goal_and_counts_the_fixed_costs():
    net = plain_unet_3d()
    layers = decomposable_layers(net)
    io = layer_io_shapes(net, PATCH)
    cost = affine_cost()
    base = 0.05  # measured seconds of the whole network: convolutions and everything else
    ranks = ranks_for_budget(layers, io, NetworkBudget(0.8, count_parameters(net), total_macs(net, io), "seconds",
                                                   seconds=base, layer_cost=cost), min_rank=2)
    assert ranks
    saved = sum(cost(layers[n], *io[n]) - cost(layers[n], *io[n], r) for n, r in ranks.items())
    assert (base - saved) / base <= 0.8
    assert network_fraction(layers, ranks, io, base, "seconds", cost) == pytest.approx((base - saved) / base)
    # every kept layer is predicted faster than the original (a factorisation that is slower saves nothing)
    assert all(cost(layers[n], *io[n], r) < cost(layers[n], *io[n]) for n, r in ranks.items())


def test_seconds_budget_below_what_the_floors_allow_puts_every_layer_at_the_floor():
    """No error from predictions: what is reachable is judged on the measured network (calibrated_allocation)."""
    net = plain_unet_3d()
    layers = decomposable_layers(net)
    io = layer_io_shapes(net, PATCH)
    ranks = ranks_for_budget(layers, io, NetworkBudget(0.01, count_parameters(net), total_macs(net, io), "seconds",
                                                   seconds=0.05, layer_cost=affine_cost()), min_rank=4)
    for name, (r_out, r_in) in ranks.items():
        conv = layers[name]
        assert (r_out, r_in) == (rank_floor(conv.out_channels, 4), rank_floor(conv.in_channels, 4))


# ---- the measured calibration loop -------------------------------------------------------------------------------

def _terms() -> LatencyTerms:
    return LatencyTerms("torch", 1, "measured", 1.0, FlopsCostModel(1.0))


def test_calibration_corrects_the_goal_by_the_measured_share_of_the_predicted_saving():
    """An engine that realises half of every predicted saving: the loop asks for twice the predicted saving."""
    target = 0.8

    def allocate(goal):
        return max(goal, 0.3)  # the allocation is its predicted fraction; 0.3 is what the floors allow

    def measure(predicted):
        return 1 - 0.5 * (1 - predicted)

    terms = _terms()
    allocation, goal = calibrated_allocation(target, allocate, lambda a: a, measure, terms, progress=lambda m: None)
    assert goal == pytest.approx(0.6) and allocation == pytest.approx(0.6)
    assert [r["measured"] for r in terms.rounds] == pytest.approx([0.9, 0.8])
    assert terms.measured_fraction == pytest.approx(0.8)


def test_calibration_refuses_a_target_the_floors_cannot_meet_naming_what_they_reach():
    terms = _terms()
    with pytest.raises(CompressError, match=r"cannot be reached on torch: .* measured 0\.650 .* --target-latency "
                                            r"0\.65 or more"):
        calibrated_allocation(0.4, lambda goal: max(goal, 0.3), lambda a: a, lambda a: 1 - 0.5 * (1 - a), terms,
                              progress=lambda m: None)


def test_calibration_keeps_the_closest_allocation_under_the_target():
    """Rounds overshoot and undershoot (noise): the kept one is the slowest that is not above target + 5%."""
    measured = iter([0.70, 0.93, 0.84])
    terms = _terms()
    allocation, _ = calibrated_allocation(0.8, lambda goal: goal, lambda a: a, lambda a: next(measured), terms,
                                          progress=lambda m: None, rounds=3)
    assert terms.measured_fraction == pytest.approx(0.84)
    assert len(terms.rounds) == 3


def test_uniform_fallback_finds_the_largest_ratio_the_measurement_allows():
    """When the per-layer model cannot reach a target, the uniform family is bisected on MEASURED time."""
    from nnunet_compress.budgets.calibration import measured_uniform

    terms = _terms()
    ranks, ratio = measured_uniform(0.7, lambda r: r, lambda r: 0.5 + 0.5 * r, terms, progress=lambda m: None)
    assert ranks == ratio and 0.4 < ratio <= 0.47  # 0.5 + 0.5 r <= 0.7 · 1.05
    assert terms.measured_fraction == pytest.approx(0.5 + 0.5 * ratio)
    assert len(terms.rounds) == 6  # the floor, then five bisection steps
    with pytest.raises(CompressError, match=r"measured 0\.900 .* --target-latency 0\.90 or more, or lower the floor"):
        measured_uniform(0.5, lambda r: r, lambda r: 0.9, _terms(), progress=lambda m: None,
                         floor_hint=" (floor)")


# ---- pruning in seconds -----------------------------------------------------------------------------------------

def test_predicted_seconds_follow_the_channels_removed():
    net = plain_unet_3d()
    io = layer_io_shapes(net, PATCH)
    per_mac = 1e-9
    macs = total_macs(net, io)
    predicted = PredictedSeconds(net, io, base_seconds=2 * per_mac * macs,  # half of the time is not convolution
                                 layer_seconds=FlopsCostModel(per_mac).layer_seconds)
    assert predicted.fraction(net) == pytest.approx(1.0)
    groups = prunable_groups(net)
    saved = predicted.channel_seconds(net, groups)
    first = groups[0]
    prune_channels(net, {first.name: list(range(first.size - 1))})
    after = total_macs(net, layer_io_shapes(net, PATCH))
    assert predicted.fraction(net) == pytest.approx(1 - (macs - after) / (2 * macs))
    assert saved[first.name] * 1 == pytest.approx((macs - after) * per_mac)
    predicted.calibrate(net, 1 - 0.5 * (macs - after) / (2 * macs))  # the engine realised half of it
    assert predicted.k == pytest.approx(0.5)
    assert predicted.fraction(net) == pytest.approx(1 - 0.5 * (macs - after) / (2 * macs))


def test_cost_weighting_ranks_by_importance_per_second():
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 2.0])}
    weighted = cost_weighted_scores(scores, {"a": 3.0, "b": 1.0})  # a channel of 'a' saves 3x the seconds
    # each divided by its saving over the mean saving (2): a by 1.5, b by 0.5
    assert torch.allclose(weighted["a"], torch.tensor([2 / 3, 4 / 3]))
    assert torch.allclose(weighted["b"], torch.tensor([2.0, 4.0]))
    assert cost_weighted_scores(scores, {"a": 0.0, "b": 0.0}) == scores


def test_one_shot_pruning_to_latency_stops_on_the_measured_fraction():
    net = plain_unet_3d((8, 16, 32))
    io = layer_io_shapes(net, PATCH)
    macs = total_macs(net, io)
    predicted = PredictedSeconds(net, io, 1e-9 * macs, FlopsCostModel(1e-9).layer_seconds)
    measured = []

    def measure(pruned):  # an engine that realises 80% of the predicted saving
        fraction = 1 - 0.8 * (1 - total_macs(pruned, layer_io_shapes(pruned, PATCH)) / macs)
        measured.append(fraction)
        return fraction

    settings = TaylorSettings(target_latency=0.7, step=0.1, class_guard=0).validate()
    history = prune_until_target(net, settings, "l1", 1, PATCH, latency=predicted, measure=measure,
                                 progress=lambda m: None)
    assert history[-1]["measured"] <= 0.7 < history[-2]["fraction"]  # stopped by the measurement
    assert all(step["fraction"] == step["measured"] for step in history) and len(measured) == len(history)
    assert predicted.k == pytest.approx(0.8)  # the predictions are scaled by what was measured


def test_latency_target_without_its_model_is_refused():
    settings = TaylorSettings(target_latency=0.5).validate()
    with pytest.raises(CompressError, match="latency target needs"):
        prune_until_target(plain_unet_3d(), settings, "l1", 1, PATCH)


# ---- settings ---------------------------------------------------------------------------------------------------

def test_settings_record_the_latency_target_and_its_cost_model():
    policy = RankPolicy(target_latency=0.5, cost_model="flops").validate()
    assert policy.budget == ("seconds", 0.5) and policy.is_budget and policy.tag() == "tuckerL0.5"
    assert policy.to_dict()["cost_model"] == "flops"
    assert "cost_model" not in RankPolicy(target_flops=0.5).validate().to_dict()
    with pytest.raises(CompressError, match=r"--target-latency 1.5 is outside \(0, 1\)"):
        RankPolicy(target_latency=1.5).validate()
    with pytest.raises(CompressError, match="--cost-model"):
        RankPolicy(target_latency=0.5, cost_model="guess").validate()
    taylor = TaylorSettings(target_latency=0.6).validate()
    assert taylor.metric == "seconds" and taylor.target == 0.6 and taylor.tag() == "taylorL0.6"
    assert "cost_model" in taylor.to_dict() and "cost_model" not in TaylorSettings(target_flops=0.5).to_dict()
    with pytest.raises(CompressError, match="exactly one of"):
        TaylorSettings(target_flops=0.5, target_latency=0.5).validate()


# ---- the whole path on a real engine (torch, tiny shapes) ------------------------------------------------------------

def test_select_ranks_with_a_latency_target_records_its_measurements(monkeypatch, tmp_path):
    from nnunet_compress.workflows.tucker import budget_seconds, build_report, select_ranks

    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")
    monkeypatch.setenv("NNUNET_COMPRESS_CACHE_DIR", str(tmp_path))
    net = plain_unet_3d((8, 16, 32))
    policy = RankPolicy(target_latency=0.9, min_rank=2, calibration_patches=1)
    try:
        selection = select_ranks(net, policy, (32, 32, 32), progress=lambda m: None)
    except CompressError as e:  # a loaded machine may make even the floors measure slower than 0.9 · the original
        assert "cannot be reached on torch" in str(e)
        return
    latency = selection.latency
    assert latency.engine == "torch" and latency.base_seconds > 0 and 1 <= len(latency.rounds) <= 4
    assert latency.measured_fraction is not None and not math.isnan(latency.measured_fraction)
    assert cache_file(tmp_path, "torch", torch.get_num_threads()).exists()
    seconds, record = budget_seconds(net, selection.ranks, (32, 32, 32), policy, latency, progress=lambda m: None)
    assert set(seconds) == set(selection.ranks)
    assert all(v["predicted_before"] > 0 and v["measured_after"] > 0 for v in seconds.values())
    report = build_report(net, selection.ranks, {}, (32, 32, 32), policy, "3d_fullres", seconds, record)
    text = report.to_markdown()
    assert "ms measured before" in text and "time per patch on torch" in text


def test_patch_seconds_times_every_network_interleaved():
    nets = [plain_unet_3d((4, 8)), plain_unet_3d((8, 16))]
    times = patch_seconds(nets, (1, 16, 16, 16), "torch", 1, runs=3, min_seconds=0.05)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(not n.training for n in nets)
