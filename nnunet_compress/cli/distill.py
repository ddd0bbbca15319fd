"""The command line of distillation: ``plan tucker|taylor|sauron ... --distill`` and ``pseudo-dataset``.

``--distill [--alpha A] [--temperature T] [--teacher CHECKPOINT]`` become a ``distillation`` entry in the plans'
compression section, so the trainer finds them where it finds the rest of the method's settings. α and T are
checked here; a ``--teacher`` checkpoint is checked against the parent plans where the plans are written
(:mod:`nnunet_compress.workflows.plans`), with nothing written on failure.

``pseudo-dataset`` writes the label-free training data (:mod:`nnunet_compress.workflows.pseudo_dataset`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_compress.distillation.loss import DistillationSettings
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL
from nnunet_compress.workflows.pseudo_dataset import PseudoDatasetRequest, write_pseudo_dataset


def add_distillation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation from the uncompressed parent (label-free fine-tuning)")
    g.add_argument("--distill", action="store_true",
                   help="train towards the parent's soft predictions as well as (or, with --alpha 1, instead of) "
                        "the labels; the plans name gets the suffix _distill")
    g.add_argument("--alpha", type=float,
                   help="weight of the teacher term in [0, 1] (0.5): loss = (1-alpha) * nnU-Net's loss + "
                        "alpha * T^2 * KL(teacher || student); 1 uses the labels for nnU-Net's sampling only")
    g.add_argument("--temperature", type=float, help="softmax temperature T > 0 of both networks (2)")
    g.add_argument("--teacher", type=Path,
                   help="checkpoint of the uncompressed parent (default: the -pretrained_weights checkpoint)")


def distillation_settings_from_args(args):
    """The settings to record, or None without --distill (then the other options are refused)."""
    given = [flag for flag, value in (("--alpha", args.alpha), ("--temperature", args.temperature),
                                      ("--teacher", args.teacher)) if value is not None]
    if not args.distill:
        if given:
            raise CompressError(f"{', '.join(given)} {'works' if len(given) == 1 else 'work'} only with --distill; "
                                f"add --distill or drop {'it' if len(given) == 1 else 'them'}")
        return None
    defaults = DistillationSettings()
    return DistillationSettings(alpha=defaults.alpha if args.alpha is None else args.alpha,
                                temperature=defaults.temperature if args.temperature is None else args.temperature,
                                teacher=None if args.teacher is None else str(args.teacher.resolve())).validate()


def cmd_pseudo_dataset(args) -> None:
    if args.num_processes < 1:
        raise CompressError(f"--num-processes {args.num_processes} must be at least 1")
    request = PseudoDatasetRequest(parent=args.model_folder, images=args.images, dataset_id=args.dataset_id,
                                   name=args.name, folds=args.folds, checkpoint=args.checkpoint,
                                   overwrite=args.overwrite, device=args.device, disable_tta=args.disable_tta,
                                   num_processes=args.num_processes, labels=args.labels)
    raw, prep, plans = write_pseudo_dataset(request, progress=lambda line: print(line, flush=True))
    print(f"wrote {raw} (raw dataset, labels = the parent's predictions) and the parent's plans {plans} in {prep}")
    print(f"next: nnUNetv2_preprocess -d {args.dataset_id} -plans_name {plans} -c CONFIGURATION, then "
          f"nnunet-compress plan tucker|taylor|sauron -d {args.dataset_id} -p {plans} ... --distill --alpha 1")


def register(sub) -> None:
    p = sub.add_parser("pseudo-dataset", help="write an nnU-Net raw dataset whose labels are a trained model's "
                                              "predictions on your images (label-free fine-tuning)")
    p.add_argument("model_folder", type=Path, help="the parent (uncompressed) model folder")
    p.add_argument("-i", "--images", type=Path, required=True,
                   help="folder of images in nnU-Net naming (CASE_0000.nii.gz, one file per channel)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the new dataset (1-999, unused)")
    p.add_argument("--labels", type=Path,
                   help="label files of these images (CASE.nii.gz): the dataset takes them and nothing is predicted")
    p.add_argument("-n", "--name", help="name of the new dataset (default: the parent's dataset name + 'Pseudo')")
    p.add_argument("-f", "--folds", nargs="+", help="folds of the parent to predict with (default: all, ensembled)")
    p.add_argument("--checkpoint", default=CHECKPOINT_FINAL)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring at prediction (faster, slightly worse)")
    p.add_argument("--num-processes", type=int, default=2, help="nnU-Net's preprocessing/export processes (2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset of this id and name (raw, plans and preprocessed data)")
    p.set_defaults(func=cmd_pseudo_dataset)
