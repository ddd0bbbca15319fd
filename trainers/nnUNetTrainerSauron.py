"""Sauron: single-phase filter pruning during nnU-Net training (Valverde, Shatillo, Tohka 2022).

    nnunet-compress plan sauron -d D -c C [--lambda 0.5 --tau-max 0.3 --kappa 15 --rho 5 --mu 0.02]
    nnUNetv2_train D C F -p nnUNetPlans_sauron0.3 -tr nnUNetTrainerSauron [-pretrained_weights base.pth]

During each training step the feature maps of every prunable block are average-pooled; δ_opt (distance of each
min-max-normalised map to the first channel) joins nnU-Net's deep-supervised loss as λ·mean(δ_opt), which makes
redundant maps cluster, and δ_prune (distance to a random reference channel, normalised by the maximum) is
averaged over the epoch. At each epoch end every layer drops the channels whose δ_prune is below its own
threshold τ — physically, with the inputs of the layers that read them — and τ adapts per layer. Training
continues on the smaller network, so it speeds up as it prunes.

The class guard (``--class-guard``, see nnunet_compress.pruning.class_guard): an epoch's removal is judged at the next
epoch's validation against the pseudo Dice before it; if a learned class (above ``--class-guard-floor`` by more
than its noise) fell below that share, the removal is undone (network shape, weights and optimizer state, and the
thresholds' τ steps and patience of that epoch), its filters are protected (for ``--class-guard-release`` epochs,
or until the class recovers), and that epoch removes nothing (its δ_prune was measured on the undone network).
From scratch, the first epochs' classes are not learned yet: their falls are reported in the log, not guarded.
After the last epoch nothing is removed (no epoch would train, nor validation check, the smaller network), and
neither in the last ``--recovery-epochs`` epochs (default: a quarter of the schedule): the saved network has
recovered from the last removal (nnunet_compress.pruning.recovery).

Plans made with ``--distill`` replace the segmentation term by the distillation loss against the parent
(nnunet_compress.nnunet.distillation_trainer); the δ_opt term is added to it as before.
"""

import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_compress.nnunet.distillation_trainer import DistillationTrainerMixin
from nnunet_compress.nnunet.pruning_trainer import PruningTrainerMixin, agree_across_ranks
from nnunet_compress.nnunet.training import ScheduleFromPlansMixin, install_pretrained_weights_hook
from nnunet_compress.pruning.feature_maps import FeatureMapRecorder
from nnunet_compress.pruning.recovery import may_prune, recovery_epochs
from nnunet_compress.pruning.sauron import (
    SauronConfig,
    ThresholdState,
    channels_to_keep,
    choose_reference,
    delta_prune,
    sauron_regulariser,
)
from nnunet_compress.pruning.surgery import channel_counts

install_pretrained_weights_hook()


class nnUNetTrainerSauron(DistillationTrainerMixin, PruningTrainerMixin, ScheduleFromPlansMixin, nnUNetTrainer):
    method = "sauron"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sauron = SauronConfig.from_dict(self.pruning_section().get("settings", {})).validate()
        self.apply_schedule_from_plans()
        self.setup_distillation()
        self.thresholds = None  # ThresholdState, created once the groups are known (on_train_start / resume)
        self.channel_history: list[dict] = []
        self._recorder = FeatureMapRecorder()
        self._dprune_sum: dict[str, torch.Tensor] = {}
        self._dprune_count: dict[str, int] = {}
        self._references: dict[str, int] = {}
        seed = self.sauron.seed
        self._rng = torch.Generator().manual_seed(seed + int(fold) if str(fold).isdigit() else seed)
        self.class_guard = self.make_class_guard(self.sauron)

    @property
    def recovery_epochs(self) -> int:
        """The last epochs of the schedule in which nothing is removed: what the removals obey and the report says."""
        return recovery_epochs(self.sauron.recovery_epochs, self.num_epochs)

    # ---- feature maps of every prunable group, recorded by forward hooks ----------------------------------
    def _register_feature_hooks(self) -> None:
        self._recorder.attach(self.plain_network, self.prunable_groups())

    def _ensure_thresholds(self) -> None:
        if self.thresholds is None:
            self.thresholds = ThresholdState(self.sauron)

    def on_train_start(self):
        super().on_train_start()
        self._ensure_thresholds()
        self._register_feature_hooks()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._dprune_sum, self._dprune_count = {}, {}
        self._references = {g.name: choose_reference(g.size, self._rng) for g in self.prunable_groups()}

    # ---- the training step: nnU-Net's, plus the δ_opt regulariser ---------------------------------------------
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        self._recorder.take()
        # with --distill plans self.loss is the distillation loss here (the teacher's forward does not touch the
        # student's feature-map hooks)
        with self.distilling(batch) as distill_terms, \
                (autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()):
            output = self.network(data)
            seg_loss = self.loss(output, target)
            feature_maps = self._recorder.take()
            fmaps = [f.float() for maps in feature_maps.values() for f in maps]
            reg = sauron_regulariser(fmaps, self.sauron.lambda_, self.sauron.pool) if fmaps else seg_loss.new_zeros(())
            loss = seg_loss + reg
        with torch.no_grad():
            for group, maps in feature_maps.items():
                for f in maps:
                    d = delta_prune(f.detach().float(), self._references[group], self.sauron.pool)
                    self._dprune_sum[group] = self._dprune_sum.get(group, 0) + d
                    self._dprune_count[group] = self._dprune_count.get(group, 0) + 1
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": seg_loss.detach().cpu().numpy(), "sauron_reg": reg.detach().cpu().numpy(), **distill_terms}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        self._last_train_loss = float(np.mean([o["loss"] for o in train_outputs]))
        self._last_reg = float(np.mean([o["sauron_reg"] for o in train_outputs]))

    # ---- epoch end: remove channels, adapt thresholds, log ----------------------------------------------------
    def on_epoch_end(self):
        self.prune_by_thresholds()
        super().on_epoch_end()

    def prune_by_thresholds(self) -> None:
        groups = self.prunable_groups()
        # the plateau test reads the epoch's training loss including the λ term, as the reference does
        loss = getattr(self, "_last_train_loss", float("nan")) + getattr(self, "_last_reg", 0.0)
        loss = agree_across_ranks(loss) if self.is_ddp else loss  # one plateau test for all ranks
        converged = self.thresholds.record_train_loss(loss)
        removed_total = 0
        recovery = self.recovery_epochs
        undone = self.class_guard.due(self.current_epoch, 1, self.num_epochs - 1) and self.undo_pending_removal()
        self.class_guard_after_validation(self.current_epoch)
        if undone:
            groups = self.prunable_groups()  # this epoch's δ_prune belongs to the undone shape: no removal now
        elif not may_prune(self.current_epoch + 1, self.num_epochs, recovery):
            # a removal now would change the network of the next epoch, one of the recovery epochs (or none)
            if not getattr(self, "_recovery_announced", False):
                self._recovery_announced = True
                self.print_to_log_file(f"[sauron] no removal in the last {recovery} epoch(s) (--recovery-epochs) "
                                       f"nor after the last: the network is fine-tuned as it is")
        else:
            removed_total = self.remove_below_thresholds(groups, converged)
        params, flops = self.current_cost()
        epoch_time = time.time() - self._epoch_wall_start
        self.channel_history.append({"epoch": self.current_epoch, "channels": channel_counts(self.plain_network),
                                     "params": params, "flops": flops, "epoch_time_s": epoch_time})
        self.print_to_log_file(f"[sauron] δ_opt loss {getattr(self, '_last_reg', float('nan')):.4f}; "
                               f"thresholds {[round(self.thresholds.tau(g.name), 4) for g in groups]}")
        self.log_pruning_status(removed_total)
        self.print_to_log_file(f"[sauron] epoch time (training + validation) {epoch_time:.1f} s")

    def remove_below_thresholds(self, groups, converged: bool) -> int:
        """Step every layer's τ, remove the channels below it (never a protected one); the number removed."""
        guarded = self.class_guard.enabled
        before = self.logged_class_dice(self.current_epoch) if guarded else []
        snapshot = {**self.snapshot_for_rollback(), "thresholds": self.thresholds.state_dict()} if guarded else None
        proposal = {}
        for g in groups:
            tau = self.thresholds.step(g.name, self.thresholds.last_removed_fraction(g.name), converged)
            if g.name in self._dprune_sum:
                dprune = self._dprune_sum[g.name] / self._dprune_count[g.name]
                proposal[g.name] = channels_to_keep(dprune.cpu(), tau, self._references[g.name])
        # under DDP every rank must remove the same channels and keep the same threshold state: rank 0 decides
        proposal = agree_across_ranks(proposal) if self.is_ddp else proposal
        keep, removed_total = {}, 0
        for g in groups:
            if g.name not in proposal:
                continue
            kept = sorted(set(proposal[g.name]) | self.class_guard.protected.by_group.get(g.name, set()))
            self.thresholds.record_pruning(g.name, g.size, len(kept))
            if len(kept) < g.size:
                keep[g.name] = kept
                removed_total += g.size - len(kept)
        self.apply_pruning(keep)
        if keep:
            self._register_feature_hooks()
            # judged at the next epoch's validation, the first one of the smaller network
            self.class_guard.begin_step(self.current_epoch + 1, before, {g.name: g.size for g in groups}, keep,
                                        snapshot, {"epoch": self.current_epoch, "removed": removed_total})
        return removed_total

    def undo_pending_removal(self) -> bool:
        """Judge the last epoch's removal by this epoch's validation; undo it if a learned class collapsed."""
        snapshot = self.class_guard.finish_step(self.logged_class_dice(self.current_epoch), self.current_epoch)
        self.log_unguarded_classes()
        undo = agree_across_ranks(snapshot is not None) if self.is_ddp else snapshot is not None
        if not undo:
            return False
        self.restore_from_snapshot(snapshot)
        # undo that epoch's τ steps, patience and removed fractions; the loss history (plateau test) stays
        thresholds = dict(snapshot["thresholds"], train_losses=list(self.thresholds.train_losses))
        self.thresholds.load_state_dict(thresholds)
        self._register_feature_hooks()
        self.print_to_log_file(f"[sauron] class guard: {self.class_guard.describe_last_rollback()}")
        return True

    # ---- resume ---------------------------------------------------------------------------------------------
    def pruning_state(self) -> dict:
        return {**super().pruning_state(), "thresholds": self.thresholds.state_dict() if self.thresholds else None,
                "channel_history": self.channel_history, "rng": self._rng.get_state().tolist(),
                "class_guard": self.class_guard.state()}

    def load_pruning_state(self, state: dict) -> None:
        super().load_pruning_state(state)
        self.channel_history = list(state.get("channel_history", []))
        if state.get("thresholds") is not None:
            self.thresholds = ThresholdState(self.sauron)
            self.thresholds.load_state_dict(state["thresholds"])
        if state.get("rng") is not None:
            self._rng.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.class_guard.load_state(state.get("class_guard"))

    def pruning_report(self) -> dict:
        return {"settings": self.sauron.to_dict(), "channel_history": self.channel_history,
                "recovery_epochs": self.recovery_epochs,
                "class_guard": self.sauron.class_guard, "class_guard_rule": self.class_guard.rule(),
                "rollbacks": self.class_guard.rollbacks, "unguarded_drops": self.class_guard.unguarded,
                "protected_channels": self.class_guard.protected.state()}
