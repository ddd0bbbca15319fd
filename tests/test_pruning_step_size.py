"""The step that crosses a pruning target stops at it: bisection over the count, costed on a meta-device copy and
checked against torch's FLOP counter on really pruned networks."""

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_compress.costs import count_parameters, patch_flops
from nnunet_compress.pruning.dependency import prunable_groups
from nnunet_compress.pruning.importance import l1_importance
from nnunet_compress.pruning.step_size import CostAfterStep, fewest_channels_reaching
from nnunet_compress.pruning.surgery import channel_counts, prune_channels
from nnunet_compress.pruning.taylor import (
    TaylorSettings,
    choose_channels_to_keep,
    plan_step,
    prune_until_target,
    target_check,
)

PATCH = (16, 16, 16)


def tiny_unet():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [8, 16, 24], nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False)


def pruned_copy(net, keep):
    out = copy.deepcopy(net)
    prune_channels(out, keep)
    return out


def test_bisection_finds_the_fewest_channels_that_reach_the_target():
    calls = []

    def choose(n):  # keeps all but the n lowest-ranked of 100 channels
        calls.append(n)
        return {"g": list(range(n, 100))}

    def reaches(keep):
        return 100 - len(keep["g"]) >= 37
    assert fewest_channels_reaching(choose, reaches, 60) == {"g": list(range(37, 100))}
    assert len(calls) <= 1 + 7  # the planned step, then log2(60) rounded up
    # a step that does not reach the target stays as planned; so does an empty one
    assert fewest_channels_reaching(choose, reaches, 20) == {"g": list(range(20, 100))}
    assert fewest_channels_reaching(lambda n: {}, reaches, 20) == {}
    # the planned step itself is the fewest
    assert fewest_channels_reaching(choose, reaches, 37) == {"g": list(range(37, 100))}


def test_cost_after_a_step_equals_the_flop_counter_on_the_pruned_network_and_leaves_it_alone():
    net = tiny_unet()
    before = copy.deepcopy(net.state_dict())
    keep = choose_channels_to_keep(net, TaylorSettings(target_flops=0.5, max_layer_step=1.0).validate(),
                                   l1_importance(net, prunable_groups(net)), 40, channel_counts(net))
    pruned = pruned_copy(net, keep)
    flops = CostAfterStep(net, "flops", patch_flops(net, 1, PATCH), 1, PATCH)
    assert flops.fraction(keep) == pytest.approx(patch_flops(pruned, 1, PATCH) / patch_flops(net, 1, PATCH))
    params = CostAfterStep(net, "params", count_parameters(net), 1, PATCH)
    assert params.fraction(keep) == pytest.approx(count_parameters(pruned) / count_parameters(net))
    assert 0 < flops.fraction(keep) < 1
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="seconds"):
        CostAfterStep(net, "seconds", 1.0, 1, PATCH)


@pytest.mark.parametrize("target", [0.95, 0.9])
def test_a_step_that_would_go_past_the_target_stops_at_it(target):
    """Steps of 30% of the channels take the tiny U-Net to 0.87 of its FLOPs. With the target check the step
    removes the fewest of the same lowest-ranked channels that reach the target: one channel fewer misses it."""
    net = tiny_unet()
    full = patch_flops(net, 1, PATCH)
    settings = TaylorSettings(target_flops=target, step=0.3, max_layer_step=1.0).validate()
    counts = channel_counts(net)

    def score(groups):
        return l1_importance(net, groups)
    unsized = plan_step(net, settings, score, counts)
    sized = plan_step(net, settings, score, counts, reaches=target_check(net, settings, full, 1, PATCH))

    def fraction(keep):
        return patch_flops(pruned_copy(net, keep), 1, PATCH) / full
    assert fraction(unsized.keep) < fraction(sized.keep) <= target
    assert sized.removed < unsized.removed
    one_fewer = choose_channels_to_keep(net, settings, score(prunable_groups(net)), sized.removed - 1, counts)
    assert fraction(one_fewer) > target


def test_a_step_that_does_not_reach_the_target_is_left_as_planned():
    net = tiny_unet()
    settings = TaylorSettings(target_flops=0.5, step=0.3, max_layer_step=1.0).validate()
    reaches = target_check(net, settings, patch_flops(net, 1, PATCH), 1, PATCH)

    def score(groups):
        return l1_importance(net, groups)
    assert (plan_step(net, settings, score, channel_counts(net), reaches=reaches).keep
            == plan_step(net, settings, score, channel_counts(net)).keep)


def test_one_shot_pruning_lands_at_the_target_instead_of_past_it():
    """Steps of 30% go 1 -> 0.87 -> 0.67; a third full step would end near 0.4 of the FLOPs. The last step
    stops at the target: within a few channels of it, below it."""
    net = tiny_unet()
    settings = TaylorSettings(target_flops=0.5, step=0.3, max_layer_step=1.0).validate()
    history = prune_until_target(net, settings, "l1", 1, PATCH, progress=lambda message: None)
    assert history[-1]["fraction"] == pytest.approx(patch_flops(net, 1, PATCH) / patch_flops(tiny_unet(), 1, PATCH))
    assert 0.48 < history[-1]["fraction"] <= 0.5
    assert history[-1]["removed"] < history[-2]["removed"]


def test_latency_targets_are_not_sized_by_shapes():
    net = tiny_unet()
    assert target_check(net, TaylorSettings(target_latency=0.5).validate(), 1.0, 1, PATCH) is None


def test_the_parameter_target_is_sized_too():
    net = tiny_unet()
    settings = TaylorSettings(target_params=0.9, step=0.3, max_layer_step=1.0).validate()
    step = plan_step(net, settings, lambda groups: l1_importance(net, groups), channel_counts(net),
                     reaches=target_check(net, settings, count_parameters(net), 1, PATCH))
    fraction = count_parameters(pruned_copy(net, step.keep)) / count_parameters(net)
    assert 0.85 < fraction <= 0.9
