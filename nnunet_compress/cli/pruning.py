"""Sub-commands of ``nnunet-compress`` for filter pruning: ``plan taylor``, ``plan sauron`` and ``prune``."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli.distill import add_distillation_options
from nnunet_compress.cli.options import (
    add_model_folder_options,
    add_plan_common,
    add_schedule_options,
    plan_request_from_args,
)
from nnunet_compress.cli.pruning_options import (
    add_class_guard_rule_options,
    add_recovery_option,
    add_taylor_options,
    class_guard_rule_from_args,
    positive_int,
    taylor_settings_from_args,
)
from nnunet_compress.pruning.sauron import SauronConfig
from nnunet_compress.pruning.taylor import IMPORTANCE_MODES, PRUNE_METHODS, TaylorSettings
from nnunet_compress.settings import format_number_tag
from nnunet_compress.workflows.plans import plan_pruning
from nnunet_compress.workflows.prune import prune_model_folder


def cmd_plan_taylor(args) -> None:
    settings = taylor_settings_from_args(args, importance=args.importance, prune_every=args.prune_every,
                                         accumulate_batches=args.accumulate_batches,
                                         max_accumulate_batches=args.max_accumulate_batches,
                                         recovery_epochs=args.recovery_epochs,
                                         **class_guard_rule_from_args(args))
    print(plan_pruning(plan_request_from_args(args), "taylor", settings.to_dict(), settings.tag()))


def cmd_plan_sauron(args) -> None:
    config = SauronConfig(lambda_=args.lambda_, tau_start=args.tau_start, tau_max=args.tau_max, kappa=args.kappa,
                          rho=args.rho, mu=args.mu, class_guard=args.class_guard,
                          seed=12345 if args.seed is None else args.seed, recovery_epochs=args.recovery_epochs,
                          **class_guard_rule_from_args(args))
    config.validate()
    print(plan_pruning(plan_request_from_args(args), "sauron", config.to_dict(),
                       f"sauron{format_number_tag(args.tau_max)}"))


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
