"""Taylor pruning's pure helpers: the scoring batches cover every class, the settings reject bad counts."""

import pytest
import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.taylor import TaylorSettings, batches_covering_classes


def label_batches(label_sets):
    """draw() returning batches whose (deep-supervision list of) label maps hold exactly the given labels."""
    it = iter(label_sets)

    def draw():
        labels = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
        for i, label in enumerate(next(it)):
            labels.view(-1)[i] = label
        return torch.zeros(2, 1, 4, 4, 4), [labels, labels[:, :, ::2, ::2, ::2]]
    return draw


def test_draws_the_minimum_when_every_class_is_already_there():
    draw = label_batches([[1, 2, 3], [1], [4], [4]])
    assert len(list(batches_covering_classes(draw, 5, minimum=2, maximum=10))) == 3  # the third brings class 4
    draw = label_batches([[1, 2, 3, 4], [1], [2]])
    assert len(list(batches_covering_classes(draw, 5, minimum=2, maximum=10))) == 2


def test_keeps_drawing_until_a_rare_class_appears():
    sets = [[1, 2]] * 6 + [[2, 3]] + [[1]] * 5
    assert len(list(batches_covering_classes(label_batches(sets), 4, minimum=2, maximum=20))) == 7


def test_stops_at_the_maximum_and_reports_the_missing_classes():
    missing = []
    got = list(batches_covering_classes(label_batches([[1]] * 10), 4, 2, 5, on_missing=missing.extend))
    assert len(got) == 5 and missing == [2, 3]


def test_plain_tensor_targets_and_bad_counts():
    def draw():
        return torch.zeros(1), torch.tensor([[0, 1]])
    assert len(list(batches_covering_classes(draw, 2, 3, 3))) == 3
    with pytest.raises(CompressError, match="minimum"):
        list(batches_covering_classes(draw, 2, 3, 2))


def test_settings_reject_a_maximum_below_the_minimum():
    with pytest.raises(CompressError, match="max-accumulate-batches"):
        TaylorSettings(target_flops=0.5, accumulate_batches=8, max_accumulate_batches=4).validate()
    TaylorSettings(target_flops=0.5, accumulate_batches=8, max_accumulate_batches=8).validate()


def test_scoring_batch_cap_defaults_to_32_or_the_minimum_if_larger():
    assert TaylorSettings(target_flops=0.5, accumulate_batches=8).scoring_batch_cap == 32
    assert TaylorSettings(target_flops=0.5, accumulate_batches=40).scoring_batch_cap == 40
    assert TaylorSettings(target_flops=0.5, accumulate_batches=8, max_accumulate_batches=12).scoring_batch_cap == 12
    # plans written before the setting existed (or with a large accumulate_batches) still load
    assert TaylorSettings.from_dict({"target_flops": 0.5, "accumulate_batches": 64}).scoring_batch_cap == 64


class Group:
    def __init__(self, name, size):
        self.name, self.size = name, size


def test_step_floors_cap_what_one_step_takes_from_a_layer():
    from nnunet_compress.pruning.taylor import removable_channels, step_floors
    groups = [Group("narrow", 8), Group("wide", 64), Group("at_floor", 4)]
    floors = step_floors(groups, {"narrow": 2, "wide": 16, "at_floor": 4}, max_layer_step=0.2)
    # 20% of 8 is 1.6 -> one channel; 20% of 64 -> 12; a layer at its floor keeps it
    assert floors == {"narrow": 7, "wide": 52, "at_floor": 4}
    assert removable_channels(groups, floors) == 13
    # never above the layer floor, and at least one channel may always go
    assert step_floors(groups, 2, max_layer_step=1.0) == {"narrow": 2, "wide": 2, "at_floor": 2}
    assert step_floors([Group("tiny", 3)], 1, max_layer_step=0.01) == {"tiny": 2}


def test_settings_reject_a_layer_step_outside_zero_one():
    for bad in (0.0, 1.5):
        with pytest.raises(CompressError, match="max-layer-step"):
            TaylorSettings(target_flops=0.5, max_layer_step=bad).validate()



def tiny_plain_unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [8, 16, 24], nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False)


def test_plan_step_leaves_the_network_alone_and_removes_the_lowest_scores():
    """The shared step only chooses: the network is untouched, removing its complement changes the channel counts by
    exactly step.removed, and within every group that loses channels the removed ones score lowest."""
    from nnunet_compress.pruning.dependency import prunable_groups
    from nnunet_compress.pruning.importance import l1_importance
    from nnunet_compress.pruning.surgery import channel_counts, prune_channels
    from nnunet_compress.pruning.taylor import plan_step
    net = tiny_plain_unet()
    before = channel_counts(net)
    scores = l1_importance(net, prunable_groups(net))
    step = plan_step(net, TaylorSettings(target_flops=0.5, step=0.2), lambda groups: l1_importance(net, groups),
                     before)
    assert channel_counts(net) == before
    assert [g.name for g in step.groups] == [g.name for g in prunable_groups(net)]
    assert step.removed > 0 and step.keep
    for name, kept in step.keep.items():
        removed = sorted(set(range(before[name])) - set(kept))
        assert removed and max(scores[name][removed]) <= min(scores[name][kept])
    prune_channels(net, step.keep)
    assert sum(before.values()) - sum(channel_counts(net).values()) == step.removed
