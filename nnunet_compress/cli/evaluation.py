"""Sub-commands of ``nnunet-compress`` for evaluation and TotalSegmentator: ``compare`` and ``totalseg``."""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_compress.cli.options import add_rank_options, given_rank_options, rank_policy_from_args
from nnunet_compress.errors import CompressError
from nnunet_compress.evaluation.base_reference import BaseReference
from nnunet_compress.evaluation.compare import CompareSettings, run_compare
from nnunet_compress.evaluation.profiling import (
    format_profile,
    profile_network,
    running_variant,
    side_by_side,
    variants,
)
from nnunet_compress.evaluation.stats import CORRECTIONS
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    atomic_write_file,
    input_channels_of,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import resolved_configuration
from nnunet_compress.totalseg.home import compress_totalseg_home
from nnunet_compress.workflows.quantize import QuantizeSettings


def cmd_profile(args) -> None:
    import torch

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
    channels = input_channels_of(folder.plans, folder.dataset_json, configuration)
    prof = profile_network(net, channels, patch, args.device, runs=args.runs, warmup=args.warmup)
    print(f"{folder.path} (configuration {configuration}, fold {fold})")
    print(format_profile(prof, per_layer=not args.totals_only))
    speeds = engine_speeds(args, net, channels, patch) if args.device == "cpu" else {}
    if args.json:
        atomic_write_file(args.json, lambda tmp: tmp.write_text(json.dumps(
            {"model_folder": str(folder.path), "configuration": configuration, "fold": fold, **prof.to_dict(),
             "cpu_speeds": speeds}, indent=2)))


def engine_speeds(args, net, channels: int, patch: tuple[int, ...]) -> dict:
    """Seconds per patch side by side: with --base, this model as it runs here against the base on torch and on
    the same engine and precision; without, this model on every engine and precision it can run in."""
    import torch
    if args.base is not None:
        row = BaseReference(args.base, patch=patch).time(net, runs=args.runs, warmup=args.warmup)
        print(f"side by side with the base {args.base} (medians of {args.runs} interleaved runs):")
        print(f"  this model, {row.variant:<11} : {_ms(row.seconds)}")
        print(f"  base, torch f32        : {_ms(row.base_torch_seconds)} (this model {_times(row.vs_base_torch)} "
              "faster)")
        print(f"  base, {row.variant:<11}      : {_ms(row.base_same_seconds)} (this model {_times(row.vs_base_same)} "
              "faster: same engine and precision, the compression's own gain)")
        return row.to_dict()
    seconds = side_by_side(variants(net), torch.zeros((1, channels, *patch)), runs=args.runs, warmup=args.warmup)
    print(f"on every CPU variant (medians of {args.runs} interleaved runs; nnU-Net runs it as {running_variant(net)}):")
    for name, s in seconds.items():
        print(f"  {name:<11} : {_ms(s)}")
    return {name: s for name, s in seconds.items()}


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _times(value) -> str:
    return "n/a" if value is None else f"{value:.2f}×"



def cmd_compare(args) -> None:
    settings = CompareSettings(base=args.base, compressed=list(args.compressed), images=args.images,
                               labels=args.labels, output=args.output, tolerance_mm=args.tolerance_mm,
                               folds=args.folds, checkpoint=args.checkpoint, device=args.device,
                               disable_tta=args.disable_tta, correction=args.correction, alpha=args.alpha,
                               num_processes=args.num_processes, patch=args.patch, profile_runs=args.profile_runs,
                               timing=not args.no_timing, names=args.names)
    summary = run_compare(settings, progress=lambda line: print(line, flush=True))
    for m in summary["models"]:
        extra = "" if m["role"] == "base" else \
            (f"; Dice differs (corrected p < {settings.alpha}) for {m['classes_different_dice']} of "
             f"{m['classes_tested']} classes")
        print(f"{m['name']}: mean Dice {m['mean_dice']:.4f}, mean NSD {m['mean_nsd']:.4f}, "
              f"{m['params']:,} params, {m['flops'] / 1e9:.2f} GFLOPs{extra}")


def cmd_totalseg(args) -> None:
    if args.no_compression:
        given = given_rank_options(args)
        if given:
            raise CompressError(f"--no-compression writes the models unchanged; drop {', '.join(given)} (or drop "
                                f"--no-compression to compress)")
        policy = None
    else:
        policy = rank_policy_from_args(args)
    int8 = None
    if args.int8:
        if args.calibration_images is None:
            raise CompressError("--int8 needs --calibration-images DIR: a few of your own CTs (nnU-Net naming "
                                "CASE_0000.nii.gz) to calibrate and check every model on")
        int8 = QuantizeSettings(calibration_images=args.calibration_images, subset_size=args.subset_size,
                                validation_patches=args.validation_patches, max_dice_drop=args.max_dice_drop,
                                max_cases=args.max_cases).validate()
    elif args.calibration_images is not None:
        raise CompressError("--calibration-images calibrates INT8 quantisation; add --int8 (or drop it)")
    result = compress_totalseg_home(args.output, policy, args.task, source_home=args.source_home,
                                    overwrite=args.overwrite, progress=lambda line: print(line, flush=True),
                                    images=args.images, engine_cache=not args.no_engine_cache, int8=int8)
    kind = ("unchanged (CPU engine)" if policy is None else "compressed") + (", INT8" if int8 else "")
    print(f"wrote {args.output}: {len(result['models'])} {kind} model(s). Run with\n"
          f"  TOTALSEG_HOME_DIR={args.output} TotalSegmentator -i ct.nii.gz -o seg/"
          + (" --fast" if all(t.endswith("_fast") for t in args.task) else ""))


def register(sub) -> None:
    p = sub.add_parser("profile", help="parameters, FLOPs, latency and peak memory of a model folder")
    p.add_argument("model_folder", type=Path)
    p.add_argument("-c", "--configuration")
    p.add_argument("-f", "--fold", help="fold whose checkpoint to load (default: the first one present)")
    p.add_argument("--checkpoint", default=CHECKPOINT_FINAL)
    p.add_argument("--patch", type=int, nargs="+", help="patch size (default: the plans' patch size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--totals-only", action="store_true")
    p.add_argument("--base", type=Path,
                   help="the base model folder: time this model side by side with it on torch and on the same engine "
                        "and precision (CPU)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_profile)


    p = sub.add_parser("compare", help="Dice, surface Dice, paired tests and cost of a base vs compressed models")
    p.add_argument("base", type=Path, help="the base (uncompressed) model folder")
    p.add_argument("compressed", type=Path, nargs="+", help="one or more model folders to compare with the base")
    p.add_argument("-i", "--images", type=Path, required=True, help="test images (nnU-Net naming CASE_0000.nii.gz)")
    p.add_argument("-l", "--labels", type=Path, required=True, help="reference segmentations (CASE.nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="report folder (keeps predictions/<model>/ for re-runs)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (2)")
    p.add_argument("-f", "--folds", nargs="+", help="folds to predict with (default: every fold each model has)")
    p.add_argument("--checkpoint", default=CHECKPOINT_FINAL)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring at prediction (8x faster in 3-d)")
    p.add_argument("--correction", choices=CORRECTIONS, default="holm",
                   help="multiple-comparison correction across classes (holm: family-wise; bh: false discovery "
                        "rate)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--num-processes", type=int, default=2, help="processes for nnU-Net and for scoring (2)")
    p.add_argument("--patch", type=int, nargs="+", help="patch for profiling (default: each model's plans)")
    p.add_argument("--profile-runs", type=int, default=3, help="timed forward passes per model (3)")
    p.add_argument("--no-timing", action="store_true", help="count params/FLOPs only, no latency/memory")
    p.add_argument("--names", nargs="+", help="display names, base first (default: from the folder names)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("totalseg", help="compress TotalSegmentator's installed models into a new TotalSegmentator "
                                        "home folder")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="new TotalSegmentator home (use it with TOTALSEG_HOME_DIR=...)")
    p.add_argument("--task", nargs="+", default=["total"],
                   help="TotalSegmentator task(s): total (the five 1.5 mm part models), total_fast (3 mm), "
                        "total_fastest, or any other task name of TotalSegmentator (default: total)")
    p.add_argument("--source-home", type=Path,
                   help="TotalSegmentator home holding the weights (default: $TOTALSEG_HOME_DIR, else "
                        "~/.totalsegmentator; $TOTALSEG_WEIGHTS_PATH is honoured as its nnunet/results)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-compression", action="store_true",
                   help="write the models unchanged, to run the original on the CPU engine (a fair baseline)")
    p.add_argument("--no-engine-cache", action="store_true",
                   help="do not convert the written models for the CPU engine now (by default they are, into the "
                        "user's cache, so that TotalSegmentator's first run starts as quickly as later ones)")
    add_rank_options(p)
    g = p.add_argument_group("INT8 (nnunet-compress quantize on every model)")
    g.add_argument("--int8", action="store_true",
                   help="also quantise every model to INT8 for the CPU engine, Dice checked against its f32 "
                        "predictions on your CTs")
    g.add_argument("--calibration-images", type=Path, help="your CTs (CASE_0000.nii.gz) that calibrate INT8")
    g.add_argument("--subset-size", type=int, default=32, help="calibration tiles per model (32)")
    g.add_argument("--validation-patches", type=int, default=16, help="validation tiles per model (16)")
    g.add_argument("--max-dice-drop", type=float, default=0.01, help="largest mean Dice loss accepted (0.01)")
    g.add_argument("--max-cases", type=int, default=8, help="CTs read from --calibration-images (8)")
    p.set_defaults(func=cmd_totalseg)
