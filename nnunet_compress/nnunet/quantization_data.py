"""Calibration and validation patches for INT8 quantisation, cut from real cases the way nnU-Net's predictor cuts them.

Why real cases and sliding-window tiles: post-training quantisation fixes every activation's int8 range from the
calibration patches, so they must show the network the intensities and anatomy it will see. nnU-Net's predictor
feeds the network tiles of the plans' patch size on a grid (``compute_steps_for_sliding_window``, step 0.5); we
draw calibration and validation patches from that same grid, a share of them on tiles that hold foreground (as
nnU-Net's training sampler oversamples foreground), so that small organs' activations are part of the ranges.

Two sources, both through nnU-Net's own code:

* :func:`cases_from_images` — the user's raw images (and, where given, their labels), run through the folder's
  own ``DefaultPreprocessor`` with the folder's plans;
* :func:`cases_from_dataset` — nnU-Net's preprocessed training cases (images and labels), read with nnU-Net's own
  dataset class from the configuration's ``data_identifier`` folder; with :func:`fold_split`, a fold's training
  cases calibrate and its validation cases (never trained on) grade.

A case without labels gets its foreground from the f32 network's prediction (label-free): the caller passes a
predictor of label maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.calibration import image_cases
from nnunet_compress.nnunet.model_folder import input_channels_of, read_json
from nnunet_compress.nnunet.plans import preprocessed_dataset_folder
from nnunet_compress.progress import bar

TILE_STEP = 0.5  # nnU-Net's predictor default (tile_step_size)


@dataclass
class Case:
    """One preprocessed case: image (C, *spatial) float32, labels (*spatial) or None."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class Patch:
    """A tile of a case: the network's input (1, C, *patch) and its labels (*patch) or None."""

    case: str
    start: tuple[int, ...]
    image: np.ndarray
    labels: np.ndarray | None


def cases_from_images(images: Path, plans: dict, dataset_json: dict, configuration: str,
                      labels: Path | None = None, max_cases: int = 8) -> list[Case]:
    """Raw images (nnU-Net naming) through the folder's own preprocessing; labels, where a folder is given, too."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    images = Path(images)
    file_ending = dataset_json["file_ending"]
    channels = input_channels_of(plans, dataset_json, configuration)
    grouped = image_cases(images, file_ending, channels)
    if labels is not None and not Path(labels).is_dir():
        raise CompressError(f"label folder {labels} does not exist; pass the folder of CASE{file_ending} label files")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = DefaultPreprocessor(verbose=False)
    out = []
    # resampling a CT to the plans' spacing takes seconds to a minute per case: one tick per case
    for files in bar(grouped[:max_cases], "preprocessing calibration cases", "case"):
        name = Path(files[0]).name[: -len(file_ending) - 5]
        label_file = None
        if labels is not None:
            label_file = Path(labels) / f"{name}{file_ending}"
            if not label_file.is_file():
                raise CompressError(f"no label file {label_file} for image case {name}; the label folder must hold "
                                    f"one CASE{file_ending} per image case")
        try:
            data, seg, _ = preprocessor.run_case(files, str(label_file) if label_file else None, pm, cm, dataset_json)
        except (AssertionError, RuntimeError, ValueError) as e:
            raise CompressError(f"nnU-Net cannot preprocess case {name} ({type(e).__name__}: {e}); check that its "
                                f"image and label files have the same geometry") from None
        out.append(Case(name, np.asarray(data, dtype=np.float32),
                        None if seg is None or label_file is None else np.maximum(np.asarray(seg[0]), 0)))
    return out


def fold_split(dataset: str | int, fold: str) -> tuple[list[str], list[str]] | None:
    """(training cases, validation cases) of `fold` in the dataset's ``splits_final.json``, or None where there is
    no such split (no file yet, fold ``all``, or a fold the file does not hold).

    Why: a fold's validation cases are cases its network never trained on. Its INT8 error shows there as it will on
    a user's new scans; on training cases the network is confident and the error hides (measured: a Tucker network's
    INT8 Dice loss on unseen cases was several times its loss on training tiles).
    """
    if fold == "all":
        return None
    splits_file = preprocessed_dataset_folder(dataset) / "splits_final.json"
    if not splits_file.is_file():
        return None
    splits = read_json(splits_file)
    index = int(fold)
    if index >= len(splits) or not splits[index].get("val"):
        return None
    return sorted(splits[index]["train"]), sorted(splits[index]["val"])


def cases_from_dataset(dataset: str | int, plans: dict, configuration: str, max_cases: int = 8,
                       names: list[str] | None = None) -> list[Case]:
    """nnU-Net's preprocessed training cases of `dataset` for the folder's configuration (images and labels): the
    first `max_cases` of `names` where given, of all cases otherwise."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = preprocessed_dataset_folder(dataset) / identifier
    if not folder.is_dir():
        raise CompressError(f"{folder} does not exist: dataset {dataset} was not preprocessed for this model's "
                            f"configuration; run nnUNetv2_preprocess -d {dataset} -c {configuration} with the "
                            f"model's plans, or pass --calibration-images")
    try:
        dataset_class = infer_dataset_class(str(folder))
        data = dataset_class(str(folder))
    except Exception as e:  # nnU-Net raises several types for an empty or foreign folder
        raise CompressError(f"nnU-Net cannot read the preprocessed cases in {folder} ({type(e).__name__}); "
                            "preprocess the dataset again") from None
    available = set(data.identifiers)
    missing = sorted(set(names or []) - available)
    if missing:
        raise CompressError(f"{folder} has no preprocessed case {missing[0]} named in splits_final.json; preprocess "
                            f"dataset {dataset} again with nnUNetv2_preprocess")
    names = sorted(names if names is not None else available)[:max_cases]
    if not names:
        raise CompressError(f"{folder} holds no preprocessed cases; run nnUNetv2_preprocess first")
    out = []
    for name in bar(names, "reading calibration cases", "case"):
        image, seg, _, _ = data.load_case(name)
        out.append(Case(name, np.asarray(image[:], dtype=np.float32), np.maximum(np.asarray(seg[0]), 0)))
    return out


def tile_starts(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Start corners of nnU-Net's sliding-window tiles over a volume of `shape` (padded up to the patch first)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    steps = compute_steps_for_sliding_window(padded, patch, TILE_STEP)
    grids = np.meshgrid(*steps, indexing="ij")
    return [tuple(int(g.flat[i]) for g in grids) for i in range(grids[0].size)]


def cut(case: Case, start: tuple[int, ...], patch: tuple[int, ...]) -> Patch:
    """The tile of `case` at `start`, zero-padded where the case is smaller than the patch (as the predictor pads)."""
    pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, case.image.shape[1:])]
    image = np.pad(case.image, pad)
    window = tuple(slice(b, b + p) for b, p in zip(start, patch))
    labels = None
    if case.labels is not None:
        labels = np.pad(case.labels, pad[1:])[window]
    return Patch(case.name, start, np.ascontiguousarray(image[(slice(None),) + window][None]), labels)


def draw_patches(cases: list[Case], patch: tuple[int, ...], count: int, foreground_share: float, seed: int,
                 exclude: set[tuple[str, tuple[int, ...]]] | None = None,
                 predict: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Patch]:
    """`count` sliding-window tiles over `cases`, about `foreground_share` of them holding foreground.

    Tiles in `exclude` ((case, start) pairs) are skipped, so validation never reuses a calibration tile while others
    are left. Foreground is a label > 0; a case without labels uses ``predict(image) -> label map`` (the f32 network),
    evaluated on a seeded sample of its tiles only (a CT has hundreds).
    """
    rng = np.random.default_rng(seed)
    exclude = exclude or set()
    tiles = [(case, start) for case in cases for start in tile_starts(case.image.shape[1:], patch)
             if (case.name, start) not in exclude]
    if not tiles:
        tiles = [(case, start) for case in cases for start in tile_starts(case.image.shape[1:], patch)]
    order = rng.permutation(len(tiles))
    foreground, background = [], []
    wanted_foreground = int(round(count * foreground_share))
    budget = max(3 * count, count + 8)  # tiles looked at: predicting every tile of a CT would take minutes
    # label-free, each tile looked at is one f32 prediction: one tick per tile, up to the budget
    looked_at = bar(order[:budget], "looking for foreground tiles", "tile") if predict is not None else order
    for index in looked_at:
        case, start = tiles[index]
        p = cut(case, start, patch)
        if p.labels is None and predict is not None:
            has_foreground = bool((predict(p.image) > 0).any())
        else:
            has_foreground = p.labels is not None and bool((p.labels > 0).any())
        (foreground if has_foreground else background).append(p)
        if len(foreground) >= wanted_foreground and len(foreground) + len(background) >= count:
            break
    chosen = foreground[:wanted_foreground]
    chosen += background[: count - len(chosen)]
    chosen += foreground[wanted_foreground: wanted_foreground + count - len(chosen)]
    return chosen
