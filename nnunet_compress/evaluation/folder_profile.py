"""``nnunet-compress profile``: one fold of a model folder profiled (counts, latency, peak memory) and timed on
the CPU the way nnU-Net's predictor would run it.

On the CPU the profile also gives seconds per patch side by side: with a base model folder, this model as it
runs here against the base on torch and on the same engine and precision (:class:`.base_reference.BaseReference`);
without one, this model on every engine and precision it can run in (:func:`.profiling.variants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.evaluation.base_reference import BaseReference, SpeedRow
from nnunet_compress.evaluation.profiling import (
    NetworkProfile,
    profile_network,
    running_variant,
    side_by_side,
    variants,
)
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    input_channels_of,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import resolved_configuration


@dataclass(frozen=True)
class ProfileRequest:
    """Which model folder, fold and patch to profile, on which device, how many runs, and the base to time it
    against (None: every CPU variant of this model)."""

    model_folder: Path
    configuration: str | None = None
    fold: str | None = None
    checkpoint: str = CHECKPOINT_FINAL
    patch: tuple[int, ...] | None = None
    device: str = "cpu"
    runs: int = 5
    warmup: int = 2
    base: Path | None = None


@dataclass
class FolderProfile:
    """The profile of one fold and, on the CPU, its seconds per patch: against the base (`base_row`) or per
    variant (`variants`, with `running`: the variant nnU-Net's predictor runs it as)."""

    folder: Path
    configuration: str
    fold: str
    profile: NetworkProfile
    base_row: SpeedRow | None = None
    variants: dict[str, float | None] = field(default_factory=dict)
    running: str | None = None

    def cpu_speeds(self) -> dict:
        return self.base_row.to_dict() if self.base_row is not None else dict(self.variants)

    def to_dict(self) -> dict:
        return {"model_folder": str(self.folder), "configuration": self.configuration, "fold": self.fold,
                **self.profile.to_dict(), "cpu_speeds": self.cpu_speeds()}


def profile_model_folder(request: ProfileRequest) -> FolderProfile:
    folder = open_model_folder(request.model_folder, [request.fold] if request.fold else None, request.checkpoint)
    fold = next(iter(folder.folds))
    net, _, configuration = load_fold_network(folder, fold, request.configuration)
    cfg = resolved_configuration(folder.plans, configuration)
    patch = tuple(request.patch) if request.patch else tuple(cfg["patch_size"])
    if len(patch) != len(cfg["patch_size"]):
        raise CompressError(f"--patch has {len(patch)} sizes but configuration {configuration!r} is "
                            f"{len(cfg['patch_size'])}d")
    if request.device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda requested but no CUDA device is available; use --device cpu")
    channels = input_channels_of(folder.plans, folder.dataset_json, configuration)
    prof = profile_network(net, channels, patch, request.device, runs=request.runs, warmup=request.warmup)
    result = FolderProfile(folder.path, configuration, fold, prof)
    if request.device != "cpu":
        return result
    if request.base is not None:
        result.base_row = BaseReference(request.base, patch=patch).time(net, runs=request.runs,
                                                                        warmup=request.warmup)
    else:
        result.variants = side_by_side(variants(net), torch.zeros((1, channels, *patch)), runs=request.runs,
                                       warmup=request.warmup)
        result.running = running_variant(net)
    return result
