"""The ``nnunet-compress`` command: what nnU-Net has no verb for.

nnU-Net's own CLI trains (``nnUNetv2_train``) and predicts (``nnUNetv2_predict``); this command prepares
compressed plans and model folders, profiles and compares models, and runs the demo. Every user error is printed
as one line (``error: ...``) with exit code 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunet_compress.errors import CompressError


def add_rank_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rank policy (choose one)")
    g.add_argument("--rank-ratio", type=float, help="rank = ceil(channels * R) per mode (the paper's factor)")
    g.add_argument("--ranks", type=Path, help="JSON file {layer name: [rank_out, rank_in]}")
    g.add_argument("--energy", type=float, help="keep this fraction of each mode's squared singular values")
    g.add_argument("--target-params", type=float, help="global budget: fraction of the parameters to keep")
    g.add_argument("--target-flops", type=float, help="global budget: fraction of the FLOPs to keep")
    p.add_argument("--min-rank", type=int, default=8,
                   help="no rank below this (capped at the channel count), for every policy; --ranks files with a "
                        "lower rank are refused (default 8)")
    p.add_argument("--rank-multiple", type=int, default=1, help="round ranks up to a multiple (e.g. 8)")
    p.add_argument("--include-stem", action="store_true", help="also factorise the first conv")
    p.add_argument("--include-pointwise", action="store_true", help="also factorise 1x1 convs (heads)")
    p.add_argument("--replace-all", action="store_true",
                   help="also factorise layers where the replacement is not cheaper than the original "
                        "(by default they are left alone); useful to check full-rank exactness")
    g = p.add_argument_group("budget policies (--target-params / --target-flops): error measure and guard")
    g.add_argument("-i", "--images", type=Path,
                   help="calibration images (nnU-Net naming CASE_0000.nii.gz), preprocessed as nnU-Net does; "
                        "default: synthetic CT phantoms through the same preprocessing")
    g.add_argument("--calibration-patches", type=int, default=4,
                   help="patches the sensitivities and the guard are measured on (4)")
    g.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the calibration patches (which patches, which synthetic phantoms; 0)")
    g.add_argument("--budget-error", choices=("kernel", "sensitivity", "best"), default="kernel",
                   help="allocator's per-layer error: the kernel's reconstruction error (kernel, default), that error "
                        "weighted by how much the network output moves with the layer's output (sensitivity), or "
                        "both allocations, keeping the one that changes the output least on the calibration patches "
                        "(best)")
    g.add_argument("--no-budget-guard", action="store_true",
                   help="keep the budget ranks even where the uniform --rank-ratio of no greater cost changes "
                        "the network's output less (by default the guard falls back to it)")


RANK_POLICY_OPTIONS = {"rank_ratio": "--rank-ratio", "ranks": "--ranks", "energy": "--energy",
                       "target_params": "--target-params", "target_flops": "--target-flops"}


def given_rank_options(args) -> list[str]:
    """The rank-policy options the user gave (for commands where they do not apply)."""
    return [flag for key, flag in RANK_POLICY_OPTIONS.items() if getattr(args, key, None) is not None]


def rank_policy_from_args(args):
    from nnunet_compress.tucker_compress import RankPolicy
    ranks = None
    if args.ranks is not None:
        from nnunet_compress.model_folder import read_json
        ranks = read_json(args.ranks)
    policy = RankPolicy(ratio=args.rank_ratio, ranks=ranks, energy=args.energy, target_params=args.target_params,
                        target_flops=args.target_flops, min_rank=args.min_rank, multiple=args.rank_multiple,
                        include_stem=args.include_stem, include_pointwise=args.include_pointwise,
                        replace_all=args.replace_all, guard=not args.no_budget_guard, budget_error=args.budget_error,
                        calibration_patches=args.calibration_patches, calibration_seed=args.calibration_seed)
    policy.validate()
    if args.images is not None and not policy.is_budget:
        flag = {"ratio": "--rank-ratio", "ranks": "--ranks", "energy": "--energy"}[policy.kind()]
        raise CompressError(f"-i/--images calibrates the budget policies (--target-params / --target-flops) only; "
                            f"drop it for {flag}")
    return policy


def cmd_trainers_path(args) -> None:
    from nnunet_compress.nnunet_env import trainers_path
    print(trainers_path())


def cmd_demo_data(args) -> None:
    from nnunet_compress.synthetic import write_synthetic_dataset
    raw = args.output or os.environ.get("nnUNet_raw")
    if not raw:
        raise CompressError("no output folder: pass -o or set nnUNet_raw")
    folder = write_synthetic_dataset(raw, args.dataset_id, name=args.name, num_train=args.num_train,
                                     num_test=args.num_test, seed=args.seed, overwrite=args.overwrite)
    print(folder)


def cmd_profile(args) -> None:
    import torch

    from nnunet_compress.model_folder import input_channels_of, load_fold_network, open_model_folder
    from nnunet_compress.plans import resolved_configuration
    from nnunet_compress.profiling import format_profile, profile_network
    folder = open_model_folder(args.model_folder, [args.fold] if args.fold else None, args.checkpoint)
    fold = next(iter(folder.folds))
    net, _, configuration = load_fold_network(folder, fold, args.configuration)
    cfg = resolved_configuration(folder.plans, configuration)
    patch = tuple(args.patch) if args.patch else tuple(cfg["patch_size"])
    if len(patch) != len(cfg["patch_size"]):
        raise CompressError(f"--patch has {len(patch)} sizes but configuration {configuration!r} is "
                            f"{len(cfg['patch_size'])}d")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda requested but no CUDA device is available; use --device cpu")
    prof = profile_network(net, input_channels_of(folder.plans, folder.dataset_json, configuration), patch,
                           args.device, runs=args.runs, warmup=args.warmup)
    print(f"{folder.path} (configuration {configuration}, fold {fold})")
    print(format_profile(prof, per_layer=not args.totals_only))
    if args.json:
        from nnunet_compress.model_folder import atomic_write_file
        atomic_write_file(args.json, lambda tmp: tmp.write_text(json.dumps(
            {"model_folder": str(folder.path), "configuration": configuration, "fold": fold, **prof.to_dict()},
            indent=2)))


def cmd_tucker(args) -> None:
    from nnunet_compress.tucker_compress import compress_model_folder
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
    from nnunet_compress.convert_folder import convert_model_folder
    info = convert_model_folder(args.model_folder, args.output, args.folds, args.configuration, args.overwrite,
                                args.checkpoint)
    print(f"wrote {args.output}: the unchanged model ({info['params']:,} parameters, folds "
          f"{', '.join(info['folds'])}) as a model folder that runs on the CPU engine; predict it with "
          f"nnUNetv2_predict_from_modelfolder -m {args.output}")


def cmd_plan_tucker(args) -> None:
    from nnunet_compress import cli_distill
    from nnunet_compress.model_folder import build_network, load_checkpoint, strip_wrapper_prefixes
    from nnunet_compress.plans import read_parent_plans, resolved_configuration, write_plans_beside
    from nnunet_compress.tucker_compress import calibration_source, select_ranks, tucker_plans
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
        from nnunet_compress.network import first_line
        try:
            net.load_state_dict(strip_wrapper_prefixes(load_checkpoint(args.weights)["network_weights"]))
        except RuntimeError as e:
            raise CompressError(f"--weights {args.weights} does not fit plans {args.plans} "
                                f"({first_line(e)})") from None
    calibration = None
    if policy.is_budget:
        from nnunet_compress.model_folder import input_channels_of
        calibration = calibration_source(args.images, parent, dataset_json, args.configuration,
                                         input_channels_of(parent, dataset_json, args.configuration),
                                         cfg["patch_size"], policy.calibration_patches, policy.calibration_seed)
    selection = select_ranks(net, policy, tuple(cfg["patch_size"]), calibration)
    schedule = schedule_from_args(args)
    plans = tucker_plans(parent, args.configuration, selection.ranks, policy, args.plans_name or
                         f"{args.plans}_{policy.tag()}{cli_distill.plans_name_suffix(args)}", schedule,
                         budget_guard=selection.guard)
    if distillation is not None:
        cli_distill.add_distillation(plans, args.configuration, distillation, dataset_json)
    path = write_plans_beside(folder, plans, args.overwrite)
    print(path)


def read_dataset_json(preprocessed_folder: Path) -> dict:
    from nnunet_compress.model_folder import read_json
    return read_json(preprocessed_folder / "dataset.json")


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


def cmd_demo(args) -> None:
    from nnunet_compress.demo import run_demo
    run_demo(Path(args.workdir), fast=args.fast, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-compress", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=cmd_trainers_path)

    p = sub.add_parser("demo-data", help="write a synthetic CT-like nnU-Net raw dataset")
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("-o", "--output", help="raw data root (default: $nnUNet_raw)")
    p.add_argument("--name", default="SyntheticCT")
    p.add_argument("--num-train", type=int, default=12)
    p.add_argument("--num-test", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("profile", help="parameters, FLOPs, latency and peak memory of a model folder")
    p.add_argument("model_folder", type=Path)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--fold", help="fold whose checkpoint to load (default: the first one present)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--patch", type=int, nargs="+", help="patch size (default: the plans' patch size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--totals-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("tucker", help="Tucker-compress a trained model folder into a new model folder")
    p.add_argument("model_folder", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--folds", nargs="+", help="folds to compress (default: all with a checkpoint)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--overwrite", action="store_true")
    add_rank_options(p)
    p.set_defaults(func=cmd_tucker)

    p = sub.add_parser("convert", help="write a trained model folder unchanged as one that runs on the CPU engine "
                                       "(the fair baseline for compressed models)")
    p.add_argument("model_folder", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--folds", nargs="+", help="folds to convert (default: all with a checkpoint)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    plan = sub.add_parser("plan", help="write compressed plans beside the parent plans")
    plan_sub = plan.add_subparsers(dest="method", required=True)
    p = plan_sub.add_parser("tucker", help="plans for nnUNetTrainerTucker")
    add_plan_common(p)
    add_rank_options(p)
    p.add_argument("--weights", type=Path, help="parent checkpoint (needed by --energy / --target-*)")
    add_schedule_options(p)
    from nnunet_compress.cli_distill import add_distillation_options
    add_distillation_options(p)
    p.set_defaults(func=cmd_plan_tucker)

    p = sub.add_parser("demo", help="the end-to-end demo on synthetic data")
    p.add_argument("--workdir", default="demo_work")
    p.add_argument("--fast", action="store_true", help="shorter training (for a quick look)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic dataset and of every training run and random choice in it (0); "
                        "each seed repeats exactly (data loading runs in the training process)")
    p.set_defaults(func=cmd_demo)

    from nnunet_compress import cli_pruning
    cli_pruning.register(sub, plan_sub)
    from nnunet_compress import cli_eval
    cli_eval.register(sub)
    from nnunet_compress import cli_distill
    cli_distill.register(sub)
    return parser


def add_plan_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="parent plans (default nnUNetPlans)")
    p.add_argument("--plans-name", help="name of the new plans (default: derived from the parent and options)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--preset", help="start from a preset in plans/ (e.g. tucker_paper, tucker_cpu, "
                                    "taylor_half_flops, sauron_paper); explicit options win")
    p.set_defaults(_parser=p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "preset", None):
            from nnunet_compress.presets import apply_preset
            apply_preset(args, args._parser)
        args.func(args)
    except CompressError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure is a bug: one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback and report it)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
