"""Options of the pruning commands (``plan taylor``, ``plan sauron``, ``prune``) and the settings they make.

Why a module of its own: the Taylor target and floor options appear in ``plan taylor`` and ``prune``, the class
guard's rule and the recovery epochs in both plan commands.
"""

from __future__ import annotations

import argparse

from nnunet_compress.cli.rank_options import add_cost_model_option
from nnunet_compress.pruning.class_guard import DEFAULT_GUARD_FLOOR, DEFAULT_NOISE_EPOCHS
from nnunet_compress.pruning.taylor import SCOPES, TaylorSettings


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value
