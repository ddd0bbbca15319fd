"""The class guard: a pruning step that makes a class collapse is undone and its filters are never chosen again.

The network tests use a U-Net built so that one filter alone carries class 2's logit: the last decoder conv's
channel 0 is the only input of class 2's row in the segmentation head, and its conv weights are tiny so that it
ranks lowest and is the first filter a pruning step removes. Removing it provably deletes class 2. Channel 3 of
the same conv is read by no class at all, so removing it provably changes nothing.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_pruning_surgery import plain_unet  # noqa: E402

from nnunet_compress.errors import CompressError  # noqa: E402
from nnunet_compress.nnunet.pruning_trainer import PruningTrainerMixin  # noqa: E402
from nnunet_compress.pruning.class_guard import (  # noqa
    ParentAgreement,
    ProtectedChannels,
    StepGuard,
    collapsed_classes,
    dice_from_counts,
    foreground_class_names,
    network_snapshot,
    removed_channels,
    restore_network,
)
from nnunet_compress.pruning.surgery import channel_counts, prune_channels  # noqa: E402
from nnunet_compress.pruning.taylor import TaylorSettings, choose_channels_to_keep, prune_until_target

CARRIER = "decoder.stages.1.convs.1.conv"  # its channel 0 alone drives class 2
NAMES = ["organ", "lesion"]
PATCH = (16, 16)


def net_where_one_filter_carries_class_2() -> torch.nn.Module:
    torch.manual_seed(0)
    net = plain_unet(2, "instance", deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
        net.get_submodule(CARRIER).weight[0] *= 0.01  # lowest L1 norm: the first filter any step removes
        seg = net.decoder.seg_layers[-1]
        seg.weight[:, 0] = 0
        seg.weight[:, 3] = 0  # a filter no class reads
        seg.weight[2] = 0
        seg.weight[2, 0] = 8.0  # class 2's logit is 8 * channel 0 - 3, nothing else
        seg.bias.copy_(torch.tensor([0.0, 0.0, -3.0]))
    return net.eval()


def patches():
    return [torch.randn(2, 2, *PATCH, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def class_dice(net, batches, labels):
    """Per-class Dice of `net` against label maps (what nnU-Net's validation measures)."""
    agreement = ParentAgreement.__new__(ParentAgreement)
    agreement.batches, agreement.reference, agreement.num_classes = batches, labels, 3
    return agreement.dice(net)


def remove_the_carrier(net) -> dict:
    keep = {CARRIER: [1, 2, 3]}
    prune_channels(net, keep)
    return keep


# ---- the decision -----------------------------------------------------------------------------------------------

def test_a_class_below_its_share_collapses_and_absent_or_unmeasured_classes_do_not():
    nan = float("nan")
    before = [0.8, 0.6, 0.0, nan, 0.5]
    after = [0.41, 0.29, 0.0, 0.0, nan]
    drops = collapsed_classes(before, after, 0.5, ["a", "b", "c", "d", "e"])
    # a kept 0.41 >= 0.4; b fell to 0.29 < 0.3; c and d were absent before; e was not measured after
    assert [(d.name, d.before, d.after) for d in drops] == [("b", 0.6, 0.29)]
    assert collapsed_classes(before, after, 0.0) == []
    assert [d.name for d in collapsed_classes(before, after, 0.52)] == ["class 1", "class 2"]
    with pytest.raises(CompressError, match="same classes"):
        collapsed_classes([0.5], [0.5, 0.5], 0.5)


def test_dice_from_counts_is_nan_where_a_class_is_neither_present_nor_predicted():
    dice = dice_from_counts([3, 0, 0], [1, 2, 0], [1, 0, 0])
    assert dice[0] == pytest.approx(0.75) and dice[1] == 0.0 and math.isnan(dice[2])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "half"])
def test_settings_reject_a_class_guard_outside_zero_one_naming_the_option(bad):
    with pytest.raises(CompressError, match="--class-guard"):
        TaylorSettings(target_flops=0.5, class_guard=bad).validate()
    TaylorSettings(target_flops=0.5, class_guard=0).validate()
    assert TaylorSettings.from_dict({"target_flops": 0.5}).class_guard == 0.5  # plans from before the option


def test_foreground_class_names_follow_nnunets_order():
    assert foreground_class_names({"background": 0, "vessel": 2, "liver": 1}) == ["liver", "vessel"]
    assert foreground_class_names({"background": 0, "whole": [1, 2], "core": [2]}) == ["whole", "core"]


# ---- protected channels survive later removals --------------------------------------------------------------

def test_protected_indices_follow_later_removals():
    protected = ProtectedChannels({"g": [2, 5]})
    protected.after_pruning({"g": [6, 0, 2, 3, 5], "other": [0]})
    assert protected.state() == {"g": [1, 3]}
    with pytest.raises(CompressError, match="protected channels"):
        protected.after_pruning({"g": [0, 1, 2]})
    assert removed_channels({"g": 5, "h": 2}, {"g": [0, 3], "h": [0, 1]}) == {"g": [1, 2, 4]}


def test_a_protected_filter_is_never_chosen_even_with_the_lowest_score():
    net = net_where_one_filter_carries_class_2()
    settings = TaylorSettings(target_params=0.5, step=0.01, min_channels=1)
    groups = channel_counts(net)
    scores = {name: torch.arange(1.0, n + 1) for name, n in groups.items()}
    scores[CARRIER][0] = 0.0
    unprotected = choose_channels_to_keep(net, settings, scores, 1)
    assert unprotected == {CARRIER: [1, 2, 3]}
    protected = ProtectedChannels({CARRIER: [0]})
    for n_remove in (1, 20):
        keep = choose_channels_to_keep(net, settings, scores, n_remove, protected=protected)
        assert 0 in keep.get(CARRIER, [0]) and keep


# ---- one-shot pruning: agreement with the unpruned network ---------------------------------------------------

def test_one_shot_step_that_kills_a_class_is_undone_and_its_filter_protected():
    parent, net = net_where_one_filter_carries_class_2(), net_where_one_filter_carries_class_2()
    calibration = patches()
    assert ParentAgreement(parent, calibration).before == [1.0, 1.0]  # the parent predicts both classes
    settings = TaylorSettings(target_params=0.97, step=0.01, min_channels=1, class_guard=0.5)
    rollbacks, log = [], []
    history = prune_until_target(net, settings, "l1", 2, PATCH, calibration, log.append, NAMES, rollbacks)
    assert history and history[-1]["fraction"] <= 0.97
    assert rollbacks[0]["protected"] == {CARRIER: [0]}
    assert [(c["name"], c["before"], c["after"]) for c in rollbacks[0]["classes"]] == [("lesion", 1.0, 0.0)]
    assert any("undone" in line and "lesion 1.000 -> 0.000" in line for line in log)
    # the carrier survived every later step, and the lesion is still found where the parent found it
    assert net.decoder.seg_layers[-1].weight[2].flatten().tolist().count(8.0) == 1
    assert ParentAgreement(parent, calibration).dice(net)[1] >= 0.5


def test_one_shot_without_the_guard_removes_the_filter_and_loses_the_class():
    parent, net = net_where_one_filter_carries_class_2(), net_where_one_filter_carries_class_2()
    calibration = patches()
    settings = TaylorSettings(target_params=0.97, step=0.01, min_channels=1, class_guard=0.0)
    rollbacks = []
    prune_until_target(net, settings, "l1", 2, PATCH, calibration, lambda line: None, NAMES, rollbacks)
    assert rollbacks == []
    assert 8.0 not in net.decoder.seg_layers[-1].weight[2].flatten().tolist()
    assert ParentAgreement(parent, calibration).dice(net)[1] == 0.0


# ---- in-training bookkeeping: judge at the validation before the next step ------------------------------------

def test_step_guard_undoes_the_step_restores_the_network_exactly_and_protects_the_filter():
    net = net_where_one_filter_carries_class_2()
    batches = patches()
    labels = ParentAgreement(net, batches).reference  # "ground truth" the network segments perfectly
    reference_output = [net(b).detach() for b in batches]
    guard = StepGuard(0.5, NAMES)
    before = class_dice(net, batches, labels)
    sizes, snapshot = channel_counts(net), network_snapshot(net)
    keep = remove_the_carrier(net)
    guard.begin_step(3, before, sizes, keep, snapshot, {"epoch": 3, "fraction": 0.9})
    assert not guard.due(3, every=2, last_epoch=9) and guard.due(4, every=2, last_epoch=9)
    after = class_dice(net, batches, labels)
    assert after[1] == 0.0
    to_restore = guard.finish_step(after, 4)
    assert to_restore is snapshot and guard.pending is None
    restore_network(net, to_restore)
    assert channel_counts(net) == sizes
    for b, expected in zip(batches, reference_output):
        assert torch.equal(net(b), expected)
    assert guard.protected.state() == {CARRIER: [0]} and guard.baseline == before
    rollback = guard.rollbacks[0]
    assert (rollback["step_epoch"], rollback["checked_epoch"], rollback["protected"]) == (3, 4, {CARRIER: [0]})
    assert rollback["classes"][0]["name"] == "lesion" and rollback["step"] == {"epoch": 3, "fraction": 0.9}
    assert "lesion Dice 1.000 -> 0.000" in guard.describe_last_rollback()
    # the checkpoint's state carries it all
    resumed = StepGuard(0.5, NAMES)
    resumed.load_state(guard.state())
    assert resumed.protected.state() == guard.protected.state() and resumed.rollbacks == guard.rollbacks


def test_step_guard_keeps_a_harmless_step_and_is_off_at_zero():
    net = net_where_one_filter_carries_class_2()
    batches = patches()
    labels = ParentAgreement(net, batches).reference
    guard = StepGuard(0.5, NAMES)
    guard.protected.add({CARRIER: [2]})
    before, sizes = class_dice(net, batches, labels), channel_counts(net)
    keep = {CARRIER: [0, 1, 2]}  # the filter no class reads
    prune_channels(net, keep)
    guard.begin_step(0, before, sizes, keep, network_snapshot(net))
    assert class_dice(net, batches, labels) == before
    assert guard.finish_step(class_dice(net, batches, labels), 0) is None and guard.rollbacks == []
    assert guard.protected.state() == {CARRIER: [2]}
    off = StepGuard(0.0, NAMES)
    net = net_where_one_filter_carries_class_2()
    before, sizes = class_dice(net, batches, labels), channel_counts(net)
    keep = remove_the_carrier(net)
    off.begin_step(0, before, sizes, keep, network_snapshot(net))
    assert not off.due(0, 1, 9) and off.finish_step(class_dice(net, batches, labels), 0) is None


# ---- the trainer's side: optimizer state and the target -------------------------------------------------------

class LoggedNothing:
    """nnU-Net's logger before any validation: no per-class pseudo Dice yet."""

    def get_value(self, key, step=None):
        return []


class FakeTrainer(PruningTrainerMixin):
    """Just enough of an nnUNetTrainer for PruningTrainerMixin's snapshot/restore and the Taylor guard."""

    def __init__(self, net):
        self.network, self.device, self.is_ddp = net, torch.device("cpu"), False
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.log = []
        self.logger = LoggedNothing()

    @property
    def plain_network(self):
        return self.network

    def _do_i_compile(self):
        return False

    def configure_optimizers(self):
        return torch.optim.SGD(self.network.parameters(), lr=0.01, momentum=0.99, nesterov=True), None

    def print_to_log_file(self, *args):
        self.log.append(" ".join(map(str, args)))

    def train_once(self, batch):
        self.optimizer.zero_grad()
        self.network(batch).square().mean().backward()
        self.optimizer.step()


def test_restoring_a_snapshot_brings_back_shape_weights_and_momentum():
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    batch = patches()[0]
    trainer.train_once(batch)
    snapshot = trainer.snapshot_for_rollback()
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    names = {id(p): n for n, p in trainer.network.named_parameters()}
    momentum = {names[id(p)]: s["momentum_buffer"].clone() for p, s in trainer.optimizer.state.items()}
    trainer.apply_pruning({CARRIER: [1, 2, 3]})
    trainer.train_once(batch)
    trainer.restore_from_snapshot(snapshot)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.network.state_dict().items())
    params = dict(trainer.network.named_parameters())
    assert momentum and CARRIER + ".weight" in momentum  # (the unused deep-supervision head has no state)
    assert all(torch.equal(trainer.optimizer.state[params[n]]["momentum_buffer"], m) for n, m in momentum.items())


def trainer_class(name):
    path = Path(__file__).resolve().parents[1] / "trainers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def taylor_trainer_class():
    return trainer_class("nnUNetTrainerTaylorPruning")


def test_undoing_the_step_that_reached_the_target_resumes_pruning():
    trainer_class = taylor_trainer_class()
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    batches = patches()
    labels = ParentAgreement(trainer.network, batches).reference
    trainer.class_guard = StepGuard(0.5, NAMES)
    trainer.current_epoch = 5
    before, sizes = class_dice(trainer.network, batches, labels), channel_counts(trainer.network)
    snapshot = trainer.snapshot_for_rollback()
    keep = {CARRIER: [1, 2, 3]}
    trainer.apply_pruning(keep)
    record = {"epoch": 5, "fraction": 0.69}
    trainer.pruning_history, trainer.target_reached = [{"epoch": 4, "fraction": 0.8}, record], True
    trainer.class_guard.begin_step(5, before, sizes, keep, snapshot, record)
    after = class_dice(trainer.network, batches, labels)
    trainer.logged_class_dice = lambda epoch: after if epoch == 5 else None
    trainer.log_pruning_status = lambda removed: None
    trainer_class.judge_pending_step(trainer)
    assert trainer.target_reached is False
    assert trainer.pruning_history == [{"epoch": 4, "fraction": 0.8}]
    assert channel_counts(trainer.network) == sizes
    assert any("class guard" in line and "lesion Dice 1.000 -> 0.000" in line and CARRIER in line
               for line in trainer.log)


def test_sauron_removal_that_kills_a_class_is_undone_with_its_tau_step_and_the_filter_kept_from_then_on():
    from nnunet_compress.pruning.sauron import SauronConfig, ThresholdState
    sauron = trainer_class("nnUNetTrainerSauron")
    trainer = FakeTrainer(net_where_one_filter_carries_class_2().train())
    batches = patches()
    labels = ParentAgreement(trainer.network, batches).reference
    config = SauronConfig(rho=1, kappa=2)
    trainer.thresholds, trainer.class_guard = ThresholdState(config), StepGuard(0.5, NAMES)
    trainer._register_feature_hooks = lambda: None
    trainer.num_epochs = 10
    # δ_prune: the carrier (channel 0) looks redundant, the others do not; reference channel 1
    trainer._dprune_sum, trainer._dprune_count = {CARRIER: torch.tensor([0.0, 0.0, 0.9, 0.8])}, {CARRIER: 1}
    trainer._references = {CARRIER: 1}
    sizes = channel_counts(trainer.network)
    dice = {2: class_dice(trainer.network, batches, labels)}
    trainer.logged_class_dice = lambda epoch: dice.get(epoch)
    trainer.current_epoch = 2
    trainer.thresholds.record_train_loss(1.0)
    trainer.thresholds.record_train_loss(1.0)  # plateau: τ steps up this epoch
    assert sauron.remove_below_thresholds(trainer, trainer.prunable_groups(), converged=True) == 1
    assert channel_counts(trainer.network)[CARRIER] == 3 and trainer.thresholds.patience(CARRIER) == 1
    trainer.current_epoch = 3
    dice[3] = class_dice(trainer.network, batches, labels)
    assert dice[3][1] == 0.0
    trainer.thresholds.record_train_loss(0.9)
    assert trainer.class_guard.due(3, 1, 9)
    assert sauron.undo_pending_removal(trainer)
    assert channel_counts(trainer.network) == sizes
    assert trainer.thresholds.tau(CARRIER) == config.tau_start and trainer.thresholds.patience(CARRIER) == 0
    assert trainer.thresholds.train_losses == [1.0, 1.0, 0.9]  # the plateau test keeps this epoch's loss
    assert trainer.class_guard.protected.state() == {CARRIER: [0]}
    assert any("undid the pruning step of epoch 2" in line and "lesion" in line for line in trainer.log)
    # the same δ_prune again: the protected carrier stays, so the layer loses nothing
    trainer.current_epoch = 4
    dice[4] = dice[2]
    assert sauron.remove_below_thresholds(trainer, trainer.prunable_groups(), converged=True) == 0
    assert channel_counts(trainer.network) == sizes
