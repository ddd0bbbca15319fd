"""A base model as the speed reference of its compressed models: on torch, and on the engine at each precision.

Why: a compressed model runs on the CPU engine (OpenVINO), in f32 or INT8, while nnU-Net runs an original on torch.
Dividing one by the other credits the compression with the engine's gain. Here the base is also run on the engine
in memory (nothing is written to its folder) — in f32, and in INT8 (its own INT8 model if it carries one, else a
copy quantised in memory on synthetic CT phantoms through its own preprocessing: a timing reference only, never
graded) — and each compressed model is timed interleaved with the base on torch and the base on its own engine and
precision (:func:`nnunet_compress.evaluation.profiling.side_by_side`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nnunet_compress.evaluation.profiling import (
    ENGINE_INT8,
    TORCH_F32,
    running_variant,
    side_by_side,
    speedup,
    variants,
)
from nnunet_compress.inference import openvino_engine
from nnunet_compress.nnunet.calibration import random_patches, synthetic_ct_cases
from nnunet_compress.nnunet.model_folder import input_channels_of, load_fold_network, open_model_folder
from nnunet_compress.nnunet.plans import resolved_configuration

INT8_REFERENCE_PATCHES = 4  # calibration patches of the in-memory INT8 base (its speed does not depend on them)


@dataclass
class SpeedRow:
    """One model timed side by side with its base (seconds per patch; None where a variant could not run)."""

    variant: str                # how nnU-Net's predictor runs this model here: torch f32, engine f32, engine int8
    seconds: float | None
    base_torch_seconds: float | None
    base_same_seconds: float | None  # the base on the same engine and precision

    @property
    def vs_base_torch(self) -> float | None:
        return speedup(self.base_torch_seconds, self.seconds)

    @property
    def vs_base_same(self) -> float | None:
        return speedup(self.base_same_seconds, self.seconds)

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup_vs_base_torch": self.vs_base_torch,
                "speedup_vs_base_same_engine": self.vs_base_same}


class BaseReference:
    """The base model of a comparison, loaded once, with its timing variants built on demand."""

    def __init__(self, model_folder: str | Path, fold: str | None = None, patch: tuple[int, ...] | None = None):
        folder = open_model_folder(model_folder, [fold] if fold else None)
        self.fold = fold or sorted(folder.folds)[0]
        self.net, _, self.configuration = load_fold_network(folder, self.fold)
        self.net.eval()
        self.plans, self.dataset_json = folder.plans, folder.dataset_json
        self.patch = tuple(patch or resolved_configuration(folder.plans, self.configuration)["patch_size"])
        self.channels = input_channels_of(folder.plans, folder.dataset_json, self.configuration)
        self._variants = variants(self.net)
        self._int8_built = ENGINE_INT8 in self._variants

    def example(self) -> torch.Tensor:
        return torch.zeros((1, self.channels, *self.patch))

    def variant(self, name: str):
        """The base run as `name` (building the in-memory INT8 copy the first time it is asked for)."""
        if name == ENGINE_INT8 and not self._int8_built:
            self._int8_built = True
            volumes = synthetic_ct_cases(self.plans, self.dataset_json, self.configuration, self.channels, count=1)
            calibration = random_patches(volumes, self.patch, INT8_REFERENCE_PATCHES, batch_size=1)
            reference = openvino_engine.int8_reference(self.net, calibration)
            if reference is not None:
                self._variants[ENGINE_INT8] = reference
        return self._variants.get(name)

    def time(self, net: nn.Module, runs: int = 5, warmup: int = 1) -> SpeedRow:
        """`net` as the predictor runs it, interleaved with the base on torch and on the same engine/precision."""
        net.eval()
        mine = running_variant(net)
        timed = {"model": variants(net)[mine], "base torch": self.variant(TORCH_F32)}
        same = self.variant(mine)
        if same is not None and mine != TORCH_F32:
            timed["base same"] = same
        seconds = side_by_side(timed, self.example(), runs=runs, warmup=warmup)
        base_torch = seconds["base torch"]
        return SpeedRow(mine, seconds["model"], base_torch, seconds.get("base same", base_torch if mine == TORCH_F32
                                                                         else None))
