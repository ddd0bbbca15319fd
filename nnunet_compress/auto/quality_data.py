"""The cases ``nnunet-compress auto`` chooses on and the held-out cases it grades the winner on.

Sources, in the order the issue prefers them: ``--dataset ID`` (nnU-Net's own validation split: the cases of the
model's fold in ``splits_final.json``, which that fold never trained on, with their labels), ``--images DIR
--labels DIR``, or label-free ``--images DIR`` (the parent's own predictions are the reference, and the report
says so). The cases are split once, deterministically by seed, into a choosing part and a held-out part: the
search ranks candidates on the first only, so the Dice drop reported for the winner on the second is not flattered
by the choice. With ``--fine-tune-epochs`` and ``--images``, a third part (``--fine-tune-fraction`` of the cases)
is split off first for fine-tuning, so that no case is trained on and then chosen or graded on. Each part is laid
out in the work area as an nnU-Net image folder (links to the user's files, which
are only read) so that nnU-Net's predictor can run on it.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.env import require_env
from nnunet_compress.nnunet.model_folder import ModelFolder, read_json
from nnunet_compress.workflows.pseudo_dataset import check_given_labels

CHOOSE, HELD_OUT, TRAIN = "choose", "held_out", "fine_tune"


@dataclass
class CaseSet:
    """One part of the quality data: an nnU-Net image folder, its label folder (None until the parent's own
    predictions fill it in label-free mode) and the case ids."""

    images: Path
    labels: Path | None
    cases: list[str]


@dataclass
class QualityData:
    source: str             # what the user gave, in words (for the report)
    labelled: bool          # False: Dice is measured against the parent's own predictions
    choose: CaseSet
    held_out: CaseSet
    user_images: Path       # the folder the cases come from (INT8 and pruning calibrate on the choosing part)
    train: CaseSet | None = None  # fine-tuning from --images: the cases trained on (never chosen or graded on)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def graded_against(self) -> str:
        return "labels" if self.labelled else "the parent's own predictions (label-free: no labels were given)"


def image_case_files(images: Path, file_ending: str, channels: int) -> dict[str, list[Path]]:
    """case id -> its channel files (nnU-Net naming CASE_XXXX<ending>), every channel present."""
    if not images.is_dir():
        raise CompressError(f"image folder {images} does not exist; pass --images with nnU-Net-named images "
                            f"(CASE_0000{file_ending})")
    cases: dict[str, list[Path]] = {}
    for p in sorted(images.iterdir()):
        stem = p.name[: -len(file_ending)] if p.name.endswith(file_ending) else ""
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            cases.setdefault(stem[:-5], []).append(p)
    if not cases:
        raise CompressError(f"{images} holds no image named CASE_0000{file_ending}; nnU-Net expects one file per "
                            f"channel")
    for case, files in cases.items():
        if len(files) != channels:
            raise CompressError(f"case {case} in {images} has {len(files)} channel file(s) but the model expects "
                                f"{channels} (CASE_0000..CASE_{channels - 1:04d}{file_ending})")
    return cases


def check_labels(images: dict[str, list[Path]], labels: Path, file_ending: str) -> None:
    """Every image case needs a label file of the same size; anything else is the wrong label folder."""
    import SimpleITK as sitk

    check_given_labels(labels, images, file_ending, without="leave it out for the label-free mode")
    if file_ending not in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        return  # sizes are read with SimpleITK; other formats are left to nnU-Net's own checks

    def size(path: Path) -> tuple[int, ...]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(reader.GetSize())

    for case, files in images.items():
        a, b = size(files[0]), size(labels / f"{case}{file_ending}")
        if a != b:
            raise CompressError(f"the labels do not match the images: case {case} is {a} voxels in the image but "
                                f"{b} in {labels}; pass the label folder of these images")


def validation_cases(folder: ModelFolder, dataset: str) -> tuple[Path, Path, list[str]]:
    """(imagesTr, labelsTr, the cases no chosen fold trained on) of nnU-Net dataset `dataset`."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    roots = require_env("nnUNet_raw", "nnUNet_preprocessed")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise CompressError(f"dataset {dataset} not found in nnUNet_raw / nnUNet_preprocessed; pass the ID the model "
                            f"was trained on, or --images DIR [--labels DIR]") from None
    splits_file = roots["nnUNet_preprocessed"] / name / "splits_final.json"
    if not splits_file.is_file():
        raise CompressError(f"{splits_file} does not exist, so nnU-Net's validation split of dataset {dataset} is "
                            f"unknown; train with nnUNetv2_train first, or pass --images DIR [--labels DIR]")
    splits = read_json(splits_file)
    if "all" in folder.folds:
        raise CompressError("fold 'all' trained on every case of the dataset, so it has no validation cases; pass "
                            "--images DIR --labels DIR with cases it never saw")
    held: set[str] | None = None
    for fold in folder.folds:
        i = int(fold)
        if i >= len(splits):
            raise CompressError(f"{splits_file} has no fold {fold}; is dataset {dataset} the one this model was "
                                f"trained on?")
        val = set(splits[i]["val"])
        held = val if held is None else held & val
    if not held:
        raise CompressError(f"folds {', '.join(folder.folds)} share no validation case (each trained on the others'); "
                            f"pick one fold with -f, or pass --images DIR --labels DIR")
    raw = roots["nnUNet_raw"] / name
    return raw / "imagesTr", raw / "labelsTr", sorted(held)


def split_cases(cases: list[str], held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(choosing, held-out): a seeded shuffle, at least one case in each part (an odd case goes to the choosing
    part, whose ranking of many candidates needs it more than the one confirmation on the held-out part)."""
    if len(cases) < 2:
        raise CompressError(f"only {len(cases)} quality case(s); auto needs at least 2 (one to choose on, one "
                            f"held out to grade the winner); pass more images")
    order = sorted(cases)
    random.Random(seed).shuffle(order)
    n_held = min(len(order) - 1, max(1, math.floor(len(order) * held_out_fraction)))
    return sorted(order[n_held:]), sorted(order[:n_held])


def split_off_training(cases: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fine-tuning, the rest): a seeded shuffle of its own, at least one case to train on and two left to choose
    on and to grade on."""
    if len(cases) < 3:
        raise CompressError(f"only {len(cases)} image case(s); fine-tuning from --images needs at least 3 (one to "
                            f"train on, one to choose on, one held out); pass more images or leave out "
                            f"--fine-tune-epochs")
    order = sorted(cases)
    random.Random(f"fine-tune {seed}").shuffle(order)
    n_train = min(len(order) - 2, max(1, math.floor(len(order) * fraction)))
    return sorted(order[:n_train]), sorted(order[n_train:])


def link_cases(files: dict[str, list[Path]], labels: Path | None, cases: list[str], target: Path,
               file_ending: str) -> CaseSet:
    """An nnU-Net image folder (and label folder) of `cases` under `target`, made of links to the user's files."""
    images_dir, labels_dir = target / "images", (target / "labels" if labels is not None else None)
    for d in (images_dir, labels_dir):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    for case in cases:
        links = [(f, images_dir / f.name) for f in files[case]]
        if labels is not None:
            links.append((labels / f"{case}{file_ending}", labels_dir / f"{case}{file_ending}"))
        for src, dst in links:
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(src.resolve(), dst)
    return CaseSet(images_dir, labels_dir, list(cases))


def check_quality_options(dataset: str | None, images: Path | None, labels: Path | None,
                          held_out_fraction: float) -> None:
    """The options' own consistency, checked before anything is read or written."""
    if dataset is not None and images is not None:
        raise CompressError("pass one source of quality data: --dataset ID, or --images DIR [--labels DIR]")
    if dataset is None and images is None:
        raise CompressError("no quality data: pass --dataset ID (nnU-Net's validation cases of this model), or "
                            "--images DIR --labels DIR, or --images DIR alone (label-free)")
    if labels is not None and images is None:
        raise CompressError("--labels goes with --images (they are the labels of those images)")
    if not 0 < held_out_fraction < 1:
        raise CompressError(f"--held-out-fraction {held_out_fraction} is outside (0, 1); e.g. 0.5")


def prepare_quality_data(folder: ModelFolder, channels: int, work: Path, dataset: str | None,
                         images: Path | None, labels: Path | None, held_out_fraction: float, seed: int,
                         max_cases: int | None = None, fine_tune_fraction: float | None = None) -> QualityData:
    """Check the user's quality data and lay out its parts under `work` (with `fine_tune_fraction`, from
    --images only: the fine-tuning part too)."""
    check_quality_options(dataset, images, labels, held_out_fraction)
    file_ending = folder.dataset_json["file_ending"]
    if dataset is not None:
        images, labels, wanted = validation_cases(folder, dataset)
        files = image_case_files(images, file_ending, channels)
        absent = [c for c in wanted if c not in files]
        if absent:
            raise CompressError(f"{images} lacks the validation case(s) {', '.join(absent[:3])} of "
                                f"splits_final.json; is nnUNet_raw the folder the model was trained from?")
        files = {c: files[c] for c in wanted}
        source = f"dataset {dataset}: validation cases of fold(s) {', '.join(folder.folds)} (splits_final.json)"
    else:
        files = image_case_files(Path(images), file_ending, channels)
        source = f"images {images}" + (f", labels {labels}" if labels is not None else " (no labels)")
    if labels is not None:
        check_labels(files, Path(labels), file_ending)
    cases = sorted(files)[:max_cases] if max_cases else sorted(files)
    train = None
    if fine_tune_fraction is not None and dataset is None:
        train_cases, cases = split_off_training(cases, fine_tune_fraction, seed)
        train = link_cases(files, labels, train_cases, work / TRAIN, file_ending)
    choose, held = split_cases(cases, held_out_fraction, seed)
    return QualityData(source, labels is not None,
                       link_cases(files, labels, choose, work / CHOOSE, file_ending),
                       link_cases(files, labels, held, work / HELD_OUT, file_ending), Path(images), train)
