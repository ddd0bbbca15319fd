"""Knowledge distillation from the uncompressed parent: the settings and the loss (pure torch, no nnU-Net state).

A compressed network starts from its parent's weights and loses some Dice; fine-tuning on labels recovers it, but
the people who compress a model rarely hold its labelled training set. The parent itself can label any image,
and its class probabilities say more than its hard labels (which classes it hesitates between, where an edge is
uncertain), so the student is trained towards them (Hinton et al. 2015):

    loss = (1 − α) · L_nnU-Net(student, labels) + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))

at every deep-supervision output nnU-Net trains, weighted as nnU-Net's ``DeepSupervisionWrapper`` weights its own
loss, the teacher's outputs taken at the same resolutions (the parent has the same strides, so its decoder
produces the same set of outputs). The T² keeps the gradient of the soft term on the scale of the label term when
T changes. Region-based (sigmoid) training has no distribution over classes but one Bernoulli per region and
voxel; there the KL is the sum of the per-region binary KLs (the KL of the product distribution).

The KL is summed over classes (regions) and averaged over voxels and the batch, like nnU-Net's cross-entropy. It
covers every voxel, also those of an ignore label: the teacher has a prediction everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.settings import Settings


@dataclass
class DistillationSettings(Settings):
    """What `--distill` records in the plans' compression section (key ``distillation``)."""

    label = "distillation"

    alpha: float = 0.5          # weight of the teacher term; 1 trains on the teacher alone (label-free data)
    temperature: float = 2.0    # softens both distributions; 1 is the plain KL of the probabilities
    teacher: str | None = None  # parent checkpoint; None: the -pretrained_weights checkpoint

    def validate(self) -> "DistillationSettings":
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise CompressError(f"--alpha {self.alpha} is outside [0, 1]; it weighs the teacher term against the "
                                f"label loss (0: labels only, 1: teacher only), e.g. --alpha 0.5")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise CompressError(f"--temperature {self.temperature} must be positive; it softens the class "
                                f"probabilities (1: unchanged), e.g. --temperature 2")
        return self



def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   binary: bool = False) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the temperature-softened probabilities, mean over batch and voxels.

    Computed from log-probabilities (log_softmax / logsigmoid) in float32, so neither confident teachers nor
    float16 autocast outputs produce log(0).
    """
    if student_logits.shape != teacher_logits.shape:
        raise CompressError(f"teacher output {tuple(teacher_logits.shape)} and student output "
                            f"{tuple(student_logits.shape)} differ; the teacher must be the parent of the "
                            f"compressed network (same classes and strides)")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if binary:
        log_p_t, log_q_t = F.logsigmoid(t), F.logsigmoid(-t)  # log p, log (1 - p) of the teacher
        log_p_s, log_q_s = F.logsigmoid(s), F.logsigmoid(-s)
        kl = log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)
    else:
        log_p_t = F.log_softmax(t, dim=1)
        kl = log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))
    return temperature ** 2 * kl.sum(dim=1).mean()


def deep_supervision_weights(label_loss: nn.Module) -> tuple[float, ...] | None:
    """The weights nnU-Net gives its outputs (DeepSupervisionWrapper), None when it trains one output."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    if isinstance(label_loss, DeepSupervisionWrapper):
        return tuple(float(w) for w in label_loss.weight_factors)
    return None


@dataclass
class LossTerms:
    """One step's loss and its two parts (detached), for the per-epoch log."""

    total: torch.Tensor
    label: torch.Tensor
    teacher: torch.Tensor


class DistillationLoss:
    """(1 − α) · nnU-Net's loss on the labels + α · the weighted soft-target KL over the deep-supervision outputs.

    `label_loss` is the trainer's own ``self.loss`` (DC_and_CE / DC_and_BCE, usually inside the
    DeepSupervisionWrapper), used unchanged: at α = 0 the result is that loss exactly. A term whose weight is 0
    (the label term at α = 1, the teacher term at α = 0) is still computed for the log, but without gradients.
    """

    def __init__(self, label_loss: Callable, alpha: float, temperature: float, binary: bool,
                 weights: Sequence[float] | None = None):
        self.label_loss = label_loss
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.binary = binary
        self.weights = None if weights is None else tuple(weights)

    @classmethod
    def for_trainer_loss(cls, label_loss: nn.Module, alpha: float, temperature: float,
                         binary: bool) -> "DistillationLoss":
        return cls(label_loss, alpha, temperature, binary, deep_supervision_weights(label_loss))

    def teacher_term(self, student, teacher) -> torch.Tensor:
        """Σ_i w_i · T² · KL_i over the outputs nnU-Net trains (w_i = 0 outputs skipped, as the wrapper does)."""
        if self.weights is None:
            if isinstance(student, (list, tuple)):
                raise CompressError("the student has several outputs but nnU-Net's loss trains one; build the "
                                    "teacher with the student's deep-supervision setting")
            return soft_target_kl(student, teacher, self.temperature, self.binary)
        if not isinstance(student, (list, tuple)) or not isinstance(teacher, (list, tuple)) or \
                len(student) != len(teacher):
            n_t = len(teacher) if isinstance(teacher, (list, tuple)) else 1
            n_s = len(student) if isinstance(student, (list, tuple)) else 1
            raise CompressError(f"the teacher gives {n_t} deep-supervision output(s), the student {n_s}; the "
                                f"teacher must be the parent of the compressed network (same stages)")
        return sum(w * soft_target_kl(s, t, self.temperature, self.binary)
                   for w, s, t in zip(self.weights, student, teacher) if w != 0.0)

    def __call__(self, student, target, teacher) -> LossTerms:
        if self.alpha == 1.0:
            with torch.no_grad():
                label = self.label_loss(student, target)
        else:
            label = self.label_loss(student, target)
        if self.alpha == 0.0:
            with torch.no_grad():
                soft = self.teacher_term(student, teacher)
            total = label
        else:
            soft = self.teacher_term(student, teacher)
            total = soft if self.alpha == 1.0 else (1 - self.alpha) * label + self.alpha * soft
        return LossTerms(total, label.detach(), soft.detach())
