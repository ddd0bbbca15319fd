"""Grading and timing one model of the search: nnU-Net's predictor and evaluation, and side-by-side seconds.

Dice comes from nnU-Net's own ``compute_metrics_on_folder`` on predictions made by ``nnUNetv2_predict_from_modelfolder``
(:func:`nnunet_compress.nnunet.predictions.predict_cases`, which also reuses finished predictions, so a resumed
search does not predict again). Seconds per patch come from
:func:`nnunet_compress.evaluation.profiling.side_by_side`: the candidate as the predictor runs it here, the parent
on torch and the parent on the CPU engine in f32, timed round-robin in one process so that load on a shared
machine slows all three alike. The parent on the engine in f32 is the "same engine" reference: it is what
``nnunet-compress convert`` gives for free, so INT8 counts as part of a candidate's gain, never the engine's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_compress.auto.quality_data import CaseSet
from nnunet_compress.evaluation.base_reference import BaseReference
from nnunet_compress.evaluation.profiling import ENGINE_F32, TORCH_F32, running_variant, side_by_side, speedup, variants
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, load_fold_network, open_model_folder
from nnunet_compress.nnunet.predictions import predict_cases


@dataclass
class Speed:
    """Seconds per patch of a model and of the parent beside it (None where a variant could not run)."""

    variant: str
    seconds: float | None
    parent_engine_seconds: float | None
    parent_torch_seconds: float | None

    @property
    def speedup_same_engine(self) -> float | None:
        return speedup(self.parent_engine_seconds or self.parent_torch_seconds, self.seconds)

    @property
    def speedup_torch(self) -> float | None:
        return speedup(self.parent_torch_seconds, self.seconds)

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup_same_engine": self.speedup_same_engine,
                "speedup_vs_torch": self.speedup_torch}


class ParentTimer:
    """The parent loaded once; times any model beside it."""

    def __init__(self, parent: Path, fold: str, runs: int):
        self.reference = BaseReference(parent, fold)
        self.runs = runs

    def time(self, model_folder: Path, fold: str, checkpoint: str = CHECKPOINT_FINAL) -> Speed:
        net, _, _ = load_fold_network(open_model_folder(model_folder, [fold], checkpoint), fold)
        return self.time_network(net)

    def time_network(self, net) -> Speed:
        net.eval()
        mine = running_variant(net)
        timed = {"model": variants(net)[mine], "parent torch": self.reference.variant(TORCH_F32)}
        engine = self.reference.variant(ENGINE_F32)
        if engine is not None:
            timed["parent engine"] = engine
        seconds = side_by_side(timed, self.reference.example(), runs=self.runs, warmup=1)
        return Speed(mine, seconds["model"], seconds.get("parent engine"), seconds["parent torch"])


def predict(model_folder: Path, folds: list[str], cases: CaseSet, output: Path, checkpoint: str, log: Path) -> Path:
    """Predictions of `cases` by nnU-Net's predictor (test-time mirroring off: the search compares models, and
    mirroring multiplies the time by 8 for every one of them alike)."""
    folder = open_model_folder(model_folder, folds, checkpoint)
    predict_cases(folder, cases.images, output, cases.cases, folder.dataset_json["file_ending"], checkpoint,
                  "cpu", disable_tta=True, num_processes=1, log_file=log)
    return output


def mean_foreground_dice(predictions: Path, references: Path, plans: dict, dataset_json: dict,
                         summary_file: Path) -> dict:
    """nnU-Net's evaluation of `predictions` against `references`: mean foreground Dice and Dice per class."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    reader = recursive_find_reader_writer_by_name(plans.get("image_reader_writer", "SimpleITKIO"))()
    result = compute_metrics_on_folder(str(references), str(predictions), str(summary_file), reader,
                                       dataset_json["file_ending"], keys, label_manager.ignore_label,
                                       num_processes=1, chill=True)
    per_class = {str(k): _nan_none(v["Dice"]) for k, v in result["mean"].items()}
    return {"mean_dice": _nan_none(result["foreground_mean"]["Dice"]), "dice_per_class": per_class}


def _nan_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
