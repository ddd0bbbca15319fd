"""Calibration batches for one-shot pruning: the user's images, preprocessed exactly as nnU-Net would.

Taylor importance needs real activations and gradients, so a post-training prune needs a few input patches.
They go through nnU-Net's own DefaultPreprocessor (with the model's plans), so intensities and spacing are what
the network saw in training; patches of the configuration's patch size are then cropped at seeded random
positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnunet_compress.errors import CompressError


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
    from nnunet_compress.model_folder import input_channels_of
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    cases = image_cases(folder, dataset_json["file_ending"], input_channels_of(plans, dataset_json, configuration))
    pre = DefaultPreprocessor(verbose=False)
    out = []
    for files in cases[:max_cases]:
        result = pre.run_case(files, None, pm, cm, dataset_json)
        out.append(np.asarray(result[0], dtype=np.float32))
    return out


def random_patches(volumes: list[np.ndarray], patch_size, num_batches: int, batch_size: int = 2,
                   seed: int = 0) -> list[torch.Tensor]:
    """`num_batches` batches of random patches (zero-padded where a volume is smaller than the patch)."""
    rng = np.random.default_rng(seed)
    patch_size = tuple(int(p) for p in patch_size)
    batches = []
    for _ in range(num_batches):
        items = []
        for _ in range(batch_size):
            vol = volumes[int(rng.integers(len(volumes)))]
            pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch_size, vol.shape[1:])]
            vol = np.pad(vol, pad)
            start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch_size, vol.shape[1:])]
            sl = (slice(None),) + tuple(slice(b, b + p) for b, p in zip(start, patch_size))
            items.append(vol[sl])
        batches.append(torch.from_numpy(np.stack(items)))
    return batches
