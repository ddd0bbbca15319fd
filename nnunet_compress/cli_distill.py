"""The command line of distillation: ``plan tucker|taylor|sauron ... --distill`` and ``pseudo-dataset``.

``--distill [--alpha A] [--temperature T] [--teacher CHECKPOINT]`` become a ``distillation`` entry in the plans'
compression section, so the trainer finds them where it finds the rest of the method's settings. Everything that can be checked before training is checked here, with
nothing written on failure: α and T, and a ``--teacher`` checkpoint (readable, trained for this dataset's labels,
with its classes, input channels and architecture those of the parent plans).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.errors import CompressError

PLANS_SUFFIX = "_distill"


def add_distillation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation from the uncompressed parent (label-free fine-tuning)")
    g.add_argument("--distill", action="store_true",
                   help="train towards the parent's soft predictions as well as (or, with --alpha 1, instead of) "
                        "the labels; the plans name gets the suffix _distill")
    g.add_argument("--alpha", type=float,
                   help="weight of the teacher term in [0, 1] (0.5): loss = (1-alpha) * nnU-Net's loss + "
                        "alpha * T^2 * KL(teacher || student); 1 uses the labels for nnU-Net's sampling only")
    g.add_argument("--temperature", type=float, help="softmax temperature T > 0 of both networks (2)")
    g.add_argument("--teacher", type=Path,
                   help="checkpoint of the uncompressed parent (default: the -pretrained_weights checkpoint)")


def distillation_settings_from_args(args):
    """The settings to record, or None without --distill (then the other options are refused)."""
    from nnunet_compress.distillation import DistillationSettings
    given = [flag for flag, value in (("--alpha", args.alpha), ("--temperature", args.temperature),
                                      ("--teacher", args.teacher)) if value is not None]
    if not args.distill:
        if given:
            raise CompressError(f"{', '.join(given)} {'works' if len(given) == 1 else 'work'} only with --distill; "
                                f"add --distill or drop {'it' if len(given) == 1 else 'them'}")
        return None
    defaults = DistillationSettings()
    return DistillationSettings(alpha=defaults.alpha if args.alpha is None else args.alpha,
                                temperature=defaults.temperature if args.temperature is None else args.temperature,
                                teacher=None if args.teacher is None else str(args.teacher.resolve())).validate()


def plans_name_suffix(args) -> str:
    return PLANS_SUFFIX if args.distill else ""


def check_parent_is_uncompressed(parent_plans: dict, configuration: str) -> None:
    from nnunet_compress.network import NETWORK_CLASS_NAME
    from nnunet_compress.plans import resolved_configuration
    arch = resolved_configuration(parent_plans, configuration)["architecture"]
    if arch["network_class_name"] == NETWORK_CLASS_NAME:
        raise CompressError(f"--distill teaches with the uncompressed parent, but plans "
                            f"{parent_plans.get('plans_name')!r} are already compressed; derive the plans from the "
                            f"uncompressed parent's plans (-p)")


def add_distillation(plans: dict, configuration: str, settings, dataset_json: dict) -> dict:
    """Record `settings` in the derived `plans` (in place) after checking a --teacher against them."""
    from nnunet_compress.model_folder import input_channels_of
    from nnunet_compress.teacher import load_teacher, parent_architecture
    from nnunet_compress.training import SECTION
    cfg = plans["configurations"][configuration]
    if settings.teacher is not None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        num_classes = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
        load_teacher(settings.teacher, parent_architecture(cfg), input_channels_of(plans, dataset_json, configuration),
                     num_classes, dataset_json["labels"], deep_supervision=False)
    cfg[SECTION]["distillation"] = settings.to_dict()
    return plans

