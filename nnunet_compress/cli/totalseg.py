"""Sub-command ``nnunet-compress totalseg``: TotalSegmentator's installed models compressed (or written unchanged,
optionally INT8) into a new TotalSegmentator home (:mod:`nnunet_compress.totalseg.home`)."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli.rank_options import add_rank_options, given_rank_options, rank_policy_from_args
from nnunet_compress.errors import CompressError
from nnunet_compress.totalseg.home import compress_totalseg_home
from nnunet_compress.workflows.quantize import QuantizeSettings


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
                                max_class_drop=args.max_class_drop, max_cases=args.max_cases).validate()
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
    g.add_argument("--max-class-drop", type=float, default=None,
                   help="largest loss of any one class's Dice accepted (twice --max-dice-drop; 1: no limit)")
    g.add_argument("--max-cases", type=int, default=8, help="CTs read from --calibration-images (8)")
    p.set_defaults(func=cmd_totalseg)
