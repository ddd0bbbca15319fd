"""Predict a folder of images with a model folder through nnU-Net's own predictor, reusing finished predictions.

Comparing models on a test set means predicting every case with every model; on CT-sized data that is the
expensive part, and a comparison is often re-run (another tolerance, another correction, one more model). So each
model's predictions are kept under ``<report>/predictions/<model>/`` with a stamp that records what made them
(model folder, folds, checkpoint files' size and modification time, test-time augmentation). A later run reuses
them only if the stamp still matches and every case has its file; otherwise it predicts again. Predictions are
written to a temporary sibling and renamed into place, so an interrupted run never leaves a folder that looks
complete.

Prediction runs ``nnUNetv2_predict_from_modelfolder`` in a subprocess, exactly as a user would, with our trainers
on ``nnUNet_extTrainer`` so compressed and pruned model folders load.
"""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.env import nnunet_subprocess_env, run_nnunet
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, ModelFolder, atomic_output_folder

STAMP = "nnunet_compress_prediction.json"


def prediction_stamp(folder: ModelFolder, checkpoint_name: str, disable_tta: bool, images: Path) -> dict:
    """What identifies a set of predictions: same stamp, same predictions (up to floating-point noise)."""
    checkpoints = {}
    for fold, path in sorted(folder.folds.items()):
        st = path.stat()
        checkpoints[fold] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"model_folder": str(folder.path.resolve()), "folds": sorted(folder.folds), "checkpoint": checkpoint_name,
            "checkpoints": checkpoints, "disable_tta": bool(disable_tta), "images": str(Path(images).resolve())}


def reusable(output: Path, stamp: dict, case_ids: list[str], file_ending: str) -> bool:
    stamp_file = output / STAMP
    if not stamp_file.is_file():
        return False
    try:
        old = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return old == stamp and all((output / f"{case}{file_ending}").is_file() for case in case_ids)


def predict_cases(folder: ModelFolder, images: Path, output: Path, case_ids: list[str], file_ending: str,
                  checkpoint_name: str = CHECKPOINT_FINAL, device: str = "cpu", disable_tta: bool = False,
                  num_processes: int = 2, log_file: Path | None = None) -> bool:
    """Make sure `output` holds this model's prediction of every case; returns True if it had to predict."""
    stamp = prediction_stamp(folder, checkpoint_name, disable_tta, images)
    if reusable(output, stamp, case_ids, file_ending):
        return False
    args = ["nnUNetv2_predict_from_modelfolder", "-i", str(images), "-m", str(folder.path), "-f", *sorted(folder.folds),
            "-chk", checkpoint_name, "-device", device, "-npp", str(num_processes), "-nps", str(num_processes),
            "--disable_progress_bar"]
    if disable_tta:
        args.append("--disable_tta")
    with atomic_output_folder(output, overwrite=True) as tmp:
        tmp.chmod(0o755)
        run_nnunet([*args, "-o", str(tmp)], nnunet_subprocess_env(), log_file)
        missing = [c for c in case_ids if not (tmp / f"{c}{file_ending}").is_file()]
        if missing:
            raise CompressError(f"nnU-Net wrote no prediction for case(s) {', '.join(missing[:5])} with "
                                f"{folder.path}; see {log_file}")
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
    return True
