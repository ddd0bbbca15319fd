"""Taylor first-order filter pruning inside nnU-Net's training loop.

    nnunet-compress plan taylor -d D -c C --target-flops 0.5
    nnUNetv2_train D C F -p nnUNetPlans_taylorF0.5 -tr nnUNetTrainerTaylorPruning -pretrained_weights base.pth

Starting from the trained model (every layer loaded, segmentation heads included), every `prune_every` epochs it
sums Taylor importance over `accumulate_batches` training batches, removes the `step` fraction of least
important filters (globally after layer-wise normalisation, or per layer), and fine-tunes — until the FLOP or
parameter target of the plans is met; then it fine-tunes to the end of the schedule.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_compress.pruning_trainer import PruningTrainerMixin
from nnunet_compress.taylor_prune import (TaylorSettings, batches_covering_classes, channels_to_remove,
                                          choose_channels_to_keep, taylor_scores)
from nnunet_compress.training import ScheduleFromPlansMixin, install_pretrained_weights_hook

install_pretrained_weights_hook()


class nnUNetTrainerTaylorPruning(PruningTrainerMixin, ScheduleFromPlansMixin, nnUNetTrainer):
    method = "taylor"
    default_schedule = {"num_epochs": 50, "initial_lr": 1e-3}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = TaylorSettings.from_dict(self.pruning_section().get("settings", {}))
        self.apply_schedule_from_plans()
        self.target_reached = False
        self.pruning_history: list[dict] = []

    def on_train_epoch_start(self):
        if not self.target_reached and self.current_epoch % self.settings.prune_every == 0:
            self.pruning_step()
        super().on_train_epoch_start()

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
        groups = self.prunable_groups()
        scores = taylor_scores(net, groups, self.training_batches(), self.settings.importance, self.loss,
                               self.settings.balance_classes)
        n_remove = channels_to_remove(groups, self.settings.step)
        if not getattr(self, "initial_channels", None):
            from nnunet_compress.pruning.surgery import channel_counts
            self.initial_channels = channel_counts(net)
        keep = choose_channels_to_keep(net, self.settings, scores, n_remove, self.initial_channels)
        if not keep:
            self.target_reached = True
            self.print_to_log_file("[taylor] every layer is at its floor (--min-channels / --min-keep-fraction); "
                                   "the target cannot be reached, fine-tuning to the end")
            return
        removed = sum(g.size - len(keep[g.name]) for g in groups if g.name in keep)
        self.apply_pruning(keep)
        params, flops = self.current_cost()
        fraction = (flops / self.initial_cost[1]) if self.settings.metric == "flops" else \
            (params / self.initial_cost[0])
        self.target_reached = fraction <= self.settings.target
        self.pruning_history.append({"epoch": self.current_epoch, "removed": removed, "params": params,
                                     "flops": flops, "fraction": fraction})
        self.log_pruning_status(removed)
        if self.target_reached:
            self.print_to_log_file(f"[taylor] target reached ({self.settings.metric} {fraction:.3f} <= "
                                   f"{self.settings.target}); fine-tuning to the end")

    def pruning_state(self) -> dict:
        return {**super().pruning_state(), "target_reached": self.target_reached,
                "history": self.pruning_history, "initial_channels": getattr(self, "initial_channels", None)}

    def load_pruning_state(self, state: dict) -> None:
        super().load_pruning_state(state)
        self.target_reached = bool(state.get("target_reached", False))
        self.pruning_history = list(state.get("history", []))
        self.initial_channels = state.get("initial_channels")
