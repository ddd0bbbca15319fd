"""Compressed plans beside the parent plans: ``plan tucker``, ``plan taylor`` and ``plan sauron``.

The plans a compressing trainer runs from: the parent plans with one configuration rebuilt as a CompressedUNet and
the method's settings, the fine-tuning schedule and, with ``--distill``, the distillation settings in its
compression section. Tucker plans fix the ranks now, from the parent's trained weights where the policy needs them
(:func:`~nnunet_compress.workflows.rank_selection.select_ranks`); pruning plans only record how training will
prune. Everything that can be checked before training is checked here, with nothing written on failure: a
``--teacher`` checkpoint (readable, trained for this dataset's labels, with the parent's classes, input channels
and architecture) and weights that fit the plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nnunet_compress.distillation.loss import DistillationSettings
from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.network import NETWORK_CLASS_NAME, refuse_int8_weights, strip_wrapper_prefixes
from nnunet_compress.nnunet.calibration import calibration_source
from nnunet_compress.nnunet.model_folder import build_network, input_channels_of, load_checkpoint, read_json
from nnunet_compress.nnunet.plans import (
    SECTION,
    pruning_plans,
    read_parent_plans,
    resolved_configuration,
    tucker_plans,
    write_plans_beside,
)
from nnunet_compress.nnunet.teacher import load_teacher, parent_architecture
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.rank_selection import select_ranks

DISTILL_SUFFIX = "_distill"  # the plans name's suffix with --distill


@dataclass(frozen=True)
class PlanRequest:
    """Where the new plans go and what they carry besides the method: parent dataset, configuration and plans,
    the new plans' name (None: ``<parent>_<tag>`` and ``_distill`` with distillation), the schedule, and the
    distillation settings (None: no distillation)."""

    dataset: str
    configuration: str
    plans: str = "nnUNetPlans"
    plans_name: str | None = None
    overwrite: bool = False
    schedule: dict = field(default_factory=dict)
    distillation: DistillationSettings | None = None

    def name(self, tag: str) -> str:
        return self.plans_name or f"{self.plans}_{tag}{DISTILL_SUFFIX if self.distillation else ''}"


def plan_tucker(request: PlanRequest, policy: RankPolicy, weights: Path | None = None,
                images: Path | None = None) -> Path:
    """Tucker plans: the parent network built from its plans, loaded with `weights` (the parent's checkpoint,
    needed by the policies that read the trained kernels), its ranks selected (budgets calibrated on `images`, or
    synthetic CT phantoms), written beside the parent plans. Returns the path written."""
    folder, parent = _parent(request)
    cfg = resolved_configuration(parent, request.configuration)
    dataset_json = read_json(folder / "dataset.json")
    net = build_network(parent, dataset_json, request.configuration)
    if policy.needs_weights and weights is None:
        raise CompressError(f"the {policy.kind()} policy depends on the trained weights; pass --weights "
                            f"base_checkpoint.pth")
    if weights is not None:
        state = strip_wrapper_prefixes(load_checkpoint(weights)["network_weights"])
        refuse_int8_weights(state)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CompressError(f"--weights {weights} does not fit plans {request.plans} ({first_line(e)})") from None
    calibration = None
    if policy.is_budget:
        calibration = calibration_source(images, parent, dataset_json, request.configuration,
                                         input_channels_of(parent, dataset_json, request.configuration),
                                         cfg["patch_size"], policy.calibration_patches, policy.calibration_seed)
    selection = select_ranks(net, policy, tuple(cfg["patch_size"]), calibration)
    plans = tucker_plans(parent, request.configuration, selection.ranks, policy, request.name(policy.tag()),
                         request.schedule, budget_guard=selection.guard,
                         latency=selection.latency.to_dict() if selection.latency else None)
    return _write(request, folder, plans, dataset_json)


def plan_pruning(request: PlanRequest, method: str, settings: dict, tag: str) -> Path:
    """Pruning plans (``taylor`` or ``sauron`` with its settings), written beside the parent plans."""
    folder, parent = _parent(request)
    plans = pruning_plans(parent, request.configuration, method, settings, request.name(tag), request.schedule)
    return _write(request, folder, plans, None)


def _parent(request: PlanRequest) -> tuple[Path, dict]:
    folder, parent = read_parent_plans(request.dataset, request.plans)
    if request.distillation is not None:
        check_parent_is_uncompressed(parent, request.configuration)
    return folder, parent


def _write(request: PlanRequest, folder: Path, plans: dict, dataset_json: dict | None) -> Path:
    if request.distillation is not None:
        add_distillation(plans, request.configuration, request.distillation,
                         dataset_json if dataset_json is not None else read_json(folder / "dataset.json"))
    return write_plans_beside(folder, plans, request.overwrite)


def check_parent_is_uncompressed(parent_plans: dict, configuration: str) -> None:
    arch = resolved_configuration(parent_plans, configuration)["architecture"]
    if arch["network_class_name"] == NETWORK_CLASS_NAME:
        raise CompressError(f"--distill teaches with the uncompressed parent, but plans "
                            f"{parent_plans.get('plans_name')!r} are already compressed; derive the plans from the "
                            f"uncompressed parent's plans (-p)")


def add_distillation(plans: dict, configuration: str, settings: DistillationSettings, dataset_json: dict) -> dict:
    """Record `settings` in the derived `plans` (in place) after checking a --teacher against them."""
    cfg = plans["configurations"][configuration]
    if settings.teacher is not None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        num_classes = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
        load_teacher(settings.teacher, parent_architecture(cfg), input_channels_of(plans, dataset_json, configuration),
                     num_classes, dataset_json["labels"], deep_supervision=False)
    cfg[SECTION]["distillation"] = settings.to_dict()
    return plans
