"""Sub-commands of ``nnunet-compress`` for Tucker compression: ``tucker``, ``plan tucker``, ``convert``
(the unchanged model on the CPU engine, the baseline a compressed model is measured against) and ``prepare-engine``
(convert a model folder for the engine before its first prediction)."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli import distill as cli_distill
from nnunet_compress.cli.distill import add_distillation_options
from nnunet_compress.cli.options import (
    add_model_folder_options,
    add_plan_common,
    add_quiet_option,
    add_rank_options,
    add_schedule_options,
    rank_policy_from_args,
    read_dataset_json,
    schedule_from_args,
)
from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.network import refuse_int8_weights, strip_wrapper_prefixes
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, build_network, input_channels_of, load_checkpoint
from nnunet_compress.nnunet.plans import read_parent_plans, resolved_configuration, tucker_plans, write_plans_beside
from nnunet_compress.workflows.convert import convert_model_folder
from nnunet_compress.workflows.engine_cache import prepare_engine
from nnunet_compress.workflows.tucker import calibration_source, compress_model_folder, select_ranks


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


def cmd_convert(args) -> None:
    info = convert_model_folder(args.model_folder, args.output, args.folds, args.configuration, args.overwrite,
                                args.checkpoint)
    print(f"wrote {args.output}: the unchanged model ({info['params']:,} parameters, folds "
          f"{', '.join(info['folds'])}) as a model folder that runs on the CPU engine; predict it with "
          f"nnUNetv2_predict_from_modelfolder -m {args.output}")


def cmd_plan_tucker(args) -> None:
    policy = rank_policy_from_args(args)
    distillation = cli_distill.distillation_settings_from_args(args)
    folder, parent = read_parent_plans(args.dataset, args.plans)
    if distillation is not None:
        cli_distill.check_parent_is_uncompressed(parent, args.configuration)
    cfg = resolved_configuration(parent, args.configuration)
    dataset_json = read_dataset_json(folder)
    net = build_network(parent, dataset_json, args.configuration)
    if policy.needs_weights:
        if args.weights is None:
            raise CompressError(f"the {policy.kind()} policy depends on the trained weights; pass --weights "
                                f"base_checkpoint.pth")
    if args.weights is not None:
        weights = strip_wrapper_prefixes(load_checkpoint(args.weights)["network_weights"])
        refuse_int8_weights(weights)
        try:
            net.load_state_dict(weights)
        except RuntimeError as e:
            raise CompressError(f"--weights {args.weights} does not fit plans {args.plans} "
                                f"({first_line(e)})") from None
    calibration = None
    if policy.is_budget:
        calibration = calibration_source(args.images, parent, dataset_json, args.configuration,
                                         input_channels_of(parent, dataset_json, args.configuration),
                                         cfg["patch_size"], policy.calibration_patches, policy.calibration_seed)
    selection = select_ranks(net, policy, tuple(cfg["patch_size"]), calibration)
    schedule = schedule_from_args(args)
    plans = tucker_plans(parent, args.configuration, selection.ranks, policy, args.plans_name or
                         f"{args.plans}_{policy.tag()}{cli_distill.plans_name_suffix(args)}", schedule,
                         budget_guard=selection.guard,
                         latency=selection.latency.to_dict() if selection.latency else None)
    if distillation is not None:
        cli_distill.add_distillation(plans, args.configuration, distillation, dataset_json)
    path = write_plans_beside(folder, plans, args.overwrite)
    print(path)



def cmd_prepare_engine(args) -> None:
    prepare_engine(args.model_folder, args.folds, args.configuration, args.checkpoint)


def register(sub, plan_sub) -> None:
    p = sub.add_parser("tucker", help="Tucker-compress a trained model folder into a new model folder")
    add_model_folder_options(p, "compress")
    add_rank_options(p)
    p.set_defaults(func=cmd_tucker)

    p = sub.add_parser("convert", help="write a trained model folder unchanged as one that runs on the CPU engine "
                                       "(the fair baseline for compressed models)")
    add_model_folder_options(p, "convert")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("prepare-engine", help="convert a model folder for the CPU engine now, so that its first "
                                              "prediction starts at once (the folder is only read)")
    p.add_argument("model_folder", type=Path)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--folds", nargs="+", help="folds to prepare (default: all with a checkpoint)")
    p.add_argument("--checkpoint", default=CHECKPOINT_FINAL)
    add_quiet_option(p)
    p.set_defaults(func=cmd_prepare_engine)

    p = plan_sub.add_parser("tucker", help="plans for nnUNetTrainerTucker")
    add_plan_common(p)
    add_rank_options(p)
    p.add_argument("--weights", type=Path, help="parent checkpoint (needed by --energy / --target-*)")
    add_schedule_options(p)
    add_distillation_options(p)
    p.set_defaults(func=cmd_plan_tucker)

