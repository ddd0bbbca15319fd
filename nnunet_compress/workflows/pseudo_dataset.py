"""``nnunet-compress pseudo-dataset``: an ordinary nnU-Net dataset whose labels are the parent model's predictions.

Who compresses TotalSegmentator or a clinical nnU-Net model rarely holds its labelled training set, but has images.
The uncompressed parent labels them: ``imagesTr/`` are the user's images (copied), ``labelsTr/`` the parent's
predictions through nnU-Net's own ``nnUNetPredictor`` (every fold of the parent by default, as
``nnUNetv2_predict`` ensembles them), and ``dataset.json`` has the parent's labels, channel names and file ending.
Everything downstream is nnU-Net's and ours unchanged: ``nnUNetv2_preprocess``, ``nnunet-compress plan ...
--distill``, ``nnUNetv2_train``. With ``--alpha 1`` the pseudo-labels only steer nnU-Net's foreground sampling and
the student learns from the teacher's probabilities alone. With ``--labels DIR`` the dataset takes those label files
instead and nothing is predicted: the user's own labelled images, laid out with the parent's plans so that they
are preprocessed exactly as the parent's training data were (``auto`` fine-tunes on such a dataset when given
``--images --labels``).

nnU-Net preprocesses with the plans it finds in ``nnUNet_preprocessed/<dataset>/``, so beside the raw dataset the
command puts the parent's ``plans.json`` there (under its own plans name, renamed to the new dataset), with
``dataset.json`` and the parent folder's ``dataset_fingerprint.json`` (nnU-Net's trainer copies it into every model
folder). The data are then normalised exactly as for the parent (the intensity statistics live in the plans).

Both folders are assembled in temporary siblings and renamed into place at the end: a failed or interrupted run
leaves nothing that nnU-Net would pick up, and every check (images, dataset id, parent folder) runs before
anything is written.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.env import require_env, trainers_path
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    ModelFolder,
    atomic_output_folder,
    open_model_folder,
    write_json,
)
from nnunet_compress.progress import shows_bar

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
PROVENANCE_KEY = "nnunet_compress_pseudo_labels"


@dataclass
class PseudoDatasetRequest:
    parent: Path
    images: Path
    dataset_id: int
    name: str | None = None
    folds: list[str] | None = None
    checkpoint: str = CHECKPOINT_FINAL
    overwrite: bool = False
    device: str = "cpu"
    disable_tta: bool = False
    num_processes: int = 2
    labels: Path | None = None  # given: these are the labels (CASE<ending> per case) and nothing is predicted


def image_cases(images: Path, file_ending: str, channel_names: dict) -> list[str]:
    """Case ids of `images` after checking nnU-Net's naming, the file ending and every case's channels."""
    if not images.is_dir():
        raise CompressError(f"images folder {images} does not exist; pass -i with the folder of your images "
                            f"(nnU-Net naming CASE_0000{file_ending})")
    files = sorted(f for f in os.listdir(images) if not f.startswith(".") and (images / f).is_file())
    if not files:
        raise CompressError(f"images folder {images} is empty; put the images to label there, one file per channel "
                            f"named CASE_0000{file_ending}")
    other = [f for f in files if not f.endswith(file_ending)]
    if other:
        raise CompressError(f"{images} holds file(s) the parent model cannot read: {', '.join(other[:3])}"
                            f"{' ...' if len(other) > 3 else ''}; it reads {file_ending} files (its dataset.json "
                            f"file_ending): convert them, or remove them from the folder")
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}")
    channels: dict[str, set[int]] = {}
    for f in files:
        m = pattern.fullmatch(f)
        if m is None:
            raise CompressError(f"{images / f} is not in nnU-Net's naming CASE_XXXX{file_ending} (XXXX = channel, "
                                f"0000 for the first); rename it, e.g. {f[:-len(file_ending)]}_0000{file_ending}")
        channels.setdefault(m.group(1), set()).add(int(m.group(2)))
    wanted = set(range(len(channel_names)))
    names = ", ".join(f"{k}: {v}" for k, v in channel_names.items())
    for case, found in sorted(channels.items()):
        if found != wanted:
            extra, missing = sorted(found - wanted), sorted(wanted - found)
            what = (f"has channel {extra[0]:04d}" if extra else f"lacks channel {missing[0]:04d}")
            raise CompressError(f"case {case} in {images} {what}, but the parent model takes {len(wanted)} "
                                f"channel(s) ({names}); give every case exactly the channels _0000 to "
                                f"_{len(wanted) - 1:04d}")
    return sorted(channels)


def check_dataset_id(dataset_id: int, folder_name: str, overwrite: bool, parent: ModelFolder) -> None:
    """Refuse an id nnU-Net already knows under another name, and an existing dataset without --overwrite."""
    if not 1 <= dataset_id <= 999:
        raise CompressError(f"dataset id {dataset_id} is outside 1..999 (nnU-Net's three digits); pass another -d")
    if parent.plans.get("dataset_name") == folder_name:
        raise CompressError(f"{folder_name} is the dataset the parent model was trained on; choose another -d/-n "
                            f"(its labelled data are never replaced)")
    existing = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        if not root or not Path(root).is_dir():
            continue
        for p in sorted(Path(root).glob(f"Dataset{dataset_id:03d}_*")):
            if p.name != folder_name:
                raise CompressError(f"dataset id {dataset_id} is taken by {p} ({var}); nnU-Net finds datasets by id, "
                                    f"so choose another -d")
            if var != "nnUNet_results":
                existing.append(p)
    if existing and not overwrite:
        raise CompressError(f"{existing[0]} already exists; pass --overwrite to replace it (raw data, plans and "
                            f"preprocessed data of that id), or choose another -d")


def check_given_labels(labels: Path, cases, file_ending: str,
                       without: str = "leave it out to label the images with the parent") -> None:
    """Every image case needs its label file in `labels` (checked before anything is written)."""
    if not labels.is_dir():
        raise CompressError(f"label folder {labels} does not exist; pass --labels with one CASE{file_ending} per "
                            f"image case, or {without}")
    missing = [c for c in cases if not (labels / f"{c}{file_ending}").is_file()]
    if missing:
        raise CompressError(f"the labels do not match the images: {labels} has no {missing[0]}{file_ending}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; pass the label folder "
                            f"of these images")


def predict_labels(folder: ModelFolder, images: Path, output: Path, request: PseudoDatasetRequest) -> None:
    """The parent's segmentation of every image, by nnU-Net's predictor (all requested folds ensembled)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainers_path() not in ext:  # parents that are themselves compressed name our trainers
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*ext, trainers_path()])
    device = torch.device(request.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not request.disable_tta,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=shows_bar(sys.stderr))
    predictor.initialize_from_trained_model_folder(str(folder.path), sorted(folder.folds), request.checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise CompressError(f"{folder.path} is a cascade stage (it needs the previous stage's segmentations); pass "
                            f"the model folder of a full-resolution or low-resolution configuration")
    predictor.predict_from_files(str(images), str(output), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=request.num_processes,
                                 num_processes_segmentation_export=request.num_processes)


def pseudo_dataset_json(parent: ModelFolder, name: str, cases: list[str], request: PseudoDatasetRequest) -> dict:
    src = parent.dataset_json
    by = (f"the nnU-Net model {parent.path} (folds {', '.join(sorted(parent.folds))})" if request.labels is None
          else f"the label files of {request.labels}")
    out = {"channel_names": src["channel_names"], "labels": src["labels"], "numTraining": len(cases),
           "file_ending": src["file_ending"], "name": name, "description": f"images labelled by {by}"}
    for key in ("regions_class_order", "overwrite_image_reader_writer"):
        if key in src:
            out[key] = src[key]
    out[PROVENANCE_KEY] = {"parent_model_folder": str(parent.path.resolve()), "folds": sorted(parent.folds),
                           "checkpoint": request.checkpoint, "test_time_augmentation": not request.disable_tta,
                           "images": str(request.images.resolve()),
                           "labels": "the parent's predictions" if request.labels is None
                           else str(request.labels.resolve())}
    return out


def default_name(parent: ModelFolder) -> str:
    base = re.sub(r"^Dataset\d{3}_", "", str(parent.plans.get("dataset_name") or "Parent"))
    return f"{base}Pseudo"


def write_pseudo_dataset(request: PseudoDatasetRequest, progress=print) -> tuple[Path, Path, str]:
    """Write the raw dataset and the preprocessed folder's plans; returns both folders and the plans name."""
    env = require_env("nnUNet_raw", "nnUNet_preprocessed")
    if request.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise CompressError("--device cuda requested but no CUDA device is available; use --device cpu")
    parent = open_model_folder(request.parent, request.folds, request.checkpoint)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in parent.dataset_json:
            raise CompressError(f"{parent.path / 'dataset.json'} has no '{key}'; restore it from the original model")
    name = request.name or default_name(parent)
    if not NAME_PATTERN.fullmatch(name):
        raise CompressError(f"dataset name {name!r} may only hold letters, digits, '_' and '-'; pass another -n")
    folder_name = f"Dataset{request.dataset_id:03d}_{name}"
    check_dataset_id(request.dataset_id, folder_name, request.overwrite, parent)
    cases = image_cases(request.images, parent.dataset_json["file_ending"], parent.dataset_json["channel_names"])
    ending = parent.dataset_json["file_ending"]
    if request.labels is not None:
        check_given_labels(request.labels, cases, ending)
    raw_target = env["nnUNet_raw"] / folder_name
    prep_target = env["nnUNet_preprocessed"] / folder_name
    dataset_json = pseudo_dataset_json(parent, name, cases, request)
    plans = copy.deepcopy(parent.plans)
    plans["dataset_name"] = folder_name
    plans_name = plans.get("plans_name", "nnUNetPlans")

    with atomic_output_folder(raw_target, overwrite=request.overwrite) as raw, \
            atomic_output_folder(prep_target, overwrite=request.overwrite) as prep:
        for folder in (raw, prep):
            folder.chmod(0o755)  # mkdtemp makes it private; datasets are ordinary shared data
        (raw / "imagesTr").mkdir()
        for f in sorted(os.listdir(request.images)):
            if f.endswith(ending) and not f.startswith("."):
                shutil.copy2(request.images / f, raw / "imagesTr" / f)
        if request.labels is not None:
            progress(f"labels of {len(cases)} case(s) copied from {request.labels} (nothing predicted)")
            predictions = raw / ".predictions"
            predictions.mkdir()
            for c in cases:
                shutil.copy2(request.labels / f"{c}{ending}", predictions / f"{c}{ending}")
        else:
            progress(f"labelling {len(cases)} case(s) with {parent.path} (folds {', '.join(sorted(parent.folds))}) "
                     f"through nnU-Net's predictor")
            predictions = raw / ".predictions"
            predict_labels(parent, raw / "imagesTr", predictions, request)
        missing = [c for c in cases if not (predictions / f"{c}{ending}").is_file()]
        if missing:
            raise CompressError(f"nnU-Net's predictor wrote no segmentation for case(s) {', '.join(missing[:5])}; "
                                f"check that those images open with nnU-Net's reader")
        (raw / "labelsTr").mkdir()
        for c in cases:
            os.replace(predictions / f"{c}{ending}", raw / "labelsTr" / f"{c}{ending}")
        shutil.rmtree(predictions)
        write_json(raw / "dataset.json", dataset_json)
        write_json(prep / "dataset.json", dataset_json)
        write_json(prep / f"{plans_name}.json", plans)
        if (parent.path / "dataset_fingerprint.json").is_file():
            shutil.copy2(parent.path / "dataset_fingerprint.json", prep / "dataset_fingerprint.json")
        else:
            progress(f"note: {parent.path} has no dataset_fingerprint.json, which nnUNetv2_train copies into its "
                     f"model folder; run nnUNetv2_extract_fingerprint -d {request.dataset_id} before training")
    return raw_target, prep_target, plans_name
