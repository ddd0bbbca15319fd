"""Options and argument readers shared by several ``nnunet-compress`` sub-commands.

Why a module of its own: the rank-policy, schedule and plan options appear in ``tucker``, ``plan tucker``, ``plan taylor``, ``plan sauron`` and
``totalseg``; each command family imports them from here, so no command module imports another.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.costs import COST_MODELS
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, read_json
from nnunet_compress.tucker.ranks import BUDGET_ERRORS, RankPolicy


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


def add_rank_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rank policy (choose one)")
    g.add_argument("--rank-ratio", type=float, help="rank = ceil(channels * R) per mode (the paper's factor)")
    g.add_argument("--ranks", type=Path, help="JSON file {layer name: [rank_out, rank_in]}")
    g.add_argument("--energy", type=float, help="keep this fraction of each mode's squared singular values")
    g.add_argument("--target-params", type=float, help="global budget: fraction of the parameters to keep")
    g.add_argument("--target-flops", type=float, help="global budget: fraction of the FLOPs to keep")
    g.add_argument("--target-latency", type=float,
                   help="global budget: fraction of the original's seconds per patch to keep, measured on this "
                        "machine's CPU engine (OpenVINO unless NNUNET_COMPRESS_CPU_ENGINE=torch)")
    p.add_argument("--min-rank", type=int, default=8,
                   help="no rank below this (capped at the channel count), for every policy; --ranks files with a "
                        "lower rank are refused (default 8)")
    p.add_argument("--rank-multiple", type=int, default=1, help="round ranks up to a multiple (e.g. 8)")
    p.add_argument("--include-stem", action="store_true", help="also factorise the first conv")
    p.add_argument("--include-pointwise", action="store_true", help="also factorise 1x1 convs (heads)")
    p.add_argument("--replace-all", action="store_true",
                   help="also factorise layers where the replacement is not cheaper than the original "
                        "(by default they are left alone); useful to check full-rank exactness")
    g = p.add_argument_group("budget policies (--target-params / --target-flops / --target-latency): error measure "
                             "and guard")
    g.add_argument("-i", "--images", type=Path,
                   help="calibration images (nnU-Net naming CASE_0000.nii.gz), preprocessed as nnU-Net does; "
                        "default: synthetic CT phantoms through the same preprocessing")
    g.add_argument("--calibration-patches", type=int, default=4,
                   help="patches the sensitivities and the guard are measured on (4)")
    g.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the calibration patches (which patches, which synthetic phantoms; 0)")
    g.add_argument("--budget-error", choices=BUDGET_ERRORS, default="kernel",
                   help="allocator's per-layer error: the kernel's reconstruction error (kernel, default), that error "
                        "weighted by how much the network output moves with the layer's output (sensitivity), or "
                        "both allocations, keeping the one that changes the output least on the calibration patches "
                        "(best)")
    add_cost_model_option(g)
    g.add_argument("--no-budget-guard", action="store_true",
                   help="keep the budget ranks even where the uniform --rank-ratio of no greater cost changes "
                        "the network's output less (by default the guard falls back to it)")


def add_cost_model_option(g) -> None:
    g.add_argument("--cost-model", choices=COST_MODELS, default="measured",
                   help="--target-latency: predict each layer's seconds from timings of this machine's engine "
                        "(measured, default; cached per machine and engine) or from its FLOPs (flops); either way "
                        "the whole network's time is measured and the budget corrected until it meets the target")


RANK_POLICY_OPTIONS = {"rank_ratio": "--rank-ratio", "ranks": "--ranks", "energy": "--energy",
                       "target_params": "--target-params", "target_flops": "--target-flops",
                       "target_latency": "--target-latency"}


def given_rank_options(args) -> list[str]:
    """The rank-policy options the user gave (for commands where they do not apply)."""
    return [flag for key, flag in RANK_POLICY_OPTIONS.items() if getattr(args, key, None) is not None]


def rank_policy_from_args(args):
    ranks = None
    if args.ranks is not None:
        ranks = read_json(args.ranks)
    policy = RankPolicy(ratio=args.rank_ratio, ranks=ranks, energy=args.energy, target_params=args.target_params,
                        target_flops=args.target_flops, target_latency=args.target_latency, min_rank=args.min_rank, multiple=args.rank_multiple,
                        include_stem=args.include_stem, include_pointwise=args.include_pointwise,
                        replace_all=args.replace_all, guard=not args.no_budget_guard, budget_error=args.budget_error,
                        calibration_patches=args.calibration_patches, calibration_seed=args.calibration_seed,
                        cost_model=args.cost_model)
    policy.validate()
    if args.images is not None and not policy.is_budget:
        kind = policy.kind()
        flag = RANK_POLICY_OPTIONS["rank_ratio" if kind == "ratio" else kind]
        raise CompressError(f"-i/--images calibrates the budget policies (--target-params / --target-flops / "
                            f"--target-latency) only; "
                            f"drop it for {flag}")
    return policy



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


def read_dataset_json(preprocessed_folder: Path) -> dict:
    return read_json(preprocessed_folder / "dataset.json")

