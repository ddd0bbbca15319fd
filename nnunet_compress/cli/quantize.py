"""Sub-command ``nnunet-compress quantize``: post-training INT8 of any model folder for the CPU engine."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli.options import add_model_folder_options
from nnunet_compress.workflows.quantize import PRESETS, QuantizeSettings, quantize_model_folder


def cmd_quantize(args) -> None:
    settings = QuantizeSettings(args.calibration_images, args.calibration_dataset, args.validation_labels,
                                args.subset_size, args.validation_patches, args.foreground_share, args.max_cases,
                                args.max_dice_drop, args.nncf_preset, args.seed, args.max_class_drop).validate()
    report = quantize_model_folder(args.model_folder, args.output, settings, args.folds, args.configuration,
                                   args.overwrite, args.checkpoint)
    for fold in report["folds"]:
        kept = len(fold["f32_layers"])
        print(f"fold {fold['fold']}: {fold['convolutions'] - kept}/{fold['convolutions']} convolutions INT8, {kept} "
              f"kept in f32; mean foreground Dice f32 {fold['mean_dice_f32']:.4f}, INT8 {fold['mean_dice_int8']:.4f} "
              f"(against {report['graded_against']})")
    print(f"wrote {args.output} (details: {Path(args.output) / 'quantization_report.md'}); nnUNetv2_predict runs it "
          f"in INT8 on the CPU engine, NNUNET_COMPRESS_CPU_PRECISION=f32 runs it in f32")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="post-training INT8 of a model folder (original or compressed) for the CPU "
                                        "engine, Dice kept within --max-dice-drop")
    add_model_folder_options(p, "quantize")
    g = p.add_argument_group("calibration data (choose one; real cases, never noise)")
    g.add_argument("--calibration-images", type=Path,
                   help="raw images (nnU-Net naming CASE_0000.nii.gz), run through the folder's own preprocessing")
    g.add_argument("--calibration-dataset",
                   help="dataset ID or name whose nnU-Net preprocessed training cases (and labels) calibrate")
    g.add_argument("--validation-labels", type=Path,
                   help="labels of the --calibration-images (CASE.nii.gz); without them Dice is measured against "
                        "the f32 model's own predictions")
    p.add_argument("--subset-size", type=int, default=32, help="calibration tiles (32)")
    p.add_argument("--validation-patches", type=int, default=16,
                   help="validation tiles the accuracy control grades on, none of them a calibration tile; with "
                        "--calibration-dataset, from the fold's validation cases in splits_final.json (16)")
    p.add_argument("--foreground-share", type=float, default=0.5,
                   help="share of tiles that hold foreground (labels, or the f32 prediction; 0.5)")
    p.add_argument("--max-cases", type=int, default=8, help="cases read from the calibration source (8)")
    p.add_argument("--max-dice-drop", type=float, default=0.01,
                   help="largest loss of mean foreground Dice accepted; layers whose INT8 costs more stay f32 (0.01)")
    p.add_argument("--max-class-drop", type=float, default=None,
                   help="largest loss of any one class's Dice accepted (twice --max-dice-drop; 1: no limit)")
    p.add_argument("--nncf-preset", choices=PRESETS, default="mixed",
                   help="NNCF preset: mixed (asymmetric activations, default) or performance (symmetric)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiles drawn (0)")
    p.set_defaults(func=cmd_quantize)
