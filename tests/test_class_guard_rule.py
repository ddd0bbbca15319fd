"""Which classes the class guard judges, and when its protection ends.

A class counts only when the network has learned it: its pseudo Dice before the step above the floor by more
than its noise (twice the standard deviation of its recent validations), and a fall larger than that noise.
Protection after an undo ends after --class-guard-release epochs or when the class recovers past its noise.
The network tests reuse test_class_guard's U-Net in which one filter alone carries class 2 (the lesion).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_class_guard import (  # noqa: E402
    CARRIER,
    NAMES,
    FakeTrainer,
    class_dice,
    net_where_one_filter_carries_class_2,
    patches,
    remove_the_carrier,
    trainer_class,
)

from nnunet_compress.cli.main import build_parser  # noqa: E402
from nnunet_compress.cli.pruning import class_guard_rule_from_args  # noqa: E402
from nnunet_compress.errors import CompressError  # noqa: E402
from nnunet_compress.pruning.class_guard import (  # noqa: E402
    ParentAgreement,
    StepGuard,
    class_noise,
    judge_classes,
    network_snapshot,
    restore_network,
)
from nnunet_compress.pruning.sauron import SauronConfig, ThresholdState  # noqa: E402
from nnunet_compress.pruning.surgery import channel_counts  # noqa: E402
from nnunet_compress.pruning.taylor import TaylorSettings  # noqa: E402

# ---- the rule -------------------------------------------------------------------------------------------------

def test_noise_is_twice_the_spread_of_the_last_validations():
    assert class_noise([0.8, 0.82, 0.78], 5) == pytest.approx(2 * 0.016330, abs=1e-5)
    assert class_noise([0.0, 0.9, 0.8, 0.82, 0.78], 3) == pytest.approx(2 * 0.016330, abs=1e-5)  # the last 3
    assert class_noise([0.5, float("nan"), 0.7], 5) == pytest.approx(0.2)  # NaN: not measured that epoch
    assert class_noise([0.8], 5) is None and class_noise([0.8, 0.9], 0) is None


def test_a_class_below_the_floor_is_reported_not_guarded():
    # the from-scratch run: organ1 0.039 -> 0.005 after one epoch from random weights
    collapsed, unguarded = judge_classes([0.039, 0.9], [0.005, 0.88], 0.5, ["organ1", "organ2"], floor=0.3)
    assert collapsed == []
    assert [(d.name, d.before, d.after) for d in unguarded] == [("organ1", 0.039, 0.005)]
    assert "not above the floor 0.3" in unguarded[0].unguarded
    # the guard as it was (floor 0, no noise) undid that step
    assert [d.name for d in judge_classes([0.039, 0.9], [0.005, 0.88], 0.5, ["organ1", "organ2"])[0]] == ["organ1"]


def test_a_class_within_its_noise_of_the_floor_or_falling_within_its_noise_is_not_guarded():
    # before 0.447 with noise 0.189: 0.258 is not above the floor 0.3 (a class still being found)
    collapsed, unguarded = judge_classes([0.447], [0.0], 0.5, ["vessel"], floor=0.3, noise=[0.189])
    assert collapsed == [] and "within its noise 0.189 of the floor 0.3" in unguarded[0].unguarded
    # learned (0.95 - 0.6 > 0.3) but the fall 0.95 -> 0.44 (0.51) is no larger than a noise of 0.6
    collapsed, unguarded = judge_classes([0.95], [0.44], 0.5, ["vessel"], floor=0.3, noise=[0.6])
    assert collapsed == [] and "fall was within its noise 0.600" in unguarded[0].unguarded
    # the same fall with a noise of 0.5 is a collapse
    assert [d.name for d in judge_classes([0.95], [0.44], 0.5, ["vessel"], floor=0.3, noise=[0.5])[0]] == ["vessel"]


def test_a_learned_class_that_collapses_is_a_collapse_with_its_floor_and_noise_recorded():
    collapsed, unguarded = judge_classes([0.9, 0.85], [0.3, 0.84], 0.5, ["liver", "kidney"], floor=0.3,
                                         noise=[0.04, 0.03])
    assert unguarded == []
    assert [d.to_dict() for d in collapsed] == [{"index": 0, "name": "liver", "before": 0.9, "after": 0.3,
                                                 "floor": 0.3, "noise": 0.04, "unguarded": ""}]
    # an unmeasured noise (fewer than two validations): the floor alone decides, as for Taylor's first step
    assert [d.name for d in judge_classes([0.9], [0.1], 0.5, ["liver"], floor=0.3, noise=[None])[0]] == ["liver"]


# ---- the step guard: judging with the noise of recorded validations ---------------------------------------

def learned_guard(**kwargs) -> StepGuard:
    guard = StepGuard(0.5, NAMES, **kwargs)
    for epoch, values in enumerate([[0.95, 0.97], [0.97, 0.99], [0.96, 1.0]]):
        guard.observe(epoch, values)
    return guard


def test_step_guard_keeps_a_removal_whose_class_was_not_learned_and_reports_it():
    net = net_where_one_filter_carries_class_2()
    guard = StepGuard(0.5, NAMES)
    guard.observe(0, [0.9, 0.0])
    guard.observe(1, [0.9, 0.039])
    sizes = channel_counts(net)
    keep = remove_the_carrier(net)
    guard.begin_step(2, [0.9, 0.039], sizes, keep, network_snapshot(net))
    assert guard.finish_step([0.9, 0.005], 2) is None and guard.rollbacks == []
    assert guard.protected.state() == {}
    assert "lesion Dice 0.039 -> 0.005 fell below 0.5" in guard.describe_unguarded()
    assert guard.unguarded == [{"step_epoch": 2, "checked_epoch": 2, "classes": [
        {"index": 1, "name": "lesion", "before": 0.039, "after": 0.005, "floor": 0.3,
         "noise": pytest.approx(0.039), "unguarded": "its Dice before the step was not above the floor 0.3"}]}]


def test_step_guard_undoes_a_learned_class_that_collapses_and_drops_the_undone_validations():
    net = net_where_one_filter_carries_class_2()
    batches = patches()
    labels = ParentAgreement(net, batches).reference
    guard = learned_guard()
    before, sizes, snapshot = class_dice(net, batches, labels), channel_counts(net), network_snapshot(net)
    keep = remove_the_carrier(net)
    guard.begin_step(3, before, sizes, keep, snapshot)
    guard.observe(3, [1.0, 0.5])  # an intermediate validation of the pruned network (prune_every > 1)
    after = class_dice(net, batches, labels)
    assert guard.finish_step(after, 4) is snapshot
    restore_network(net, snapshot)
    rollback = guard.rollbacks[0]
    assert rollback["classes"][0]["name"] == "lesion" and rollback["classes"][0]["after"] == 0.0
    assert rollback["classes"][0]["noise"] == pytest.approx(2 * 0.012472, abs=1e-5)  # of 0.97, 0.99, 1.0
    assert rollback["rule"] == {"share": 0.5, "floor": 0.3, "noise_epochs": 5, "noise_stds": 2.0,
                                "release_epochs": 0}
    assert guard.protected.state() == {CARRIER: [0]}
    guard.observe(4, after)  # the undone network's validation is not noise of the restored one
    assert [epoch for epoch, _ in guard.history] == [0, 1, 2]
    assert "above the floor 0.3 by more than its noise" in guard.describe_last_rollback()


# ---- protection that ends ---------------------------------------------------------------------------------

def undone_guard(release_epochs: int) -> StepGuard:
    """A guard that undid the carrier's removal at the validation of epoch 4 (lesion 0.99 -> 0.0)."""
    net = net_where_one_filter_carries_class_2()
    guard = learned_guard(release_epochs=release_epochs)
    sizes, snapshot = channel_counts(net), network_snapshot(net)
    keep = remove_the_carrier(net)
    guard.begin_step(3, [0.96, 1.0], sizes, keep, snapshot)
    assert guard.finish_step([0.96, 0.0], 4) is snapshot
    return guard


def test_protected_filters_are_released_after_the_given_epochs():
    guard = undone_guard(release_epochs=3)
    steady = [0.96, 0.98]  # not above 1.0 + noise: no recovery
    for epoch in (5, 6):
        assert guard.release(epoch, steady) == [] and guard.protected.state() == {CARRIER: [0]}
    released = guard.release(7, steady)
    assert guard.protected.state() == {} and guard.protections == []
    assert released[0]["released"] == {"epoch": 7, "reason": "3 epochs after the undo (--class-guard-release)",
                                       "filters": 1}
    assert "released the 1 filters protected by the undo at epoch 4" in StepGuard.describe_release(released[0])


def test_protected_filters_are_released_when_the_class_recovers_past_its_noise():
    guard = learned_guard()
    net = net_where_one_filter_carries_class_2()
    sizes, snapshot = channel_counts(net), network_snapshot(net)
    keep = remove_the_carrier(net)
    guard.begin_step(3, [0.96, 0.8], sizes, keep, snapshot)  # lesion 0.8 before, noise 0.025
    assert guard.finish_step([0.96, 0.1], 4) is snapshot
    noise = guard.rollbacks[0]["classes"][0]["noise"]
    assert guard.release(5, [0.96, 0.8 + noise - 0.001]) == []  # back, but not past its noise
    assert guard.protected.state() == {CARRIER: [0]}
    released = guard.release(6, [0.96, 0.8 + noise + 0.001])
    assert released and released[0]["released"]["reason"].startswith("recovered: lesion 0.826 > 0.800 + noise")
    assert guard.protected.state() == {}


def test_without_release_epochs_protection_lasts_while_the_class_has_not_recovered():
    guard = undone_guard(release_epochs=0)  # Taylor's default: a trained parent's collapse would recur
    for epoch in range(5, 50):
        assert guard.release(epoch, [0.96, 0.99]) == []
    assert guard.protected.state() == {CARRIER: [0]}


def test_nothing_is_released_while_a_step_is_pending_and_a_channel_another_undo_holds_stays():
    guard = undone_guard(release_epochs=2)
    # a second undo, at epoch 5, that protects the same filter
    guard.rollbacks.append({**guard.rollbacks[0], "checked_epoch": 5, "released": None})
    guard.protections.append({"rollback": 1, "channels": {CARRIER: [0]}})
    guard.pending = {"epoch": 6}
    assert guard.release(6, [0.9, 0.9]) == []
    guard.pending = None
    guard.release(6, [0.9, 0.9])
    assert guard.protected.state() == {CARRIER: [0]} and len(guard.protections) == 1


def test_protections_follow_later_removals_and_come_back_with_an_undone_step():
    guard = undone_guard(release_epochs=5)
    guard.protected.add({CARRIER: [3]})
    sizes = {CARRIER: 4}
    guard.begin_step(5, [0.96, 1.0], sizes, {CARRIER: [0, 3]}, {"tag": "snapshot"})
    assert guard.protected.state() == {CARRIER: [0, 1]} and guard.protections[0]["channels"] == {CARRIER: [0]}
    assert guard.finish_step([0.96, 0.99], 5) is None  # kept
    guard.begin_step(6, [0.96, 1.0], {CARRIER: 2, "other": 3}, {CARRIER: [0, 1], "other": [0, 2]},
                     {"tag": "snapshot"})
    assert guard.finish_step([0.96, 0.0], 6) == {"tag": "snapshot"}  # undone: both protections stand
    assert guard.protections == [{"rollback": 0, "channels": {CARRIER: [0]}},
                                 {"rollback": 1, "channels": {"other": [1]}}]
    assert guard.protected.state() == {CARRIER: [0, 1], "other": [1]}
    released = guard.release(9, [0.96, 0.98])  # 5 epochs after the first undo (epoch 4): only that one
    assert [r["checked_epoch"] for r in released] == [4]
    assert guard.protected.state() == {CARRIER: [1], "other": [1]}


def test_state_round_trip_and_a_checkpoint_from_before_releases_keeps_its_set_for_good():
    guard = undone_guard(release_epochs=3)
    resumed = StepGuard(0.5, NAMES, release_epochs=3)
    resumed.load_state(guard.state())
    assert resumed.state() == guard.state()
    assert resumed.release(7, [0.9, 0.9]) and resumed.protected.state() == {}
    old = {"share": 0.5, "protected": {CARRIER: [0]}, "rollbacks": [{"step_epoch": 3, "checked_epoch": 4,
           "classes": [{"index": 1, "name": "lesion", "before": 1.0, "after": 0.0}], "protected": {CARRIER: [0]},
           "step": {}}], "pending": None, "baseline": None}
    legacy = StepGuard(0.5, NAMES, release_epochs=3)
    legacy.load_state(old)
    assert legacy.release(40, [1.0, 1.0]) == [] and legacy.protected.state() == {CARRIER: [0]}


# ---- in the trainers ----------------------------------------------------------------------------------------

def sauron_trainer(guard: StepGuard):
    sauron = trainer_class("nnUNetTrainerSauron")
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    config = SauronConfig(rho=1, kappa=2)
    trainer.sauron, trainer.thresholds, trainer.class_guard = config, ThresholdState(config), guard
    trainer._register_feature_hooks = lambda: None
    trainer.num_epochs, trainer.channel_history, trainer.method = 10, [], "sauron"
    trainer.recovery_epochs = sauron.recovery_epochs.fget(trainer)  # the trainer's property, on the stand-in
    trainer._references = {CARRIER: 1}
    return sauron, trainer


def sauron_removes_the_carrier(sauron, trainer, epoch: int) -> int:
    trainer.current_epoch = epoch
    # δ_prune: the carrier (channel 0) looks redundant, the others do not; reference channel 1
    trainer._dprune_sum = {CARRIER: torch.tensor([0.0, 0.0, 0.9, 0.8])[:channel_counts(trainer.network)[CARRIER]]}
    trainer._dprune_count = {CARRIER: 1}
    trainer.thresholds.record_train_loss(1.0)
    return sauron.remove_below_thresholds(trainer, trainer.prunable_groups(), converged=True)


def test_sauron_from_scratch_keeps_a_removal_on_an_unlearned_class_and_says_so():
    sauron, trainer = sauron_trainer(StepGuard(0.5, NAMES, release_epochs=5))
    dice = {0: [0.2, 0.0], 1: [0.3, 0.039], 2: [0.35, 0.005]}
    trainer.logged_class_dice = lambda epoch: dice.get(epoch)
    for epoch in (0, 1):
        trainer.class_guard_after_validation(epoch)
    assert sauron_removes_the_carrier(sauron, trainer, 1) == 1
    trainer.current_epoch = 2
    assert not sauron.undo_pending_removal(trainer)
    assert channel_counts(trainer.network)[CARRIER] == 3 and trainer.class_guard.protected.state() == {}
    assert any("lesion Dice 0.039 -> 0.005" in line and "not guarded" in line and "floor 0.3" in line
               for line in trainer.log)


def test_sauron_undoes_a_learned_class_then_releases_its_filters_and_may_remove_them_again():
    sauron, trainer = sauron_trainer(StepGuard(0.5, NAMES, release_epochs=2))
    dice = {0: [0.9, 0.95], 1: [0.92, 0.97], 2: [0.9, 0.0]}
    trainer.logged_class_dice = lambda epoch: dice.get(epoch)
    for epoch in (0, 1):
        trainer.class_guard_after_validation(epoch)
    sizes = channel_counts(trainer.network)
    assert sauron_removes_the_carrier(sauron, trainer, 1) == 1
    trainer.current_epoch = 2
    assert sauron.undo_pending_removal(trainer)
    trainer.class_guard_after_validation(2)
    assert channel_counts(trainer.network) == sizes and trainer.class_guard.protected.state() == {CARRIER: [0]}
    assert sauron_removes_the_carrier(sauron, trainer, 3) == 0  # protected: the layer loses nothing
    dice[3] = dice[4] = [0.91, 0.96]
    trainer.class_guard_after_validation(3)
    assert trainer.class_guard.protected.state() == {CARRIER: [0]}
    trainer.class_guard_after_validation(4)  # 2 epochs after the undo at epoch 2
    assert trainer.class_guard.protected.state() == {}
    assert any("released the 1 filters protected by the undo at epoch 2" in line for line in trainer.log)
    assert sauron_removes_the_carrier(sauron, trainer, 4) == 1
    report = sauron.pruning_report(trainer)
    assert report["rollbacks"][0]["released"] == {"epoch": 4, "reason": "2 epochs after the undo "
                                                  "(--class-guard-release)", "filters": 1}
    assert report["rollbacks"][0]["classes"][0]["noise"] == pytest.approx(0.02)  # 2 × std of 0.95, 0.97
    assert report["class_guard_rule"]["floor"] == 0.3 and report["class_guard_rule"]["release_epochs"] == 2


def test_taylor_from_a_trained_parent_undoes_a_collapse_and_keeps_the_filter_protected():
    taylor = trainer_class("nnUNetTrainerTaylorPruning")
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    batches = patches()
    labels = ParentAgreement(trainer.network, batches).reference
    trainer.settings = TaylorSettings(target_flops=0.5)
    trainer.class_names, trainer.method = (lambda: NAMES), "taylor"
    trainer.class_guard = trainer.make_class_guard(trainer.settings)
    assert trainer.class_guard.rule()["release_epochs"] == 0  # Taylor's default
    fine_tuned = {0: [0.93, 0.99], 1: [0.95, 1.0], 2: [0.94, 0.98]}
    trainer.logged_class_dice = lambda epoch: fine_tuned.get(epoch)
    for epoch in fine_tuned:
        trainer.class_guard_after_validation(epoch)
    before, sizes, snapshot = class_dice(trainer.network, batches, labels), channel_counts(trainer.network), \
        trainer.snapshot_for_rollback()
    keep = remove_the_carrier(trainer.network)
    trainer.pruning_history, trainer.target_reached, trainer.current_epoch = [{"epoch": 3}], False, 3
    trainer.class_guard.begin_step(3, before, sizes, keep, snapshot, trainer.pruning_history[0])
    after = class_dice(trainer.network, batches, labels)
    fine_tuned[3] = after
    trainer.log_pruning_status = lambda removed: None
    taylor.judge_pending_step(trainer)
    assert channel_counts(trainer.network) == sizes and trainer.pruning_history == []
    for epoch in range(3, 30):  # fine-tuning goes on at the parent's level: the filter stays protected
        fine_tuned[epoch] = [0.94, 0.99]
        trainer.class_guard_after_validation(epoch)
    assert trainer.class_guard.protected.state() == {CARRIER: [0]}


# ---- settings: the plans and the command line --------------------------------------------------------------

@pytest.mark.parametrize("settings_class, extra, release", [(SauronConfig, {}, 5),
                                                            (TaylorSettings, {"target_flops": 0.5}, 0)])
def test_plans_round_trip_and_old_plans_without_the_new_keys_load_with_the_defaults(settings_class, extra, release):
    new = settings_class(**extra, class_guard_floor=0.4, class_guard_noise_epochs=3, class_guard_release=7)
    d = new.validate().to_dict()
    assert (d["class_guard_floor"], d["class_guard_noise_epochs"], d["class_guard_release"]) == (0.4, 3, 7)
    assert settings_class.from_dict(d).to_dict() == d
    old = {k: v for k, v in d.items() if not k.startswith("class_guard_")}
    loaded = settings_class.from_dict(old)
    assert (loaded.class_guard_floor, loaded.class_guard_noise_epochs, loaded.class_guard_release) == (0.3, 5, release)


def test_a_sauron_plans_file_from_before_the_options_loads():
    # the settings section `plan sauron` wrote before the floor, noise and release existed
    old = {"lambda_": 0.5, "tau_start": 0.2, "tau_max": 0.4, "kappa": 4, "rho": 2, "mu": 0.02, "pool": 2,
           "class_guard": 0.5, "seed": 12345}
    config = SauronConfig.from_dict(old)
    assert config.class_guard == 0.5 and config.class_guard_floor == 0.3 and config.class_guard_release == 5


@pytest.mark.parametrize("field, bad, option", [("class_guard_floor", 1.0, "--class-guard-floor"),
                                                ("class_guard_floor", "low", "--class-guard-floor"),
                                                ("class_guard_noise_epochs", -1, "--class-guard-noise-epochs"),
                                                ("class_guard_release", 2.5, "--class-guard-release")])
def test_bad_rule_values_are_refused_naming_the_option(field, bad, option):
    with pytest.raises(CompressError, match=option):
        SauronConfig(**{field: bad}).validate()
    with pytest.raises(CompressError, match=option):
        TaylorSettings(target_flops=0.5, **{field: bad}).validate()


@pytest.mark.parametrize("method, release", [("sauron", 5), ("taylor", 0)])
def test_command_line_options_reach_the_settings(method, release):
    parser = build_parser()
    base = ["plan", method, "-d", "1", "-c", "3d_fullres"] + (["--target-flops", "0.5"] if method == "taylor" else [])
    assert class_guard_rule_from_args(parser.parse_args(base)) == {
        "class_guard_floor": 0.3, "class_guard_noise_epochs": 5, "class_guard_release": release}
    args = parser.parse_args(base + ["--class-guard-floor", "0.2", "--class-guard-noise-epochs", "4",
                                     "--class-guard-release", "3"])
    rule = class_guard_rule_from_args(args)
    settings = SauronConfig(**rule) if method == "sauron" else TaylorSettings(target_flops=0.5, **rule)
    assert settings.validate().to_dict()["class_guard_floor"] == 0.2 and settings.class_guard_release == 3
