"""Calibration batches: the user's images (or synthetic CT phantoms), preprocessed exactly as nnU-Net would.

Taylor importance needs real activations and gradients, so a post-training prune needs a few input patches; the
Tucker budget guard needs a few to compare the compressed network's output with the original's. Images go through
nnU-Net's own DefaultPreprocessor (with the model's plans), so intensities and spacing are what the network saw
in training; patches of the configuration's patch size are then cropped at seeded random positions. Without
images (``tucker`` without ``-i``), synthetic CT phantoms (:mod:`nnunet_compress.nnunet.synthetic`) go through the same
preprocessor: a body, organs, bone and scanner noise in HU give the network inputs in its training range, which a
Gaussian noise patch does not (its output change says little about real cases).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import input_channels_of
from nnunet_compress.nnunet.synthetic import generate_case
from nnunet_compress.progress import bar


def image_cases(folder: Path, file_ending: str, num_channels: int) -> list[list[str]]:
    """nnU-Net naming: CASE_0000<ending>, CASE_0001<ending>, ... grouped per case."""
    if not folder.is_dir():
        raise CompressError(f"calibration image folder {folder} does not exist")
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(file_ending))
    if not files:
        raise CompressError(f"no {file_ending} images in {folder}; images must be named CASE_0000{file_ending}")
    cases: dict[str, list[str]] = {}
    for name in files:
        stem = name[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise CompressError(f"{name} does not follow nnU-Net's naming CASE_XXXX{file_ending} (XXXX = channel)")
        cases.setdefault(stem[:-5], []).append(str(folder / name))
    for case, channel_files in cases.items():
        if len(channel_files) != num_channels:
            raise CompressError(f"case {case} has {len(channel_files)} channel file(s) but the model expects "
                                f"{num_channels}; provide CASE_0000..CASE_{num_channels - 1:04d}")
    return list(cases.values())


def preprocessed_cases(folder: Path, plans: dict, dataset_json: dict, configuration: str,
                       max_cases: int = 4) -> list[np.ndarray]:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    cases = image_cases(folder, dataset_json["file_ending"], input_channels_of(plans, dataset_json, configuration))
    pre = DefaultPreprocessor(verbose=False)
    out = []
    # resampling a CT to the plans' spacing takes seconds to a minute per case: one tick per case
    for files in bar(cases[:max_cases], "preprocessing calibration cases", "case"):
        result = pre.run_case(files, None, pm, cm, dataset_json)
        out.append(np.asarray(result[0], dtype=np.float32))
    return out


# seeds of the phantoms used when no images are given: far from the synthetic dataset's own case indices
PHANTOM_INDEX_OFFSET = 10_000


def synthetic_ct_cases(plans: dict | None, dataset_json: dict | None, configuration: str | None,
                       num_channels: int, count: int = 2, seed: int = 0) -> list[np.ndarray]:
    """`count` synthetic CT phantoms as (channels, *spatial) float32 arrays, as the network's input.

    With plans, each phantom goes through nnU-Net's DefaultPreprocessor exactly like an image file would
    (resampling to the configuration's spacing, the plans' intensity normalisation). Without plans (a bare
    network), the HU image is z-scored over the body, which is what nnU-Net's CT normalisation approximately
    does. A multi-channel model gets the phantom in every channel.
    """
    cases = (generate_case(seed, PHANTOM_INDEX_OFFSET + i) for i in range(count))
    out = []
    for case in bar(cases, "preparing calibration phantoms", "case", total=count):
        data = np.repeat(case.image_hu[None].astype(np.float32), num_channels, axis=0)
        if plans is None:
            body = data[data > -500]
            out.append(((data - body.mean()) / max(float(body.std()), 1e-6)).astype(np.float32))
            continue
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        result = DefaultPreprocessor(verbose=False).run_case_npy(data, None, {"spacing": list(case.spacing)}, pm, cm,
                                                                 dataset_json)
        out.append(np.asarray(result[0], dtype=np.float32))
    return out


def random_patches(volumes: list[np.ndarray], patch_size, num_batches: int, batch_size: int = 2,
                   seed: int = 0) -> list[torch.Tensor]:
    """`num_batches` batches of random patches (zero-padded where a volume is smaller than the patch).

    A 2-d patch size on 3-d volumes (nnU-Net's 2d configuration) takes a random slice first.
    """
    rng = np.random.default_rng(seed)
    patch_size = tuple(int(p) for p in patch_size)
    batches = []
    for _ in range(num_batches):
        items = []
        for _ in range(batch_size):
            vol = volumes[int(rng.integers(len(volumes)))]
            if vol.ndim == len(patch_size) + 2:  # (c, z, y, x) volume, (y, x) patch
                vol = vol[:, int(rng.integers(vol.shape[1]))]
            pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch_size, vol.shape[1:])]
            vol = np.pad(vol, pad)
            start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch_size, vol.shape[1:])]
            sl = (slice(None),) + tuple(slice(b, b + p) for b, p in zip(start, patch_size))
            items.append(vol[sl])
        batches.append(torch.from_numpy(np.stack(items)))
    return batches


# a source of calibration batches: called only when a budget policy needs them (they cost a preprocessing run)
CalibrationSource = Callable[[], tuple[list[torch.Tensor], str]]


def calibration_source(images, plans: dict, dataset_json: dict, configuration: str, channels: int, patch_size,
                       count: int, seed: int = 0) -> CalibrationSource:
    """The calibration of a model: the user's images when given (-i), else synthetic CT phantoms; both through
    nnU-Net's preprocessing with the model's plans."""
    if images is not None:
        return image_calibration(images, plans, dataset_json, configuration, patch_size, count, seed)
    return synthetic_calibration(plans, dataset_json, configuration, channels, patch_size, count, seed)


def synthetic_calibration(plans: dict | None, dataset_json: dict | None, configuration: str | None,
                          channels: int, patch_size, count: int, seed: int = 0) -> CalibrationSource:
    """A calibration source of `count` single-patch batches cut from synthetic CT phantoms, made on its first
    call and kept for the next (one source serves the sensitivities, the guard and repeated selections)."""
    @functools.cache
    def make():
        volumes = synthetic_ct_cases(plans, dataset_json, configuration, channels, count=2, seed=seed)
        return random_patches(volumes, patch_size, count, batch_size=1, seed=seed), "synthetic CT"
    return make


def image_calibration(images, plans: dict, dataset_json: dict, configuration: str, patch_size, count: int,
                      seed: int = 0) -> CalibrationSource:
    """A calibration source of `count` single-patch batches cut from the user's images (-i), preprocessed, made
    on its first call and kept for the next."""
    @functools.cache
    def make():
        volumes = preprocessed_cases(Path(images), plans, dataset_json, configuration)
        return random_patches(volumes, patch_size, count, batch_size=1, seed=seed), "image"
    return make
