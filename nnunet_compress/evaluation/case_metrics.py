"""Test cases of a comparison and their per-case, per-class scores.

Dice comes from nnU-Net's own ``compute_metrics`` (the function behind ``nnUNetv2_evaluate_folder``), so the
numbers are those nnU-Net users know, with nnU-Net's conventions (regions, ignore label, NaN where a class is absent
from both reference and prediction). The normalised surface Dice is added beside it
(:mod:`nnunet_compress.evaluation.surface_dice`) on the same masks, with the voxel spacing nnU-Net's image reader reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_compress.errors import CompressError
from nnunet_compress.evaluation.surface_dice import normalized_surface_dice


@dataclass(frozen=True)
class EvalClass:
    """One evaluated label (or region) with a printable name."""

    key: int | tuple[int, ...]
    name: str

    @property
    def label(self) -> str:
        return str(self.key) if isinstance(self.key, int) else "+".join(map(str, self.key))


def classes_of(plans: dict, dataset_json: dict) -> tuple[list[EvalClass], int | None]:
    """Foreground labels (or regions) nnU-Net evaluates for this model, and its ignore label."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    lm = PlansManager(plans).get_label_manager(dataset_json)
    names = {}
    for name, value in dataset_json["labels"].items():
        key = tuple(value) if isinstance(value, (list, tuple)) else int(value)
        if isinstance(key, tuple) and len(key) == 1:
            key = key[0]
        names[key] = name
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    out = []
    for k in keys:
        k = tuple(k) if isinstance(k, (list, tuple)) else int(k)
        if isinstance(k, tuple) and len(k) == 1:
            k = k[0]
        out.append(EvalClass(k, names.get(k, str(k))))
    return out, lm.ignore_label


def find_cases(images: Path, labels: Path, file_ending: str, num_channels: int) -> list[str]:
    """Case ids of `images` (nnU-Net naming CASE_XXXX<ending>) after checking every channel and label exists."""
    if not images.is_dir():
        raise CompressError(f"image folder {images} does not exist; pass -i with the test images "
                            f"(nnU-Net naming: CASE_0000{file_ending})")
    if not labels.is_dir():
        raise CompressError(f"label folder {labels} does not exist; pass -l with the reference segmentations "
                            f"(CASE{file_ending})")
    suffix = f"_0000{file_ending}"
    cases = sorted(f[:-len(suffix)] for f in os.listdir(images) if f.endswith(suffix))
    if not cases:
        raise CompressError(f"{images} holds no image named CASE{suffix}; nnU-Net expects one file per channel, "
                            f"e.g. case001{suffix}")
    missing_channels = [f"{c}_{ch:04d}{file_ending}" for c in cases for ch in range(1, num_channels)
                        if not (images / f"{c}_{ch:04d}{file_ending}").is_file()]
    if missing_channels:
        raise CompressError(f"{images} lacks channel file(s) {', '.join(missing_channels[:5])}; the model expects "
                            f"{num_channels} channel(s) per case")
    missing = [c for c in cases if not (labels / f"{c}{file_ending}").is_file()]
    if missing:
        raise CompressError(f"{labels} has no reference for case(s) {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}; every image in {images} needs "
                            f"{labels}/CASE{file_ending} (or remove those images from the test folder)")
    return cases


def score_case(reference: str, prediction: str, classes: list[EvalClass], ignore_label: int | None,
               tolerance_mm: float, reader_class_name: str) -> dict[str, dict[str, float]]:
    """{class label: {'dice', 'nsd', 'n_ref', 'n_pred'}} of one case; runs in a worker process."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, region_or_label_to_mask
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    reader = recursive_find_reader_writer_by_name(reader_class_name)()
    keys = [c.key for c in classes]
    metrics = compute_metrics(reference, prediction, reader, keys, ignore_label)["metrics"]
    seg_ref, props = reader.read_seg(reference)
    seg_pred, _ = reader.read_seg(prediction)
    spacing = [float(s) for s in props["spacing"]]
    seg_ref, seg_pred = seg_ref[0], seg_pred[0]  # drop the channel axis; spacing follows the remaining axes
    if seg_ref.ndim == 3 and seg_ref.shape[0] == 1 and len(spacing) == 3:
        # a 2-d image: nnU-Net adds a dummy first axis (with a made-up large spacing); measure in the plane
        seg_ref, seg_pred, spacing = seg_ref[0], seg_pred[0], spacing[1:]
    valid = None if ignore_label is None else seg_ref != ignore_label
    out = {}
    for c in classes:
        m = metrics[c.key]
        ref_mask, pred_mask = region_or_label_to_mask(seg_ref, c.key), region_or_label_to_mask(seg_pred, c.key)
        if valid is not None:
            ref_mask, pred_mask = ref_mask & valid, pred_mask & valid
        out[c.label] = {"dice": float(m["Dice"]), "nsd": normalized_surface_dice(ref_mask, pred_mask, spacing,
                                                                                 tolerance_mm),
                        "n_ref": int(m["n_ref"]), "n_pred": int(m["n_pred"])}
    return out


def _score_job(job):
    return job[0], score_case(*job[1:])


def score_all(jobs: list[tuple], num_processes: int, progress) -> dict:
    """Run `score_case` for every (key, reference, prediction, ...) job, in parallel when asked."""
    results = {}
    total = len(jobs)
    if num_processes <= 1 or total <= 1:
        for i, job in enumerate(jobs, 1):
            key, value = _score_job(job)
            results[key] = value
            progress(i, total, key)
        return results
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(min(num_processes, total)) as pool:
        for i, (key, value) in enumerate(pool.imap_unordered(_score_job, jobs), 1):
            results[key] = value
            progress(i, total, key)
    return results


def nanmean(values) -> float:
    arr = np.asarray(list(values), dtype=float)
    return float(np.nanmean(arr)) if np.any(~np.isnan(arr)) else float("nan")
