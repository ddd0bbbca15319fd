"""Building one candidate of ``nnunet-compress auto``: each step is an existing workflow applied to the previous
step's model folder, written atomically by that workflow into the candidate's own folder of the work area.

A chain reuses its prefix's folder (``l1:flops=0.5+tucker:ratio=0.5`` starts from ``l1:flops=0.5``'s model), and a
folder that exists is complete (the workflows rename it into place only when every fold is written), so a resumed
search never builds a step twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nnunet_compress.auto.candidates import FINE_TUNE, Candidate, Step
from nnunet_compress.auto.fine_tune import FineTuneSettings

MODEL = "model"


@dataclass
class BuildContext:
    """What every step needs besides its source: the parent's folds, configuration and checkpoint name, the
    choosing cases (calibration of pruning, Tucker budgets and INT8; never the held-out ones), the Dice budget
    INT8's accuracy control keeps, and where the steps' own progress lines go (the work area's log)."""

    parent: Path
    folds: list[str] | None
    configuration: str
    checkpoint: str
    images: Path
    labels: Path | None
    max_dice_drop: float
    candidates_root: Path
    log: Callable[[str], None]
    int8_subset_size: int = 16
    int8_validation_patches: int = 8
    fine_tune: FineTuneSettings | None = None   # --fine-tune-epochs: the labelled dataset and the schedule
    parent_plans_name: str = ""
    parent_folds: list[str] | None = None
    fine_tune_setup: list[str] | None = None   # --images fine-tunes: the commands that make their dataset

    def model_folder(self, candidate: Candidate) -> Path:
        return self.candidates_root / candidate.name / MODEL

    def data_options(self) -> dict[str, str]:
        out = {"images": str(self.images), "max_dice_drop": f"{self.max_dice_drop:g}",
               "subset_size": str(self.int8_subset_size), "validation_patches": str(self.int8_validation_patches)}
        if self.labels is not None:
            out["labels"] = str(self.labels)
        if self.fine_tune is not None:
            out.update(dataset=self.fine_tune.dataset, configuration=self.configuration, checkpoint=self.checkpoint,
                       folds=",".join(self.folds or self.parent_folds or []), plans_name=self.parent_plans_name,
                       candidates_root=str(self.candidates_root), device=self.fine_tune.device)
            if self.fine_tune_setup:
                out.update(fine_tune_setup="\n".join(self.fine_tune_setup),
                           distil="yes" if self.fine_tune.teachers is not None else "no")
        return out


def ensure_built(candidate: Candidate, ctx: BuildContext) -> Path:
    """The candidate's model folder, building it (and its prefix) where it does not exist yet."""
    target = ctx.model_folder(candidate)
    if target.is_dir():
        ctx.log(f"{candidate.spec}: model folder already built, reused")
        return target
    prefix = candidate.prefix
    source = ensure_built(prefix, ctx) if prefix is not None else ctx.parent
    folds = ctx.folds if prefix is None else None
    ctx.log(f"{candidate.spec}: building from {source}")
    build_step(candidate.steps[-1], source, target, folds, ctx)
    return target


def build_step(step: Step, source: Path, output: Path, folds: list[str] | None, ctx: BuildContext) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if step.method == "tucker":
        from nnunet_compress.tucker.ranks import RankPolicy
        from nnunet_compress.workflows.tucker import compress_model_folder

        field = {"ratio": "ratio", "latency": "target_latency", "flops": "target_flops",
                 "params": "target_params"}[step.key]
        policy = RankPolicy(**{field: step.value})
        compress_model_folder(source, output, policy, folds, ctx.configuration, False, ctx.checkpoint, ctx.log,
                              images=ctx.images if policy.is_budget else None)
    elif step.method in ("l1", "taylor"):
        from nnunet_compress.pruning.taylor import TaylorSettings
        from nnunet_compress.workflows.prune import prune_model_folder

        settings = TaylorSettings(**{f"target_{step.key}": step.value})
        prune_model_folder(source, output, step.method, settings, ctx.images, folds, ctx.configuration, False,
                           ctx.checkpoint, progress=ctx.log)
    elif step.method == FINE_TUNE:
        from nnunet_compress.auto.fine_tune import fine_tune_model_folder

        if ctx.fine_tune is None:
            raise RuntimeError("a fine-tuning candidate without --fine-tune-epochs settings")
        settings = dataclasses.replace(ctx.fine_tune, epochs=int(step.value))
        fine_tune_model_folder(source, output, ctx.configuration, ctx.checkpoint, settings, ctx.log)
    else:
        from nnunet_compress.workflows.quantize import QuantizeSettings, quantize_model_folder

        settings = QuantizeSettings(calibration_images=ctx.images, validation_labels=ctx.labels,
                                    subset_size=ctx.int8_subset_size, validation_patches=ctx.int8_validation_patches,
                                    max_dice_drop=ctx.max_dice_drop)
        quantize_model_folder(source, output, settings, folds, ctx.configuration, False, ctx.checkpoint, ctx.log)
