"""Options and argument readers shared by several ``nnunet-compress`` sub-commands.

Why a module of its own: the model-folder, schedule and plan options appear in several command families; each
imports them from here, so no command module imports another (the rank-policy options: :mod:`.rank_options`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.cli.distill import distillation_settings_from_args
from nnunet_compress.cli.rank_options import (  # noqa: F401  (re-exported: commands that import them from here)
    add_cost_model_option,
    add_rank_options,
    given_rank_options,
    rank_policy_from_args,
)
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL
from nnunet_compress.workflows.plans import PlanRequest


def add_model_folder_options(p: argparse.ArgumentParser, verb: str) -> None:
    """The source model folder and the output folder of a command that derives one model folder from another."""
    p.add_argument("model_folder", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--folds", nargs="+", help=f"folds to {verb} (default: all with a checkpoint)")
    p.add_argument("--checkpoint", default=CHECKPOINT_FINAL)
    p.add_argument("--overwrite", action="store_true")
    add_quiet_option(p)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (bars are only drawn on a terminal; the summary lines stay)")


def add_plan_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="parent plans (default nnUNetPlans)")
    p.add_argument("--plans-name", help="name of the new plans (default: derived from the parent and options)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--preset", help="start from a preset in plans/ (e.g. tucker_paper, tucker_cpu, "
                                    "taylor_half_flops, sauron_paper); explicit options win")
    p.set_defaults(_parser=p)


def add_schedule_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning schedule recorded in the plans (nnU-Net's defaults where omitted)")
    g.add_argument("--epochs", type=int, dest="num_epochs")
    g.add_argument("--iterations-per-epoch", type=int, dest="num_iterations_per_epoch")
    g.add_argument("--val-iterations", type=int, dest="num_val_iterations_per_epoch")
    g.add_argument("--lr", type=float, dest="initial_lr")
    g.add_argument("--save-every", type=int, dest="save_every",
                   help="epochs between checkpoint_latest.pth saves (nnU-Net: 50); what --c resumes from")
    g.add_argument("--augmentation", choices=("nnunet", "none"),
                   help="'none' trains without nnU-Net's augmentation (for quick CPU runs on easy data)")
    g.add_argument("--seed", type=int,
                   help="seed of the training run (python, numpy and torch at trainer start) and of the method's "
                        "own random draws; a run repeats exactly with nnUNet_n_proc_DA=0 (default: unseeded, as "
                        "nnU-Net; Sauron's reference channels then use 12345)")


def schedule_from_args(args) -> dict:
    schedule = {}
    for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr", "save_every"):
        value = getattr(args, key, None)
        if value is not None:
            if value <= 0:
                raise CompressError(f"--{key} must be positive, got {value}")
            schedule[key] = value
    if getattr(args, "augmentation", None):
        schedule["augmentation"] = args.augmentation
    if getattr(args, "seed", None) is not None:
        if args.seed < 0:
            raise CompressError(f"--seed must be a non-negative integer, got {args.seed}")
        schedule["seed"] = args.seed
    return schedule


def plan_request_from_args(args) -> PlanRequest:
    """Where ``plan tucker|taylor|sauron`` write and what the plans carry besides the method (checked here)."""
    return PlanRequest(dataset=args.dataset, configuration=args.configuration, plans=args.plans,
                       plans_name=args.plans_name, overwrite=args.overwrite, schedule=schedule_from_args(args),
                       distillation=distillation_settings_from_args(args))

