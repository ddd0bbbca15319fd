"""Taylor first-order filter pruning inside nnU-Net's training loop.

    nnunet-compress plan taylor -d D -c C --target-flops 0.5
    nnUNetv2_train D C F -p nnUNetPlans_taylorF0.5 -tr nnUNetTrainerTaylorPruning -pretrained_weights base.pth

Starting from the trained model (every layer loaded, segmentation heads included), every `prune_every` epochs it
sums Taylor importance over `accumulate_batches` training batches, removes the `step` fraction of least
important filters (globally after layer-wise normalisation, or per layer), and fine-tunes — until the FLOP or
parameter target of the plans is met; then it fine-tunes to the end of the schedule. The last ``--recovery-epochs``
epochs (default: a quarter of the schedule) take no step, so the saved network has recovered from the last one;
where steps of ``--step`` would not reach the target before them, the remaining steps grow evenly
(nnunet_compress.pruning.recovery).

The class guard (``--class-guard``, see nnunet_compress.pruning.class_guard) records every class's pseudo Dice before a
step and compares it at the validation that precedes the next step: if a learned class (above
``--class-guard-floor`` by more than its noise) fell below that share of its value, the step is undone (network shape,
weights and optimizer state from a snapshot taken just before it), the filters it removed are protected (until the
class recovers, or for ``--class-guard-release`` epochs), and pruning continues with other filters. Every rollback goes
to the training log, into the checkpoint's pruning state, and into fold_X/pruning_report.json.

Plans made with ``--distill`` fine-tune towards the parent's soft predictions as well
(nnunet_compress.nnunet.distillation_trainer); the Taylor scores still come from nnU-Net's loss on the labels.
"""

import copy
import dataclasses

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_compress.budgets.measured import pruned_layer_seconds, pruning_latency
from nnunet_compress.nnunet.distillation_trainer import DistillationTrainerMixin
from nnunet_compress.nnunet.pruning_trainer import PruningTrainerMixin, agree_across_ranks, measured_on_rank_zero
from nnunet_compress.nnunet.training import ScheduleFromPlansMixin, install_pretrained_weights_hook
from nnunet_compress.pruning.class_guard import ProtectedChannels
from nnunet_compress.pruning.recovery import catch_up_step, may_prune, pruning_epochs_left, recovery_epochs
from nnunet_compress.pruning.surgery import channel_counts, compose_keeps, set_channel_counts
from nnunet_compress.pruning.taylor import (
    PruningStep,
    TaylorSettings,
    batches_covering_classes,
    plan_step,
    target_check,
    taylor_scores,
)

install_pretrained_weights_hook()

MAX_EXTRA_STEPS = 5  # further steps the last pruning epoch may take at once to reach the target


class nnUNetTrainerTaylorPruning(DistillationTrainerMixin, PruningTrainerMixin, ScheduleFromPlansMixin, nnUNetTrainer):
    method = "taylor"
    default_schedule = {"num_epochs": 50, "initial_lr": 1e-3}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = TaylorSettings.from_dict(self.pruning_section().get("settings", {}))
        self.apply_schedule_from_plans()
        self.setup_distillation()
        self.target_reached = False
        self.pruning_history: list[dict] = []
        self.class_guard = self.make_class_guard(self.settings)

    @property
    def recovery_epochs(self) -> int:
        """The last epochs of the schedule that take no pruning step."""
        return recovery_epochs(self.settings.recovery_epochs, self.num_epochs)

    def on_train_epoch_start(self):
        if self.pruning_due():
            self.pruning_step()
        super().on_train_epoch_start()

    def pruning_due(self) -> bool:
        """Whether this epoch starts with a pruning step: every `prune_every` epochs until the target is reached,
        except in the recovery epochs at the end of the schedule (said once in the log)."""
        if self.target_reached or self.current_epoch % self.settings.prune_every:
            return False
        if may_prune(self.current_epoch, self.num_epochs, self.recovery_epochs):
            return True
        if not getattr(self, "_recovery_announced", False):
            self._recovery_announced = True
            self.print_to_log_file(
                f"[taylor] the last {self.recovery_epochs} epochs take no pruning step (--recovery-epochs); the "
                f"target was not reached ({self.settings.metric} {self.current_fraction():.3f} > "
                f"{self.settings.target}), fine-tuning to the end")
        return False

    def current_fraction(self) -> float:
        """The network's cost as a fraction of the parent's, in the target's metric (seconds: the last measured)."""
        if self.settings.metric == "seconds":
            return self.pruning_history[-1]["fraction"] if self.pruning_history else 1.0
        params, flops = self.current_cost()
        return (flops if self.settings.metric == "flops" else params) / self.reference_cost()

    def reference_cost(self) -> float:
        """The parent's cost in the target's metric (FLOPs or parameters), the cost a target is a fraction of."""
        return self.initial_cost[1] if self.settings.metric == "flops" else self.initial_cost[0]

    def step_settings(self, fraction: float | None = None) -> TaylorSettings:
        """The settings of this step: the plans' --step, or a larger one where the steps left before the recovery
        epochs would not reach the target at that size (`fraction`: the cost now, if the caller has it)."""
        left = pruning_epochs_left(self.current_epoch, self.num_epochs, self.recovery_epochs,
                                   self.settings.prune_every)
        last = self.pruning_history[-1] if self.pruning_history else {}
        last_step = (last["step"], last["fraction"] / last["fraction_before"]) if "fraction_before" in last else None
        fraction = self.current_fraction() if fraction is None else fraction
        step = catch_up_step(self.settings.step, fraction, self.settings.target, left, last_step)
        if step > self.settings.step:
            self.print_to_log_file(f"[taylor] {left} pruning step(s) left before the recovery epochs: this one "
                                   f"removes {step:.3f} of the channels instead of {self.settings.step}")
        return dataclasses.replace(self.settings, step=step)

    def next_training_batch(self):
        batch = next(self.dataloader_train)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        return data, target

    def training_batches(self):
        """`accumulate_batches` training batches, more (up to `scoring_batch_cap`) until every class showed up.

        Region-based training has no single label map to check, so there it is exactly `accumulate_batches`.
        """
        if self.label_manager.has_regions:
            return (self.next_training_batch() for _ in range(self.settings.accumulate_batches))

        def report(missing):
            self.print_to_log_file(f"[taylor] classes {missing} did not appear in {self.settings.scoring_batch_cap} "
                                   f"scoring batches; their filters are ranked without them")
        return batches_covering_classes(self.next_training_batch, self.label_manager.num_segmentation_heads,
                                        self.settings.accumulate_batches, self.settings.scoring_batch_cap,
                                        report)

    def pruning_step(self) -> None:
        net = self.plain_network
        if not getattr(self, "initial_channels", None):
            self.initial_channels = channel_counts(net)
        latency = self.latency_prediction()
        fraction_before = self.current_fraction()  # one FLOP count, for the step's size and its record
        settings = self.step_settings(fraction_before)
        step = self.planned_step(settings, latency)
        keep = step.keep
        if not keep:
            self.target_reached = True
            protected = (f" ({self.class_guard.protected.total} filters are protected by the class guard)"
                         if self.class_guard.protected else "")
            self.print_to_log_file(f"[taylor] every layer is at its floor (--min-channels / --min-keep-fraction)"
                                   f"{protected}; the target cannot be reached, fine-tuning to the end")
            return
        removed = step.removed
        guarded = self.class_guard.enabled
        before = self.class_dice_before_step() if guarded else []
        snapshot = self.snapshot_for_rollback() if guarded else None
        self.apply_pruning(keep)
        record = {"epoch": self.current_epoch}
        fraction = self.fraction_after_step(latency, record)
        # the last epoch that may prune: no later step could make up a shortfall, so further steps follow at once
        # (re-scored on the smaller network); to the class guard and the history they are one step
        extra, protected = 0, None
        while extra < MAX_EXTRA_STEPS and self.another_step_now(fraction):
            if protected is None:  # the guard's set re-indexes once, by the composed keep: follow it in a copy
                protected = ProtectedChannels(self.class_guard.protected.state())
                protected.after_pruning(keep)
            more = self.planned_step(settings, latency, protected)
            if not more.keep:
                break
            self.apply_pruning(more.keep)
            protected.after_pruning(more.keep)
            keep, removed, extra = compose_keeps(keep, more.keep, step.sizes), removed + more.removed, extra + 1
            fraction = self.fraction_after_step(latency, record)
        if extra:
            self.print_to_log_file(f"[taylor] last pruning epoch before the recovery epochs: {extra} more step(s) at "
                                   f"once to reach the target")
        params, flops = self.current_cost()
        record.update({"removed": removed, "params": params, "flops": flops, "fraction": fraction,
                       "step": removed / sum(step.sizes.values()), "fraction_before": fraction_before})
        if extra:
            record["extra_steps"] = extra
        self.target_reached = fraction <= self.settings.target
        self.pruning_history.append(record)
        self.class_guard.begin_step(self.current_epoch, before, step.sizes, keep, snapshot,
                                    record)
        self.log_pruning_status(removed)
        if self.target_reached:
            self.print_to_log_file(f"[taylor] target reached ({self.settings.metric} {fraction:.3f} <= "
                                   f"{self.settings.target}); fine-tuning to the end")

    def another_step_now(self, fraction: float) -> bool:
        """In the last epoch that may prune, while the target is not met: take another step at once (rank 0 decides
        under DDP: a measured latency fraction differs from rank to rank)."""
        go = fraction > self.settings.target and pruning_epochs_left(
            self.current_epoch, self.num_epochs, self.recovery_epochs, self.settings.prune_every) == 1
        return agree_across_ranks(go) if self.is_ddp else go

    def planned_step(self, settings: TaylorSettings, latency, protected: ProtectedChannels | None = None
                     ) -> PruningStep:
        """The channels one step keeps, scored on the network as it is now (rank 0's choice under DDP), never one
        of `protected` (default: the class guard's set); a step that would go past a FLOP or parameter target
        stops at it (nnunet_compress.pruning.step_size)."""
        net = self.plain_network
        protected = self.class_guard.protected if protected is None else protected

        def score(groups):
            return taylor_scores(net, groups, self.training_batches(), self.settings.importance, self.loss,
                                 self.settings.balance_classes)
        reaches = target_check(net, self.settings, self.reference_cost(), self.num_input_channels,
                               self.configuration_manager.patch_size)
        step = plan_step(net, settings, score, self.initial_channels, protected, latency, reaches)
        if self.is_ddp:  # every rank must remove the same channels: rank 0's choice
            step = PruningStep(step.groups, agree_across_ranks(step.keep))
        return step

    def fraction_after_step(self, latency, record: dict) -> float:
        """The network's cost now as a fraction of the parent's; for a latency target measured (and written into
        `record` with the prediction)."""
        if self.settings.metric != "seconds":
            return self.current_fraction()
        # predictions rank the channels; whether the target is met is measured after every step (OpenVINO pads
        # channels to blocks of 8/16, so a step's real saving can be far from any smooth prediction)
        record["predicted"] = latency.fraction(self.plain_network)
        fraction = record["measured"] = self.measure_latency(self.plain_network)
        latency.calibrate(self.plain_network, fraction)
        return fraction

    # ---- --target-latency ------------------------------------------------------------------------------------
    def latency_prediction(self):
        """For a latency target: the predicted seconds per patch (None otherwise), set up at the first pruning
        step on the network as it then is (the parent's shape), timed on this machine's CPU engine."""
        if self.settings.metric != "seconds":
            return None
        if getattr(self, "_latency", None) is None:
            parent = copy.deepcopy(self.plain_network).cpu().float()
            set_channel_counts(parent, self.initial_channels)  # after a resume (--c) the network is pruned already
            shape = (self.num_input_channels, *self.configuration_manager.patch_size)
            predicted, measure, terms = pruning_latency(parent, shape, self.settings.cost_model,
                                                        self.settings.min_channels, self.settings.min_keep_fraction,
                                                        progress=lambda m: self.print_to_log_file(f"[taylor] {m}"))
            self._latency, self._measure_latency, self.latency_terms = predicted, measure, terms
            self._latency_parent = parent
            if self.pruning_history:  # resumed: scale the predictions by a measurement of the network as it is
                predicted.calibrate(self.plain_network, self.measure_latency(self.plain_network))
        return self._latency

    def measure_latency(self, net) -> float:
        """The network's measured fraction of the parent's seconds per patch (a CPU copy, on the CPU engine); under
        DDP rank 0's measurement on every rank, so that whether the target is reached, the size of the next step and
        the calibration of the predictions are decided alike everywhere."""
        fraction = measured_on_rank_zero(lambda: self._measure_latency(copy.deepcopy(net).cpu().float()))
        self.print_to_log_file(f"[taylor] measured {fraction:.3f} of the parent's seconds per patch on "
                               f"{self.latency_terms.engine}")
        return fraction

    # ---- the class guard ---------------------------------------------------------------------------------
    def class_dice_before_step(self) -> list[float]:
        """Per-class pseudo Dice of the network about to be pruned: the last validation's (nnU-Net logged it at
        the end of the previous epoch), that of the network a rollback restored, or — before the first
        validation — measured now on validation batches."""
        if self.class_guard.baseline is not None:
            return list(self.class_guard.baseline)
        logged = self.logged_class_dice(self.current_epoch - 1)
        return logged if logged is not None else self.validation_class_dice()

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        if self.class_guard.due(self.current_epoch, self.settings.prune_every, self.num_epochs - 1):
            self.judge_pending_step()
        self.class_guard_after_validation(self.current_epoch)

    def judge_pending_step(self) -> None:
        """Keep the pending step, or undo it if a class collapsed after it and its fine-tuning epochs."""
        after = self.logged_class_dice(self.current_epoch)
        pending = self.class_guard.pending
        snapshot = self.class_guard.finish_step(after, self.current_epoch)
        self.log_unguarded_classes()
        undo = agree_across_ranks(snapshot is not None) if self.is_ddp else snapshot is not None
        if not undo:
            self.print_to_log_file(f"[taylor] class guard: kept the step of epoch {pending['epoch']} (pseudo Dice "
                                   f"before {[round(v, 3) for v in pending['before']]}, now "
                                   f"{[round(v, 3) for v in after]})")
            return
        self.restore_from_snapshot(snapshot)
        rollback = self.class_guard.rollbacks[-1]
        if rollback["step"] in self.pruning_history:
            self.pruning_history.remove(rollback["step"])
        # the undone step may have been the one that reached the target: the network is back above it
        self.target_reached = False
        self.print_to_log_file(f"[taylor] class guard: {self.class_guard.describe_last_rollback()}")
        self.log_pruning_status(0)

    # ---- checkpoints and the report ----------------------------------------------------------------------
    def pruning_state(self) -> dict:
        return {**super().pruning_state(), "target_reached": self.target_reached,
                "history": self.pruning_history, "initial_channels": getattr(self, "initial_channels", None),
                "class_guard": self.class_guard.state()}

    def load_pruning_state(self, state: dict) -> None:
        super().load_pruning_state(state)
        self.target_reached = bool(state.get("target_reached", False))
        self.pruning_history = list(state.get("history", []))
        self.initial_channels = state.get("initial_channels")
        self.class_guard.load_state(state.get("class_guard"))

    def pruning_report(self) -> dict:
        latency = None
        if getattr(self, "latency_terms", None):
            latency = self.latency_terms.to_dict()
            latency["layers"] = pruned_layer_seconds(self._latency_parent, copy.deepcopy(self.plain_network).cpu(),
                                                     (self.num_input_channels, *self.configuration_manager.patch_size),
                                                     self.latency_terms)
        return {"settings": self.settings.to_dict(), "target_reached": self.target_reached, "latency": latency,
                "recovery_epochs": self.recovery_epochs,
                "history": self.pruning_history, "class_guard": self.settings.class_guard,
                "class_guard_rule": self.class_guard.rule(), "rollbacks": self.class_guard.rollbacks,
                "unguarded_drops": self.class_guard.unguarded, "protected_channels": self.class_guard.protected.state()}
