"""Sub-commands of ``nnunet-compress`` for the CPU engine: ``convert`` (the unchanged model as a folder that runs
on the engine, the baseline a compressed model is measured against) and ``prepare-engine`` (convert a model folder
for the engine before its first prediction)."""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.cli.options import add_model_folder_options, add_quiet_option
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL
from nnunet_compress.workflows.convert import convert_model_folder
from nnunet_compress.workflows.engine_cache import prepare_engine


def cmd_convert(args) -> None:
    info = convert_model_folder(args.model_folder, args.output, args.folds, args.configuration, args.overwrite,
                                args.checkpoint)
    print(f"wrote {args.output}: the unchanged model ({info['params']:,} parameters, folds "
          f"{', '.join(info['folds'])}) as a model folder that runs on the CPU engine; predict it with "
          f"nnUNetv2_predict_from_modelfolder -m {args.output}")


def cmd_prepare_engine(args) -> None:
    prepare_engine(args.model_folder, args.folds, args.configuration, args.checkpoint)


def register(sub) -> None:
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
