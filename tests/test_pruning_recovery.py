"""The recovery epochs at the end of a pruning schedule, and the larger steps that still reach the target before them.

Values are computed by hand; the shape estimate of :func:`catch_up_step` is checked against torch's FlopCounterMode
on a uniformly pruned U-Net; the trainers' decisions are checked on stand-ins that carry only what they read.
"""

import copy
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_class_guard import NAMES, FakeTrainer, net_where_one_filter_carries_class_2, trainer_class  # noqa: E402
from test_pruning_surgery import plain_unet  # noqa: E402

from nnunet_compress.costs import patch_flops  # noqa: E402
from nnunet_compress.errors import CompressError  # noqa: E402
from nnunet_compress.pruning.class_guard import StepGuard  # noqa: E402
from nnunet_compress.pruning.dependency import prunable_groups  # noqa: E402
from nnunet_compress.pruning.recovery import (  # noqa: E402
    catch_up_step,
    may_prune,
    pruning_epochs_left,
    recovery_epochs,
)
from nnunet_compress.pruning.sauron import SauronConfig, ThresholdState  # noqa: E402
from nnunet_compress.pruning.surgery import channel_counts, compose_keeps, prune_channels  # noqa: E402
from nnunet_compress.pruning.taylor import TaylorSettings  # noqa: E402


@pytest.mark.parametrize("requested, epochs, expected", [
    (None, 8, 2), (None, 16, 4), (None, 50, 13), (None, 1, 0), (None, 2, 1),
    (0, 10, 0), (3, 10, 3), (5, 2, 1),  # never the whole schedule: epoch 0 may always prune
])
def test_recovery_is_a_quarter_of_the_schedule_rounded_up_unless_given(requested, epochs, expected):
    assert recovery_epochs(requested, epochs) == expected


def test_pruning_stops_before_the_recovery_epochs_and_the_steps_left_count_only_pruning_epochs():
    assert [e for e in range(8) if may_prune(e, 8, 2)] == [0, 1, 2, 3, 4, 5]
    assert pruning_epochs_left(0, 8, 2, every=1) == 6
    assert pruning_epochs_left(0, 8, 2, every=2) == 3  # epochs 0, 2, 4
    assert pruning_epochs_left(5, 8, 2, every=1) == 1
    assert pruning_epochs_left(6, 8, 2, every=1) == 0


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_settings_refuse_a_recovery_that_is_not_a_whole_number(value):
    with pytest.raises(CompressError, match="--recovery-epochs"):
        TaylorSettings(target_flops=0.5, recovery_epochs=value).validate()
    with pytest.raises(CompressError, match="--recovery-epochs"):
        SauronConfig(recovery_epochs=value).validate()


def test_the_plans_step_stays_when_it_reaches_the_target_in_time():
    assert catch_up_step(0.1, 1.0, 0.5, steps_left=12) == 0.1
    assert catch_up_step(0.1, 0.45, 0.5, steps_left=1) == 0.1  # already there
    assert catch_up_step(0.1, 0.9, 0.5, steps_left=0) == 0.1  # nothing left to plan


def test_catch_up_from_the_shapes_splits_the_way_to_the_target_into_equal_steps():
    s = catch_up_step(0.05, 1.0, 0.5, steps_left=2)
    assert s == pytest.approx(1 - 0.5 ** 0.25)  # (1 - s)² per step, twice: 0.5
    assert ((1 - s) ** 2) ** 2 == pytest.approx(0.5)


def test_catch_up_reads_the_cost_rate_of_the_last_step():
    # measured on the demo: a 10% step took the FLOPs from 0.742 to 0.641 of the parent's; one step is left
    s = catch_up_step(0.1, 0.641, 0.5, steps_left=1, last_step=(0.1, 0.641 / 0.742))
    rate = math.log(0.641 / 0.742) / 0.1
    assert 0.641 * math.exp(rate * s) == pytest.approx(0.5)
    assert s == pytest.approx(0.1698, abs=1e-3)  # ln(0.5 / 0.641) / ln(0.641 / 0.742) × 0.1
    assert catch_up_step(0.1, 0.9, 0.1, steps_left=1) == 0.5  # never more than half in one step
    # a last step that saved nothing (or a measurement that went up) says nothing about the rate: the shapes decide
    assert catch_up_step(0.05, 1.0, 0.5, 2, last_step=(0.1, 1.0)) == pytest.approx(1 - 0.5 ** 0.25)


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_the_shape_estimate_matches_the_flop_counter_on_a_uniformly_pruned_unet(share):
    net = plain_unet(3, features=[16, 32, 64, 128], n_stages=4, strides=[1, 2, 2, 2])
    full = patch_flops(net, 2, (32, 32, 32))
    pruned = copy.deepcopy(net)
    prune_channels(pruned, {g.name: list(range(round((1 - share) * g.size))) for g in prunable_groups(pruned)})
    assert patch_flops(pruned, 2, (32, 32, 32)) / full == pytest.approx((1 - share) ** 2, abs=0.025)


# ---- the trainers ----------------------------------------------------------------------------------------------

def taylor_stand_in(settings: TaylorSettings, num_epochs: int, flops_fraction: float = 1.0):
    taylor = trainer_class("nnUNetTrainerTaylorPruning")

    class StandIn:
        recovery_epochs = taylor.recovery_epochs
        pruning_due = taylor.pruning_due
        step_settings = taylor.step_settings
        current_fraction = taylor.current_fraction
        reference_cost = taylor.reference_cost

        def __init__(self):
            self.settings, self.num_epochs, self.current_epoch = settings, num_epochs, 0
            self.target_reached, self.pruning_history, self.log = False, [], []
            self.initial_cost = (1000, 1000)

        def current_cost(self):
            return 1000, round(1000 * flops_fraction)

        def print_to_log_file(self, *args):
            self.log.append(" ".join(map(str, args)))
    return StandIn()


def test_taylor_takes_no_step_in_the_recovery_epochs_and_says_so_once():
    trainer = taylor_stand_in(TaylorSettings(target_flops=0.5, step=0.1).validate(), num_epochs=8,
                              flops_fraction=0.536)
    due = []
    for epoch in range(8):
        trainer.current_epoch = epoch
        due.append(trainer.pruning_due())
    assert due == [True] * 6 + [False] * 2
    notes = [line for line in trainer.log if "--recovery-epochs" in line]
    assert len(notes) == 1 and "last 2 epochs" in notes[0] and "flops 0.536 > 0.5" in notes[0]

    every_epoch = taylor_stand_in(TaylorSettings(target_flops=0.5, recovery_epochs=0).validate(), num_epochs=8)
    every_epoch.current_epoch = 7
    assert every_epoch.pruning_due()
    every_epoch.target_reached = True
    assert not every_epoch.pruning_due()


def test_taylor_steps_grow_when_the_plans_step_would_miss_the_target_before_the_recovery_epochs():
    trainer = taylor_stand_in(TaylorSettings(target_flops=0.5, step=0.1).validate(), num_epochs=8,
                              flops_fraction=0.641)
    trainer.current_epoch = 5  # the last epoch that may prune
    trainer.pruning_history = [{"epoch": 4, "step": 0.1, "fraction_before": 0.742, "fraction": 0.641}]
    settings = trainer.step_settings()
    assert settings.step == pytest.approx(catch_up_step(0.1, 0.641, 0.5, 1, (0.1, 0.641 / 0.742)))
    assert settings.step > 0.1 and settings.target_flops == 0.5 and trainer.settings.step == 0.1
    assert any("1 pruning step(s) left" in line for line in trainer.log)
    trainer.current_epoch, trainer.log = 0, []
    assert trainer.step_settings().step == 0.1 and not trainer.log  # early on the plans' step is enough


def test_sauron_removes_nothing_in_the_recovery_epochs_nor_after_the_last():
    sauron = trainer_class("nnUNetTrainerSauron")
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    trainer.sauron, trainer.num_epochs = SauronConfig().validate(), 8
    trainer.recovery_epochs = sauron.recovery_epochs.fget(trainer)  # the trainer's property, on the stand-in
    trainer.thresholds, trainer.class_guard = ThresholdState(trainer.sauron), StepGuard(0.5, NAMES)
    trainer.channel_history, trainer._epoch_wall_start = [], time.time()
    trainer.current_cost = lambda: (1, 1)
    trainer.log_pruning_status = lambda removed: None
    removals = []
    trainer.remove_below_thresholds = lambda groups, converged: removals.append(trainer.current_epoch) or 0
    for epoch in range(8):
        trainer.current_epoch = epoch
        sauron.prune_by_thresholds(trainer)
    # a removal after epoch e changes the network of epoch e + 1: the last 2 epochs (6, 7) train it unchanged
    assert removals == [0, 1, 2, 3, 4]
    assert sum("no removal in the last 2 epoch(s)" in line for line in trainer.log) == 1
    assert len(trainer.channel_history) == 8


def test_composed_keeps_remove_what_the_two_steps_remove_one_after_the_other():
    net = plain_unet(3, features=[8, 16, 32])
    sizes = {g.name: g.size for g in prunable_groups(net)}
    names = sorted(sizes)
    first = {names[0]: [0, 2, 3, 5, 7], names[1]: list(range(1, sizes[names[1]]))}
    then = {names[0]: [1, 4], names[2]: [0, 1, 2]}
    stepwise, at_once = copy.deepcopy(net), copy.deepcopy(net)
    prune_channels(stepwise, first)
    prune_channels(stepwise, then)
    combined = compose_keeps(first, then, sizes)
    assert combined[names[0]] == [2, 7] and combined[names[2]] == [0, 1, 2]
    assert combined[names[1]] == list(range(1, sizes[names[1]]))
    prune_channels(at_once, combined)
    a, b = stepwise.state_dict(), at_once.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_pruning_epoch_takes_more_steps_at_once_until_the_target_is_met():
    """Steps of 5% from the full network, one epoch left for pruning: one step cannot get to half the FLOPs, so the
    trainer keeps stepping in that epoch; the history and the class guard see one step (its keep composed),
    protected channels survive every one of them, and the step that crosses the target stops at it."""
    from types import SimpleNamespace
    taylor = trainer_class("nnUNetTrainerTaylorPruning")
    net = plain_unet(2, features=[8, 16, 32], deep_supervision=False).train()
    full = patch_flops(net, 2, (16, 16))
    trainer = FakeTrainer(net)
    for name in ("pruning_step", "planned_step", "another_step_now", "fraction_after_step", "step_settings",
                 "current_fraction", "reference_cost"):
        setattr(trainer, name, getattr(taylor, name).__get__(trainer))
    trainer.settings = TaylorSettings(target_flops=0.5, step=0.05, max_layer_step=1.0, min_keep_fraction=0.1,
                                      recovery_epochs=0).validate()
    trainer.num_epochs, trainer.current_epoch, trainer.recovery_epochs = 4, 3, 0
    trainer.num_input_channels, trainer.configuration_manager = 2, SimpleNamespace(patch_size=(16, 16))
    trainer.initial_cost, trainer.pruning_history = trainer.current_cost(), []
    trainer.class_guard, trainer.latency_prediction = StepGuard(0.0, NAMES), lambda: None
    trainer.loss = None
    generator = torch.Generator().manual_seed(0)
    trainer.training_batches = lambda: [(torch.randn(2, 2, 16, 16, generator=generator),
                                         torch.randint(0, 3, (2, 1, 16, 16), generator=generator)) for _ in range(2)]
    sizes = channel_counts(net)
    # every group's last channel is protected: each further step must re-index them, as the guard will for the whole
    trainer.class_guard.protected.add({name: [size - 1] for name, size in sizes.items()})
    trainer.pruning_step()
    record = trainer.pruning_history[-1]
    after = channel_counts(trainer.network)
    assert trainer.class_guard.protected.state() == {name: [after[name] - 1] for name in sizes}
    assert trainer.target_reached and record["extra_steps"] >= 1
    assert record["fraction"] == patch_flops(trainer.network, 2, (16, 16)) / full <= 0.5
    # each step that crosses the target stops at it: the old code went on to 0.33 here
    assert record["fraction"] > 0.47
    assert record["removed"] == sum(sizes.values()) - sum(channel_counts(trainer.network).values())
    assert any("more step(s) at once" in line for line in trainer.log)
