"""Sauron's maths against hand-computed values: distances, regulariser, threshold schedule, channel choice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.sauron import (
    SauronConfig,
    ThresholdState,
    channels_to_keep,
    choose_reference,
    delta_opt,
    delta_prune,
    pool_feature_map,
    sauron_regulariser,
    training_converged,
)


def two_channel_map() -> torch.Tensor:
    """(1, 2, 2, 4). With pool 2 each channel becomes 1×2.

    ch0 = [[0,0,4,4],[0,0,4,4]]: normalised [[0,0,1,1],...] -> pooled [0, 1];   raw pooled [0, 4]
    ch1 = [[1,3,2,2],[1,3,2,2]]: normalised [[0,1,.5,.5],...] -> pooled [.5, .5]; raw pooled [2, 2]
    """
    ch0 = [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]]
    ch1 = [[1.0, 3.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.0]]
    return torch.tensor([[ch0, ch1]])


# ---------------------------------------------------------------------------------------------------------------
# δ_opt / δ_prune
# ---------------------------------------------------------------------------------------------------------------

def test_hand_computed_delta_opt_normalises_before_pooling():
    # diff of normalised pooled maps = [.5-0, .5-1] -> sqrt((.25+.25)/2) = .5.
    # (Pooling first, then normalising, would make ch1 constant [0,0] and give sqrt(.5) = .707: the reference's
    # order, normalise at full resolution then pool, is what is asserted.)
    d = delta_opt(two_channel_map(), pool=2)
    assert d.shape == (2,)
    assert d.tolist() == pytest.approx([0.0, 0.5])


def test_hand_computed_delta_prune_both_references():
    # raw pooled ch0 [0,4], ch1 [2,2]: distance sqrt((4+4)/2) = 2; divided by the max (2).
    assert delta_prune(two_channel_map(), ref=0, pool=2).tolist() == pytest.approx([0.0, 1.0])
    assert delta_prune(two_channel_map(), ref=1, pool=2).tolist() == pytest.approx([1.0, 0.0])


def test_delta_prune_normalises_per_sample_then_averages_batch():
    # pool 1, 1×2 maps. Sample 1: ch0 [0,0], ch1 [3,4] (RMS sqrt(12.5)), ch2 [6,8] (RMS sqrt(50)) -> [0, .5, 1].
    # Sample 2: ch0 [0,0], ch1 [1,1] (RMS 1), ch2 [0,0] (0) -> [0, 1, 0]. Batch mean -> [0, .75, .5].
    fmap = torch.tensor([[[[0.0, 0.0]], [[3.0, 4.0]], [[6.0, 8.0]]],
                         [[[0.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]]])
    assert delta_prune(fmap, ref=0, pool=1).tolist() == pytest.approx([0.0, 0.75, 0.5])


def test_delta_opt_averages_over_batch():
    # Sample 1: the two-channel map (δ = .5). Sample 2: ch1 = copy of ch0 (δ = 0). Mean .25.
    first = two_channel_map()
    second = torch.stack([first[0, 0], first[0, 0]])[None]
    assert delta_opt(torch.cat([first, second]), pool=2).tolist() == pytest.approx([0.0, 0.25])


def test_delta_opt_3d_normalises_the_whole_volume():
    # (1, 2, D=2, H=1, W=2), pool 1. ch0 slices [0,1],[2,3] -> whole-volume normalised [0,1/3],[2/3,1];
    # ch1 slices [0,1],[0,1] -> [0,1],[0,1]. diff [0,2/3],[-2/3,0] -> sqrt((4/9+4/9)/4) = sqrt(2/9).
    ch0 = [[[0.0, 1.0]], [[2.0, 3.0]]]
    ch1 = [[[0.0, 1.0]], [[0.0, 1.0]]]
    d = delta_opt(torch.tensor([[ch0, ch1]]), pool=1)
    assert d.tolist() == pytest.approx([0.0, math.sqrt(2 / 9)])


@pytest.mark.parametrize("shape", [(2, 4, 6, 6), (2, 4, 4, 6, 5)])
def test_identical_and_constant_maps_give_zero_without_nan(shape):
    base = torch.randn(shape[0], 1, *shape[2:])
    identical = base.expand(shape).clone()
    constant = torch.full(shape, 3.0)
    for fmap in (identical, constant):
        assert torch.equal(delta_opt(fmap), torch.zeros(shape[1]))
        for ref in range(shape[1]):
            assert torch.equal(delta_prune(fmap, ref), torch.zeros(shape[1]))


def test_delta_opt_ignores_scale_and_offset_of_any_channel():
    torch.manual_seed(0)
    fmap = torch.randn(3, 5, 9, 8, dtype=torch.float64)
    before = delta_opt(fmap, pool=2)
    changed = fmap.clone()
    changed[:, 0] = 7.5 * changed[:, 0] - 3.0   # the anchor channel itself
    changed[:, 3] = 0.01 * changed[:, 3] + 100.0
    assert torch.allclose(delta_opt(changed, pool=2), before, atol=1e-6)


def test_delta_prune_ignores_common_scale_and_offset_but_not_per_channel_scale():
    # Reference behaviour: δ_prune compares raw pooled maps, normalised by the layer's largest distance.
    torch.manual_seed(1)
    fmap = torch.randn(2, 4, 8, 8, 6, dtype=torch.float64)
    before = delta_prune(fmap, ref=2)
    assert torch.allclose(delta_prune(4.0 * fmap + 11.0, ref=2), before, atol=1e-6)
    scaled = fmap.clone()
    scaled[:, 1] *= 5.0
    assert not torch.allclose(delta_prune(scaled, ref=2), before, atol=1e-3)


def test_delta_prune_has_no_gradient_and_lies_in_unit_interval():
    fmap = torch.randn(2, 6, 8, 8, requires_grad=True)
    d = delta_prune(fmap, ref=4)
    assert not d.requires_grad
    assert d[4] == 0 and d.min() >= 0 and d.max() <= 1


@pytest.mark.parametrize("shape, pool, expected", [
    ((2, 3, 8, 9), 2, (2, 3, 4, 4)),
    ((1, 2, 5, 6, 7), 2, (1, 2, 2, 3, 3)),
    ((1, 2, 1, 4, 4), 2, (1, 2, 1, 2, 2)),   # a dim smaller than pool is pooled by its own size
    ((1, 2, 12, 12), 3, (1, 2, 4, 4)),
    ((1, 2, 5, 5), 1, (1, 2, 5, 5)),
])
def test_pooled_size(shape, pool, expected):
    assert pool_feature_map(torch.randn(shape), pool).shape == expected


def test_pooling_averages_blocks():
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pool_feature_map(fmap, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_delta_opt_gradient_matches_finite_differences():
    torch.manual_seed(2)
    fmap = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: delta_opt(x, pool=2), (fmap,))


def test_gradients_flow_and_stay_finite_with_duplicate_channels():
    torch.manual_seed(3)
    fmap = torch.randn(2, 4, 6, 6, 6)
    fmap[:, 2] = fmap[:, 0]        # an exact copy of the anchor: distance 0, where sqrt has an infinite slope
    fmap[:, 3] = 0.0               # a dead channel: constant map
    fmap.requires_grad_(True)
    sauron_regulariser([fmap], lambda_=0.5).backward()
    assert torch.isfinite(fmap.grad).all()
    assert fmap.grad[:, 1].abs().sum() > 0


def test_delta_opt_handles_half_precision_input():
    fmap = torch.randn(1, 3, 8, 8).to(torch.bfloat16)
    d = delta_opt(fmap)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()


# ---------------------------------------------------------------------------------------------------------------
# Regulariser
# ---------------------------------------------------------------------------------------------------------------

def test_regulariser_is_lambda_times_mean_of_layer_means_over_channels_after_the_first():
    # pool 1. Layer A = the two-channel map: normalised rows ch0 [0,0,1,1], ch1 [0,1,.5,.5]
    #   -> squared diffs [0,1,.25,.25] -> δ_opt[1] = sqrt(.375).
    # Layer B (3 channels, 1×2): ch0 [0,1]; ch1 [1,0] -> diff ±1 -> 1; ch2 [0,1] -> 0. Mean over c >= 1: .5.
    # Layer C has one channel: nothing to pull together, left out of the layer mean.
    layer_b = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]]])
    layer_c = torch.randn(1, 1, 4, 4)
    assert delta_opt(layer_b, pool=1).tolist() == pytest.approx([0.0, 1.0, 0.0])
    reg = sauron_regulariser([two_channel_map(), layer_b, layer_c], lambda_=0.5, pool=1)
    assert reg.item() == pytest.approx(0.5 * (math.sqrt(0.375) + 0.5) / 2)


def test_regulariser_of_single_channel_layers_is_zero():
    assert sauron_regulariser([torch.randn(2, 1, 4, 4)], lambda_=0.5).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Threshold schedule
# ---------------------------------------------------------------------------------------------------------------

SMALL = SauronConfig(tau_start=0.1, tau_max=0.4, kappa=3, rho=1, mu=0.02)  # steps of exactly 0.1, patience 1


def test_schedule_steps_then_waits_rho_epochs_and_stops_at_tau_max():
    state = ThresholdState(SMALL)
    assert state.tau("enc.0") == pytest.approx(0.1)
    taus = [state.step("enc.0", 0.0, converged=True) for _ in range(8)]
    # step, wait 1 epoch (patience 1), step, wait, step (reaches 0.4), wait, at max, wait
    assert taus == pytest.approx([0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4])
    assert state.tau("enc.0") == 0.4            # exactly tau_max, never above


def test_default_schedule_arithmetic():
    state = ThresholdState(SauronConfig())      # 0.001 -> 0.3 in 15 steps of 0.299/15, patience 5
    taus = [state.step("x", 0.0, True) for _ in range(6 * 15 + 12)]
    for k in range(1, 16):
        assert taus[6 * (k - 1)] == pytest.approx(0.001 + k * 0.299 / 15, abs=1e-12)
        assert taus[6 * (k - 1) + 5] == taus[6 * (k - 1)]   # 5 epochs of patience in between
    assert max(taus) == 0.3 and taus[-1] == 0.3
    distinct = sorted(set(taus))
    assert len(distinct) == 15 and distinct[-1] == 0.3


def test_no_step_while_not_converged():
    state = ThresholdState(SMALL)
    assert [state.step("a", 0.0, converged=False) for _ in range(5)] == [0.1] * 5
    assert state.patience("a") == 0


def test_no_step_while_at_least_mu_was_removed():
    state = ThresholdState(SMALL)
    assert state.step("a", 0.02, converged=True) == 0.1      # exactly μ: not fewer than μ
    assert state.step("a", 0.5, converged=True) == 0.1
    assert state.step("a", 0.0199, converged=True) == pytest.approx(0.2)


def test_patience_counts_down_even_without_convergence():
    state = ThresholdState(SauronConfig(tau_start=0.0, tau_max=1.0, kappa=10, rho=3))
    assert state.step("a", 0.0, True) == pytest.approx(0.1)
    assert state.patience("a") == 3
    assert [state.step("a", 0.0, False) for _ in range(3)] == pytest.approx([0.1] * 3)
    assert state.patience("a") == 0
    assert state.step("a", 0.0, True) == pytest.approx(0.2)


def test_layers_are_independent():
    state = ThresholdState(SMALL)
    state.step("a", 0.0, True)
    state.step("b", 0.5, True)
    assert state.tau("a") == pytest.approx(0.2) and state.tau("b") == pytest.approx(0.1)


def test_record_pruning_feeds_the_removed_fraction():
    state = ThresholdState(SMALL)
    assert state.last_removed_fraction("a") == 0.0
    state.record_pruning("a", channels_before=32, channels_after=24)
    assert state.last_removed_fraction("a") == 0.25
    with pytest.raises(ValueError):
        state.record_pruning("a", channels_before=4, channels_after=0)


@pytest.mark.parametrize("losses, converged", [
    ([1.0, 0.9, 0.8], False),                        # fewer than ρ+1 = 4 epochs
    ([1.0, 0.9, 0.8, 0.7], False),                   # new low: still improving
    ([1.0, 0.9, 0.8, 1.1], False),                   # new high: got worse
    ([1.0, 0.9, 0.8, 0.85], True),                   # within [min, max] of the 3 before
    ([1.0, 0.9, 0.8, 0.8], True),                    # ties count as the plateau
    ([5.0, 1.0, 0.9, 0.8, 0.85], True),              # only the last ρ+1 epochs matter
    ([1.0, float("nan"), 0.8, 0.85], False),
])
def test_training_converged(losses, converged):
    assert training_converged(losses, rho=3) is converged


def test_record_train_loss_returns_convergence():
    state = ThresholdState(SMALL)                    # ρ = 1
    assert state.record_train_loss(1.0) is False
    assert state.record_train_loss(0.5) is False     # new low
    assert state.record_train_loss(0.5) is True      # equal to the previous one


def _drive(state: ThresholdState, epochs: int) -> list:
    """A deterministic epoch loop touching every part of the state."""
    trace = []
    for e in range(epochs):
        converged = state.record_train_loss(1.0 + 0.1 * ((e * 7) % 3))
        for layer, n in (("enc.0", 32), ("dec.1", 64)):
            tau = state.step(layer, state.last_removed_fraction(layer), converged)
            removed = (e + len(layer)) % 3
            state.record_pruning(layer, n, n - removed)
            trace.append((layer, tau, state.patience(layer)))
    return trace


def test_state_round_trip_through_json_resumes_identically():
    config = SauronConfig(tau_start=0.001, tau_max=0.3, kappa=15, rho=2, mu=0.05)
    original = ThresholdState(config)
    _drive(original, 17)
    saved = json.loads(json.dumps(original.state_dict()))
    resumed = ThresholdState(config)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == original.state_dict()
    assert _drive(resumed, 40) == _drive(original, 40)
    assert ThresholdState.from_state_dict(saved).state_dict() == saved


def test_loading_state_with_other_settings_or_garbage_fails_clearly():
    state = ThresholdState(SMALL)
    state.step("a", 0.0, True)
    saved = json.loads(json.dumps(state.state_dict()))
    with pytest.raises(CompressError, match="original Sauron settings"):
        ThresholdState(SauronConfig()).load_state_dict(saved)
    with pytest.raises(CompressError, match="malformed"):
        ThresholdState(SMALL).load_state_dict({"version": 1, "config": SMALL.to_dict()})
    broken = json.loads(json.dumps(saved))
    broken["layers"]["a"]["steps"] = 99
    with pytest.raises(CompressError, match="out of range"):
        ThresholdState(SMALL).load_state_dict(broken)


# ---------------------------------------------------------------------------------------------------------------
# Channel choice
# ---------------------------------------------------------------------------------------------------------------

def test_channels_to_keep_threshold_is_inclusive_and_sorted():
    d = torch.tensor([0.9, 0.05, 0.3, 0.0, 0.29, 0.6])
    assert channels_to_keep(d, tau=0.3, ref=3) == [0, 2, 3, 5]


def test_channels_to_keep_never_drops_reference():
    d = torch.tensor([0.5, 0.0, 0.5])
    assert channels_to_keep(d, tau=0.9, ref=1) == [1]


def test_channels_to_keep_fills_up_to_min_channels_with_highest_distances():
    d = torch.tensor([0.2, 0.0, 0.25, 0.1, 0.25])
    assert channels_to_keep(d, tau=0.9, ref=1, min_channels=3) == [1, 2, 4]
    assert channels_to_keep(d, tau=0.9, ref=1, min_channels=4) == [0, 1, 2, 4]
    assert channels_to_keep(d, tau=0.9, ref=1, min_channels=99) == [0, 1, 2, 3, 4]


def test_channels_to_keep_single_channel_layer_keeps_it():
    assert channels_to_keep(torch.zeros(1), tau=0.3, ref=0) == [0]


def test_channels_to_keep_keeps_non_finite_distances():
    d = torch.tensor([0.0, float("nan"), 0.01])
    assert channels_to_keep(d, tau=0.3, ref=0) == [0, 1]


def test_channels_to_keep_rejects_bad_reference():
    with pytest.raises(ValueError):
        channels_to_keep(torch.zeros(3), tau=0.1, ref=3)


def test_choose_reference_is_seeded_and_in_range():
    draws = [choose_reference(7, torch.Generator().manual_seed(11)) for _ in range(3)]
    assert len(set(draws)) == 1
    g = torch.Generator().manual_seed(0)
    many = [choose_reference(7, g) for _ in range(200)]
    assert set(many) == set(range(7))
    assert choose_reference(1, g) == 0
    with pytest.raises(ValueError):
        choose_reference(0, g)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

def test_default_config_is_the_papers():
    c = SauronConfig().validate()
    assert (c.lambda_, c.tau_start, c.tau_max, c.kappa, c.rho, c.mu, c.pool) == (0.5, 0.001, 0.3, 15, 5, 0.02, 2)


@pytest.mark.parametrize("field, value", [
    ("lambda_", -0.1), ("lambda_", float("nan")),
    ("tau_max", 0.0), ("tau_max", 1.5),
    ("tau_start", -0.01), ("tau_start", 0.31),
    ("kappa", 0), ("kappa", 2.5), ("kappa", True),
    ("rho", 0), ("rho", -1),
    ("mu", 1.0), ("mu", -0.1),
    ("pool", 0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(CompressError, match=field):
        SauronConfig(**{field: value}).validate()


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    c = SauronConfig(lambda_=0.25, tau_max=0.5, kappa=10, rho=3, mu=0.01, pool=1)
    assert SauronConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert SauronConfig.from_dict({"tau_max": 1}).tau_max == 1.0
    with pytest.raises(CompressError, match="lamda"):
        SauronConfig.from_dict({"lamda": 0.5})
    with pytest.raises(CompressError, match="tau_max"):
        SauronConfig.from_dict({"tau_max": 2.0})


def test_delta_opt_equals_normalising_at_full_resolution_then_pooling():
    # Independent re-statement of the reference's order on random 3D maps with odd sizes.
    torch.manual_seed(4)
    fmap = torch.randn(2, 4, 5, 7, 6, dtype=torch.float64) * torch.rand(1, 4, 1, 1, 1, dtype=torch.float64)
    low = fmap.amin(dim=(2, 3, 4), keepdim=True)
    high = fmap.amax(dim=(2, 3, 4), keepdim=True)
    pooled = torch.nn.functional.avg_pool3d((fmap - low) / (high - low), 2)
    expected = ((pooled - pooled[:, :1]) ** 2).mean(dim=(2, 3, 4)).sqrt().mean(dim=0)
    assert torch.allclose(delta_opt(fmap, pool=2), expected, atol=1e-12)
