"""Sub-commands of ``nnunet-compress`` for evaluation: ``profile`` (one model folder's counts, latency and memory)
and ``compare`` (a base against compressed models on labelled images)."""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_compress.evaluation.compare import CompareSettings, run_compare
from nnunet_compress.evaluation.folder_profile import ProfileRequest, profile_model_folder
from nnunet_compress.evaluation.profiling import format_profile
from nnunet_compress.evaluation.stats import CORRECTIONS
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, atomic_write_file


def cmd_profile(args) -> None:
    result = profile_model_folder(ProfileRequest(args.model_folder, args.configuration, args.fold, args.checkpoint,
                                                 tuple(args.patch) if args.patch else None, args.device, args.runs,
                                                 args.warmup, args.base))
    print(f"{result.folder} (configuration {result.configuration}, fold {result.fold})")
    print(format_profile(result.profile, per_layer=not args.totals_only))
    row = result.base_row
    if row is not None:
        print(f"side by side with the base {args.base} (medians of {args.runs} interleaved runs):")
        print(f"  this model, {row.variant:<11} : {_ms(row.seconds)}")
        print(f"  base, torch f32        : {_ms(row.base_torch_seconds)} (this model {_times(row.vs_base_torch)} "
              "faster)")
        print(f"  base, {row.variant:<11}      : {_ms(row.base_same_seconds)} (this model {_times(row.vs_base_same)} "
              "faster: same engine and precision, the compression's own gain)")
    elif result.running is not None:
        print(f"on every CPU variant (medians of {args.runs} interleaved runs; nnU-Net runs it as {result.running}):")
        for name, s in result.variants.items():
            print(f"  {name:<11} : {_ms(s)}")
    if args.json:
        atomic_write_file(args.json, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2)))


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
