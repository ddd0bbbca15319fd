"""The rank-policy options of ``tucker``, ``plan tucker`` and ``totalseg``, and the RankPolicy they make.

Why a module of its own: three commands share them; each command family imports them from here, so no command
module imports another.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.costs import COST_MODELS
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import read_json
from nnunet_compress.tucker.ranks import BUDGET_ERRORS, RankPolicy


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
