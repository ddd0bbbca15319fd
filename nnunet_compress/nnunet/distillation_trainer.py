"""Distillation inside nnU-Net's training loop, written once for nnUNetTrainerTucker, -TaylorPruning and -Sauron.

Switched on by the plans (``nnunet-compress plan ... --distill``: a ``distillation`` entry in the compression
section), so it travels with the model folder and ``nnUNetv2_train`` needs no extra flag. At the start of training
the teacher — the uncompressed parent, rebuilt from the compressed plans (:mod:`nnunet_compress.nnunet.teacher`) — is
loaded once in this process, on this rank's device, in eval mode without gradients. Its checkpoint is the plans'
``teacher`` (``--teacher``), else the ``-pretrained_weights`` checkpoint the student was initialised from.

Every training step runs the teacher on the very batch the student gets (after nnU-Net's augmentation), then
nnU-Net's own ``train_step`` (autocast, gradient scaler, clipping) with ``self.loss`` swapped for the
distillation loss for that one step; validation, Taylor's scoring and everything else keep nnU-Net's loss. The
teacher is not part of any checkpoint; its path is, so ``nnUNetv2_train ... --c`` (which takes no
``-pretrained_weights``) loads it again. Each rank of a DDP run holds its own teacher; with torch.compile the
student is compiled as usual and the teacher runs eagerly (it only runs forward).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from nnunet_compress.distillation.loss import DistillationLoss, DistillationSettings
from nnunet_compress.errors import CompressError
from nnunet_compress.network import unwrap
from nnunet_compress.nnunet.teacher import load_teacher, parent_architecture
from nnunet_compress.nnunet.training import PARENT_CHECKPOINT_ATTR, CheckpointExtrasMixin, compression_section

CHECKPOINT_KEY = "nnunet_compress_distillation"


class DistillationTrainerMixin(CheckpointExtrasMixin):
    """Mixed in before nnU-Net's trainer (and before PruningTrainerMixin); call :meth:`setup_distillation` in
    ``__init__`` once the plans are known."""

    distillation: DistillationSettings | None = None
    teacher: torch.nn.Module | None = None

    def setup_distillation(self) -> None:
        entry = compression_section(self.configuration_manager).get("distillation")
        self.distillation = DistillationSettings.from_dict(entry) if entry else None
        self.teacher = None
        self.teacher_checkpoint: str | None = None  # the checkpoint the teacher was (or, resumed, is to be) read from
        self.distillation_history: list[dict] = []

    # ---- the teacher -----------------------------------------------------------------------------------------
    def resolve_teacher_checkpoint(self) -> str:
        if self.distillation.teacher:
            return self.distillation.teacher
        if self.teacher_checkpoint:  # recorded in the checkpoint a --c run resumed from
            return self.teacher_checkpoint
        parent = getattr(unwrap(self.network), PARENT_CHECKPOINT_ATTR, None)
        if parent:
            return parent
        raise CompressError("these plans distil from the parent model (--distill) but no teacher is known: start "
                            "nnUNetv2_train with -pretrained_weights PARENT_CHECKPOINT (the uncompressed model), or "
                            "make the plans with --teacher PARENT_CHECKPOINT")

    def load_distillation_teacher(self) -> None:
        path = self.resolve_teacher_checkpoint()
        self.teacher = load_teacher(path, parent_architecture(self.configuration_manager.configuration),
                                    self.num_input_channels, self.label_manager.num_segmentation_heads,
                                    self.dataset_json["labels"], self.enable_deep_supervision, self.device)
        self.teacher_checkpoint = path
        s = self.distillation
        self.print_to_log_file(f"[distill] teacher {type(self.teacher).__name__} from {path} (alpha {s.alpha}, "
                               f"temperature {s.temperature}; loss = (1 - alpha) * nnU-Net's loss on the labels + "
                               f"alpha * T^2 * KL(teacher || student))")

    def teacher_outputs(self, data: torch.Tensor):
        from nnunetv2.utilities.helpers import dummy_context
        with torch.no_grad(), (torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda"
                               else dummy_context()):
            return self.teacher(data)

    def on_train_start(self):
        super().on_train_start()
        if self.distillation is not None and self.teacher is None:
            self.load_distillation_teacher()

    def on_train_end(self):
        super().on_train_end()
        self.teacher = None  # nnU-Net's final validation runs next; it needs no teacher

    # ---- one training step -----------------------------------------------------------------------------------
    @contextmanager
    def distilling(self, batch: dict):
        """Within the block, ``self.loss`` is the distillation loss against the teacher's outputs on `batch`.

        Yields a dict that, once the loss has run, holds the step's two terms (for :meth:`on_train_epoch_end`).
        """
        terms: dict = {}
        if self.distillation is None:
            yield terms
            return
        # the batch goes to the device once: nnU-Net's train_step then finds it there
        batch["data"] = batch["data"].to(self.device, non_blocking=True)
        teacher = self.teacher_outputs(batch["data"])
        label_loss = self.loss
        loss = DistillationLoss.for_trainer_loss(label_loss, self.distillation.alpha, self.distillation.temperature,
                                                 binary=self.label_manager.has_regions)

        def distilled(output, target):
            parts = loss(output, target, teacher)
            terms["distill_label"] = parts.label.cpu().numpy()
            terms["distill_teacher"] = parts.teacher.cpu().numpy()
            return parts.total

        self.loss = distilled
        try:
            yield terms
        finally:
            self.loss = label_loss

    def train_step(self, batch: dict) -> dict:
        with self.distilling(batch) as terms:
            result = super().train_step(batch)
        return {**result, **terms}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.distillation is None or not train_outputs or "distill_label" not in train_outputs[0]:
            return
        means = [float(np.mean([o[k] for o in train_outputs])) for k in ("distill_label", "distill_teacher")]
        if self.is_ddp:
            import torch.distributed as dist
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = [float(np.mean([g[i] for g in gathered])) for i in range(2)]
        label, teacher = means
        self.distillation_history.append({"epoch": self.current_epoch, "label_loss": label, "teacher_term": teacher})
        self.print_to_log_file(f"[distill] label loss {label:.4f}, teacher term T^2*KL {teacher:.4f} "
                               f"(train loss = {1 - self.distillation.alpha:g} * label + "
                               f"{self.distillation.alpha:g} * teacher)")

    # ---- checkpoints: the teacher's path, never its weights -----------------------------------------------
    def checkpoint_extras(self) -> dict:
        extras = super().checkpoint_extras()
        if self.distillation is not None:
            extras[CHECKPOINT_KEY] = {"teacher": self.teacher_checkpoint, "settings": self.distillation.to_dict(),
                                      "history": self.distillation_history}
        return extras

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False, mmap=True)
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is not None and self.distillation is not None:
            self.teacher_checkpoint = entry.get("teacher")
            self.distillation_history = list(entry.get("history", []))
        del checkpoint
        super().load_checkpoint(filename_or_checkpoint)
