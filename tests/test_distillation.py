"""The distillation loss against hand computations, and α = 0 against nnU-Net's own loss (bit for bit)."""

import math

import numpy as np
import pytest
import torch

from nnunet_compress.distillation.loss import DistillationLoss, DistillationSettings, soft_target_kl
from nnunet_compress.errors import CompressError


def one_voxel(*logits) -> torch.Tensor:
    """(batch 1, classes, 1, 1, 1) logits of one voxel."""
    return torch.tensor(logits, dtype=torch.float64).reshape(1, len(logits), 1, 1, 1)


def test_softmax_kl_matches_hand_computation():
    # teacher logits (0, ln 3) at T = 2 are (0, ln 3 / 2): p = (1, sqrt 3) / (1 + sqrt 3); student (0, 0): (1/2, 1/2)
    r3 = math.sqrt(3)
    p = [1 / (1 + r3), r3 / (1 + r3)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    got = soft_target_kl(one_voxel(0.0, 0.0), one_voxel(0.0, math.log(3)), temperature=2.0)
    assert float(got) == pytest.approx(4 * kl, rel=1e-6)
    # at T = 1: p = (1/4, 3/4)
    got = soft_target_kl(one_voxel(0.0, 0.0), one_voxel(0.0, math.log(3)), temperature=1.0)
    assert float(got) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_binary_kl_matches_hand_computation():
    # region-based: one Bernoulli per region; teacher sigmoid(ln 3) = 3/4, student sigmoid(0) = 1/2 (region 1),
    # and a second region where both say sigmoid(0): no contribution. The regions' KLs add up.
    got = soft_target_kl(one_voxel(0.0, 0.0), one_voxel(math.log(3), 0.0), temperature=1.0, binary=True)
    assert float(got) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    # T = 2: teacher sigmoid(ln 3 / 2) = sqrt 3 / (1 + sqrt 3)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    got = soft_target_kl(one_voxel(0.0), one_voxel(math.log(3)), temperature=2.0, binary=True)
    assert float(got) == pytest.approx(4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)), rel=1e-6)


def test_kl_is_a_mean_over_voxels_and_batch_and_zero_for_equal_outputs():
    a, b = one_voxel(0.0, 0.0), one_voxel(0.0, math.log(3))
    single = soft_target_kl(a, b, 1.0)
    # two voxels, one of them where teacher and student agree: half of the single-voxel KL
    student = torch.cat([a, b], dim=2)
    teacher = torch.cat([b, b], dim=2)
    assert float(soft_target_kl(student, teacher, 1.0)) == pytest.approx(float(single) / 2, rel=1e-9)
    x = torch.randn(2, 4, 3, 5, 6)
    assert float(soft_target_kl(x, x, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target_kl(x, x, 3.0, binary=True)) == pytest.approx(0.0, abs=1e-6)


def test_confident_teacher_gives_finite_kl():
    student = torch.zeros(1, 3, 2, 2, 2)
    teacher = torch.tensor([200.0, -200.0, 0.0]).reshape(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2)
    assert torch.isfinite(soft_target_kl(student, teacher, 1.0))
    assert torch.isfinite(soft_target_kl(student, teacher, 1.0, binary=True))
    half = soft_target_kl(student.half(), teacher.half(), 1.0)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_deep_supervision_weights_and_alpha_mix_as_written():
    s = [one_voxel(0.0, 0.0), one_voxel(0.0, 1.0), one_voxel(1.0, 0.0)]
    t = [one_voxel(0.0, math.log(3)), one_voxel(0.0, 0.0), one_voxel(0.0, 0.0)]
    weights = (4 / 7, 2 / 7, 0.0)  # nnU-Net drops the lowest output (weight 0)
    label_value = torch.tensor(0.8, dtype=torch.float64)
    loss = DistillationLoss(lambda out, target: label_value, alpha=0.25, temperature=2.0, binary=False,
                            weights=weights)
    terms = loss(s, None, t)
    soft = 4 / 7 * float(soft_target_kl(s[0], t[0], 2.0)) + 2 / 7 * float(soft_target_kl(s[1], t[1], 2.0))
    assert float(terms.teacher) == pytest.approx(soft, rel=1e-6)
    assert float(terms.label) == pytest.approx(0.8)
    assert float(terms.total) == pytest.approx(0.75 * 0.8 + 0.25 * soft, rel=1e-6)


def nnunet_loss(has_regions: bool):
    """nnU-Net's training loss as nnUNetTrainer._build_loss makes it for a 4-output deep-supervised network."""
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    if has_regions:
        loss = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                               use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    else:
        loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                              weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(4)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def deep_supervised_batch(classes: int, has_regions: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]
    student = [torch.randn(2, classes, *s, generator=g, requires_grad=True) for s in shapes]
    teacher = [torch.randn(2, classes, *s, generator=g) for s in shapes]
    if has_regions:
        target = [(torch.rand(2, classes, *s, generator=g) > 0.5).float() for s in shapes]
    else:
        target = [torch.randint(0, classes, (2, 1, *s), generator=g).float() for s in shapes]
    return student, target, teacher


@pytest.mark.parametrize("has_regions", [False, True])
def test_alpha_zero_is_nnunets_loss_exactly(has_regions):
    label_loss = nnunet_loss(has_regions)
    student, target, teacher = deep_supervised_batch(3, has_regions)
    reference = label_loss(student, target)
    terms = DistillationLoss.for_trainer_loss(label_loss, alpha=0.0, temperature=2.0, binary=has_regions)(
        student, target, teacher)
    assert torch.equal(terms.total, reference)
    assert float(terms.teacher) > 0  # still measured, for the log
    # and so are the gradients
    g_ref = torch.autograd.grad(reference, student, allow_unused=True)
    g = torch.autograd.grad(terms.total, student, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g, g_ref))


@pytest.mark.parametrize("has_regions", [False, True])
def test_alpha_one_trains_on_the_teacher_only(has_regions):
    label_loss = nnunet_loss(has_regions)
    student, target, teacher = deep_supervised_batch(3, has_regions, seed=1)
    loss = DistillationLoss.for_trainer_loss(label_loss, alpha=1.0, temperature=2.0, binary=has_regions)
    assert loss.weights == tuple(label_loss.weight_factors)
    terms = loss(student, target, teacher)
    assert torch.equal(terms.total, loss.teacher_term(student, teacher))
    assert not terms.label.requires_grad
    assert float(terms.label) == pytest.approx(float(label_loss(student, target).detach()))
    # a student equal to its teacher has nothing left to learn from it (the lowest output, weight 0, gets nothing)
    same = [t.clone().requires_grad_(True) for t in teacher]
    grads = torch.autograd.grad(loss(same, target, teacher).total, same, allow_unused=True)
    assert grads[-1] is None and all(float(g.abs().max()) < 1e-6 for g in grads[:-1])


def test_mismatched_teacher_is_refused():
    loss = DistillationLoss(lambda o, t: torch.tensor(0.0), 0.5, 1.0, False, weights=(0.5, 0.5))
    with pytest.raises(CompressError, match="2 deep-supervision output"):
        loss([torch.zeros(1, 2, 2, 2, 2)], None, [torch.zeros(1, 2, 2, 2, 2)] * 2)
    with pytest.raises(CompressError, match="differ"):
        soft_target_kl(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2), 1.0)


@pytest.mark.parametrize("kwargs, message", [({"alpha": 1.5}, "outside [0, 1]"), ({"alpha": -0.1}, "outside [0, 1]"),
                                              ({"temperature": 0.0}, "must be positive"),
                                              ({"temperature": -1.0}, "must be positive")])
def test_settings_refuse_bad_values(kwargs, message):
    with pytest.raises(CompressError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillationSettings(**kwargs).validate()


def test_settings_round_trip_and_unknown_keys():
    s = DistillationSettings(alpha=1.0, temperature=3.0, teacher="/x/parent.pth")
    assert DistillationSettings.from_dict(s.to_dict()) == s
    with pytest.raises(CompressError, match="unknown distillation setting"):
        DistillationSettings.from_dict({"alpha": 0.5, "beta": 1})
