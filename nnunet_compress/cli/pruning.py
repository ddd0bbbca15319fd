"""Sub-commands of ``nnunet-compress`` for filter pruning: ``plan taylor``, ``plan sauron`` and ``prune``."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.cli import distill as cli_distill
from nnunet_compress.cli.distill import add_distillation_options
from nnunet_compress.cli.options import (
    add_cost_model_option,
    add_model_folder_options,
    add_plan_common,
    add_schedule_options,
    read_dataset_json,
    schedule_from_args,
)
from nnunet_compress.nnunet.plans import pruning_plans, read_parent_plans, write_plans_beside
from nnunet_compress.pruning.class_guard import DEFAULT_GUARD_FLOOR, DEFAULT_NOISE_EPOCHS
from nnunet_compress.pruning.sauron import SauronConfig
from nnunet_compress.pruning.taylor import IMPORTANCE_MODES, PRUNE_METHODS, SCOPES, TaylorSettings
from nnunet_compress.settings import format_number_tag
from nnunet_compress.workflows.prune import prune_model_folder


def add_taylor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning target (choose one)")
    g.add_argument("--target-flops", type=float, help="stop at this fraction of the original FLOPs")
    g.add_argument("--target-params", type=float, help="stop at this fraction of the original parameters")
    g.add_argument("--target-latency", type=float,
                   help="stop at this fraction of the original's seconds per patch, measured on this machine's CPU "
                        "engine (OpenVINO unless NNUNET_COMPRESS_CPU_ENGINE=torch); channels are ranked by "
                        "importance lost per second saved")
    add_cost_model_option(g)
    p.add_argument("--step", type=float, default=0.05, help="fraction of channels removed per step (0.05)")
    p.add_argument("--scope", choices=SCOPES, default="global")
    p.add_argument("--min-channels", type=int, default=2, help="never fewer channels per layer (2)")
    p.add_argument("--min-keep-fraction", type=float, default=0.25,
                   help="never fewer than this share of a layer's starting channels (0.25)")
    p.add_argument("--max-layer-step", type=float, default=0.2,
                   help="no layer loses more than this share of its channels in one step (0.2)")
    p.add_argument("--no-normalize", action="store_true", help="skip the layer-wise L2 score normalisation")
    p.add_argument("--no-class-balance", action="store_true",
                   help="Taylor: weight every voxel alike instead of giving each class an equal share of the "
                        "output gradient (the default protects small structures)")
    p.add_argument("--class-guard", type=float, default=0.5,
                   help="undo a pruning step after which a class keeps less than this share of its Dice before the "
                        "step, and never remove those filters again (0.5; 0 turns it off). In training: nnU-Net's "
                        "per-class pseudo Dice at the validation before the next step; one-shot: agreement with the "
                        "unpruned network on the calibration patches (-i)")


def add_class_guard_rule_options(p: argparse.ArgumentParser, release: int) -> None:
    """Which classes the in-training class guard judges and how long its protection lasts (`plan taylor`, `plan
    sauron`; one-shot `prune` judges agreement with the parent, 1.0 for every class it predicts, so not there)."""
    # checked by the settings (one error line naming the option), like --class-guard
    p.add_argument("--class-guard-floor", type=float, default=DEFAULT_GUARD_FLOOR,
                   help="the class guard judges a class only when its pseudo Dice before the step is above this "
                        f"by more than its noise; the others are reported in the log, not guarded "
                        f"({DEFAULT_GUARD_FLOOR}; 0: every class present)")
    p.add_argument("--class-guard-noise-epochs", type=int, default=DEFAULT_NOISE_EPOCHS,
                   help="a class's noise is twice the standard deviation of its pseudo Dice over this many recent "
                        f"validations; its fall must exceed it too ({DEFAULT_NOISE_EPOCHS}; "
                        f"0: no noise estimate)")
    p.add_argument("--class-guard-release", type=int, default=release,
                   help="release the filters protected by an undo this many epochs later; they are also released "
                        f"when the class that triggered it rises above its value before the step by more than its "
                        f"noise ({release}; 0: only then)")


def class_guard_rule_from_args(args) -> dict:
    return {"class_guard_floor": args.class_guard_floor, "class_guard_noise_epochs": args.class_guard_noise_epochs,
            "class_guard_release": args.class_guard_release}


def add_recovery_option(p: argparse.ArgumentParser) -> None:
    # checked by the settings (one error line naming the option), like --class-guard
    p.add_argument("--recovery-epochs", type=int,
                   help="the last N epochs of the schedule prune nothing, so the saved network has recovered from "
                        "the last step (default: a quarter of --epochs, rounded up; 0: prune until the end)")


def taylor_settings_from_args(args, **extra):
    s = TaylorSettings(target_flops=args.target_flops, target_params=args.target_params,
                       target_latency=args.target_latency, cost_model=args.cost_model, step=args.step,
                       scope=args.scope, min_channels=args.min_channels,
                       min_keep_fraction=args.min_keep_fraction, max_layer_step=args.max_layer_step,
                       normalize=not args.no_normalize,
                       balance_classes=not args.no_class_balance, class_guard=args.class_guard, **extra)
    s.validate()
    return s


def write_pruning_plans(args, method: str, settings: dict, tag: str) -> None:
    distillation = cli_distill.distillation_settings_from_args(args)
    folder, parent = read_parent_plans(args.dataset, args.plans)
    if distillation is not None:
        cli_distill.check_parent_is_uncompressed(parent, args.configuration)
    plans = pruning_plans(parent, args.configuration, method, settings,
                          args.plans_name or f"{args.plans}_{tag}{cli_distill.plans_name_suffix(args)}",
                          schedule_from_args(args))
    if distillation is not None:
        cli_distill.add_distillation(plans, args.configuration, distillation, read_dataset_json(folder))
    print(write_plans_beside(folder, plans, args.overwrite))


def cmd_plan_taylor(args) -> None:
    settings = taylor_settings_from_args(args, importance=args.importance, prune_every=args.prune_every,
                                         accumulate_batches=args.accumulate_batches,
                                         max_accumulate_batches=args.max_accumulate_batches,
                                         recovery_epochs=args.recovery_epochs,
                                         **class_guard_rule_from_args(args))
    write_pruning_plans(args, "taylor", settings.to_dict(), settings.tag())


def cmd_plan_sauron(args) -> None:
    config = SauronConfig(lambda_=args.lambda_, tau_start=args.tau_start, tau_max=args.tau_max, kappa=args.kappa,
                          rho=args.rho, mu=args.mu, class_guard=args.class_guard,
                          seed=12345 if args.seed is None else args.seed, recovery_epochs=args.recovery_epochs,
                          **class_guard_rule_from_args(args))
    config.validate()
    write_pruning_plans(args, "sauron", config.to_dict(), f"sauron{format_number_tag(args.tau_max)}")


def cmd_prune(args) -> None:
    settings = taylor_settings_from_args(args)
    results = prune_model_folder(args.model_folder, args.output, args.method, settings, args.images, args.folds,
                                 args.configuration, args.overwrite, args.checkpoint, args.calibration_batches,
                                 args.seed)
    for fold, r in results.items():
        undone = f"; the class guard undid {len(r['class_guard_rollbacks'])} step(s)" if r["class_guard_rollbacks"] \
            else ""
        print(f"fold {fold}: {settings.metric} now {r['history'][-1]['fraction']:.3f} of the original; "
              f"channels {list(r['channels'].values())}{undone}")
    print(f"wrote {args.output}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def register(sub, plan_sub) -> None:

    p = plan_sub.add_parser("taylor", help="plans for nnUNetTrainerTaylorPruning")
    add_plan_common(p)
    add_taylor_options(p)
    p.add_argument("--importance", choices=IMPORTANCE_MODES, default="output_normalized",
                   help="output_normalized: Sapkota et al. 2023 (default); loss: classic Molchanov et al. 2019")
    p.add_argument("--prune-every", type=positive_int, default=1, help="epochs between pruning steps (1)")
    p.add_argument("--accumulate-batches", type=positive_int, default=8, help="batches scored per step (8)")
    p.add_argument("--max-accumulate-batches", type=positive_int,
                   help="keep scoring more batches, up to this many, until every class has appeared in one "
                        "(default: 32, or --accumulate-batches if larger)")
    add_class_guard_rule_options(p, TaylorSettings.class_guard_release)
    add_recovery_option(p)
    add_schedule_options(p)
    add_distillation_options(p)
    p.set_defaults(func=cmd_plan_taylor)

    p = plan_sub.add_parser("sauron", help="plans for nnUNetTrainerSauron")
    add_plan_common(p)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.5, help="weight of the δ_opt loss (0.5)")
    p.add_argument("--tau-start", type=float, default=0.001)
    p.add_argument("--tau-max", type=float, default=0.3)
    p.add_argument("--kappa", type=int, default=15, help="steps from tau_start to tau_max (15)")
    p.add_argument("--rho", type=int, default=5, help="patience in epochs (5)")
    p.add_argument("--mu", type=float, default=0.02, help="convergence: fewer than this fraction removed (0.02)")
    p.add_argument("--class-guard", type=float, default=0.5,
                   help="undo an epoch's removal after which a class keeps less than this share of its validation "
                        "pseudo Dice, and keep those filters while they are protected (0.5; 0 turns it off)")
    add_class_guard_rule_options(p, SauronConfig.class_guard_release)
    add_recovery_option(p)
    add_schedule_options(p)  # its --seed also seeds the random reference channels (plus the fold number)
    add_distillation_options(p)
    p.set_defaults(func=cmd_plan_sauron)

    p = sub.add_parser("prune", help="one-shot filter pruning of a trained model folder (no fine-tuning)")
    add_model_folder_options(p, "prune")
    p.add_argument("--method", choices=PRUNE_METHODS, default="taylor")
    p.add_argument("-i", "--images", type=Path, help="calibration images (nnU-Net naming), needed by taylor")
    p.add_argument("--calibration-batches", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    add_taylor_options(p)
    p.set_defaults(func=cmd_prune)
