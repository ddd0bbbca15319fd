"""Sub-commands of ``nnunet-compress`` for Tucker compression: ``tucker`` (a trained model folder in, a compressed
one out) and ``plan tucker`` (plans for nnUNetTrainerTucker)."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli.distill import add_distillation_options
from nnunet_compress.cli.options import (
    add_model_folder_options,
    add_plan_common,
    add_schedule_options,
    plan_request_from_args,
)
from nnunet_compress.cli.rank_options import add_rank_options, rank_policy_from_args
from nnunet_compress.workflows.plans import plan_tucker
from nnunet_compress.workflows.tucker import compress_model_folder


def cmd_tucker(args) -> None:
    policy = rank_policy_from_args(args)
    report = compress_model_folder(args.model_folder, args.output, policy, args.folds, args.configuration,
                                   args.overwrite, args.checkpoint, images=args.images)
    print(f"wrote {args.output}")
    print(f"parameters {report.params_before:,} -> {report.params_after:,} "
          f"({report.params_after / report.params_before:.3f}); GFLOPs/patch {report.flops_before / 1e9:.2f} -> "
          f"{report.flops_after / 1e9:.2f} ({report.flops_after / report.flops_before:.3f}); "
          f"{len(report.layers)} layers factorised, {len(report.floor_layers)} with a rank at the floor "
          f"(--min-rank {policy.min_rank}) (details: {Path(args.output) / 'compression_report.md'})")


def cmd_plan_tucker(args) -> None:
    policy = rank_policy_from_args(args)
    print(plan_tucker(plan_request_from_args(args), policy, args.weights, args.images))


def register(sub, plan_sub) -> None:
    p = sub.add_parser("tucker", help="Tucker-compress a trained model folder into a new model folder")
    add_model_folder_options(p, "compress")
    add_rank_options(p)
    p.set_defaults(func=cmd_tucker)

    p = plan_sub.add_parser("tucker", help="plans for nnUNetTrainerTucker")
    add_plan_common(p)
    add_rank_options(p)
    p.add_argument("--weights", type=Path, help="parent checkpoint (needed by --energy / --target-*)")
    add_schedule_options(p)
    add_distillation_options(p)
    p.set_defaults(func=cmd_plan_tucker)
