"""A tiny but real nnU-Net pipeline on synthetic CT: the base model the demo and the end-to-end tests compress.

Everything goes through nnU-Net's own CLI — ``nnUNetv2_plan_and_preprocess`` (its fingerprint, planner and
preprocessing), ``nnUNetv2_train`` and ``nnUNetv2_predict`` — so what we test is what users run. Only the plans are
shrunk (narrow features, four stages, a small patch) and the schedule shortened, so that training reaches a
useful Dice on two CPU cores in a few minutes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.env import nnunet_subprocess_env, run_nnunet
from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, read_json, write_json
from nnunet_compress.nnunet.synthetic import write_synthetic_dataset, write_unlabelled_images

TINY_PLANS = "nnUNetPlans_tiny"
CONFIGURATION = "3d_fullres"
BASE_TRAINER = "nnUNetTrainerScheduled"


@dataclass
class TinyWorkspace:
    """nnU-Net's three folders under one root, and the environment that points nnU-Net at them."""

    root: Path
    dataset_id: int
    dataset_name: str = "SyntheticCT"

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    @property
    def dataset_folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset_folder_name

    def env(self) -> dict[str, str]:
        env = nnunet_subprocess_env(nnUNet_raw=self.raw, nnUNet_preprocessed=self.preprocessed,
                                    nnUNet_results=self.results)
        # two cores: one data-augmentation worker beside the training process keeps both busy
        env.setdefault("nnUNet_n_proc_DA", "1")
        env.setdefault("nnUNet_def_n_proc", "2")
        return env

    def model_folder(self, trainer: str = BASE_TRAINER, plans: str = TINY_PLANS,
                     configuration: str = CONFIGURATION) -> Path:
        return self.results / self.dataset_folder_name / f"{trainer}__{plans}__{configuration}"

    def plans_path(self, plans: str) -> Path:
        return self.preprocessed / self.dataset_folder_name / f"{plans}.json"


def tiny_plans(parent: dict, num_epochs: int, iterations_per_epoch: int, features: tuple[int, ...] = (8, 16, 32, 64),
               patch_size: tuple[int, int, int] = (32, 48, 48), batch_size: int = 2,
               training_seed: int = 0) -> dict:
    """nnU-Net's 3d_fullres plans with a small U-Net (3×3×3 kernels, stride 2) and a short schedule."""
    plans = copy.deepcopy(parent)
    plans["plans_name"] = TINY_PLANS
    cfg = plans["configurations"][CONFIGURATION]
    n = len(features)
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n,
        "features_per_stage": list(features),
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
    })
    cfg["patch_size"] = list(patch_size)
    cfg["batch_size"] = batch_size
    cfg["nnunet_compress"] = {"schedule": {"num_epochs": num_epochs, "num_iterations_per_epoch": iterations_per_epoch,
                                           "num_val_iterations_per_epoch": 4, "initial_lr": 1e-2,
                                           "augmentation": "none",
                                           "seed": TRAINING_SEED + training_seed}}
    return plans


# Epochs of the tiny base model (25 iterations each). The small lesion class is the last one the tiny network
# learns; 50 epochs (1,250 iterations, about 2 CPU-minutes more than the 35 that usually suffice) give it enough
# updates that a base model with that class at Dice 0 is not a risk every compressed model inherits.
BASE_EPOCHS = 50

# Seed of every training run on the tiny plans (see ScheduleFromPlansMixin.initialize). Seeded, a run repeats
# exactly, so tests and the demo grade the same base model every time; unseeded, a run can now and then miss the
# lesion class, and this seed learns every class.
TRAINING_SEED = 0


def prepare_dataset(ws: TinyWorkspace, num_train: int = 12, num_test: int = 4, seed: int = 0,
                    num_epochs: int = BASE_EPOCHS, iterations_per_epoch: int = 25) -> Path:
    """Synthetic raw data -> nnU-Net planning and preprocessing -> tiny plans. Returns the tiny plans file.

    `seed` draws the synthetic cases and offsets the base training's seed (``TRAINING_SEED + seed``), so seed 0 is
    the tested default and other seeds give independent repeats of the whole pipeline (benchmarks/stability.py).
    """
    if not ws.raw_dataset.exists():
        write_synthetic_dataset(str(ws.raw), ws.dataset_id, name=ws.dataset_name, num_train=num_train,
                                num_test=num_test, seed=seed)
    parent_path = ws.plans_path("nnUNetPlans")
    if not parent_path.exists():
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(ws.dataset_id), "-c", CONFIGURATION,
                    "--verify_dataset_integrity", "-np", "2"], ws.env(), ws.root / "logs" / "plan_and_preprocess.log")
    plans = tiny_plans(read_json(parent_path), num_epochs, iterations_per_epoch, training_seed=seed)
    path = ws.plans_path(TINY_PLANS)
    if not path.is_file() or read_json(path) != plans:  # unchanged plans are not rewritten under a running trainer
        write_json(path, plans)
    return path


def train(ws: TinyWorkspace, plans: str = TINY_PLANS, trainer: str = BASE_TRAINER, fold: str = "0",
          pretrained: Path | None = None, extra: list[str] = (), log_name: str | None = None) -> Path:
    """``nnUNetv2_train`` on the CPU; returns the model folder."""
    args = ["nnUNetv2_train", str(ws.dataset_id), CONFIGURATION, fold, "-p", plans, "-tr", trainer, "-device", "cpu"]
    if pretrained is not None:
        args += ["-pretrained_weights", str(pretrained)]
    args += list(extra)
    env = ws.env()
    # data loading in the training process: nnU-Net's augmentation workers draw unseeded, so the plans' seed
    # (TRAINING_SEED) makes a run repeat exactly only without them
    env["nnUNet_n_proc_DA"] = "0"
    run_nnunet(args, env, ws.root / "logs" / f"{log_name or trainer + '_' + plans}_train.log")
    return ws.model_folder(trainer, plans)


def label_unlabelled_cases(ws: TinyWorkspace, parent_folder: Path, images: Path, dataset_id: int, name: str,
                           seed: int, indices, tta: bool = False) -> TinyWorkspace:
    """Label-free data for distillation: unlabelled synthetic scans, labelled by `parent_folder`, preprocessed.

    Writes the images of cases `indices` (none of the labelled dataset's), runs ``nnunet-compress pseudo-dataset``
    and ``nnUNetv2_preprocess`` with the tiny plans; returns the new dataset's workspace (same root). `tta`: the
    parent predicts with nnU-Net's test-time mirroring (slower, the labels a user would get by default).
    """
    pseudo = TinyWorkspace(ws.root, dataset_id, name)
    write_unlabelled_images(images, seed=seed, indices=indices)
    argv = ["pseudo-dataset", str(parent_folder), "-i", str(images), "-d", str(dataset_id), "-n", name,
            "--num-processes", "1", "--overwrite"] + ([] if tta else ["--disable-tta"])
    run_compress(argv, pseudo.env())
    run_nnunet(["nnUNetv2_preprocess", "-d", str(dataset_id), "-c", CONFIGURATION, "-plans_name", TINY_PLANS,
                "-np", "1"], pseudo.env(), ws.root / "logs" / f"preprocess_{name}.log")
    return pseudo


def run_compress(argv: list[str], env: dict[str, str] | None = None) -> None:
    """``nnunet-compress ARGV`` in its own process, as a user runs it (its output goes to this console).

    Why a subprocess: the demo and the tiny pipeline sit below the command line in the package's layers, so they
    drive it the way they drive nnU-Net's commands, from outside.
    """
    proc = subprocess.run([sys.executable, "-m", "nnunet_compress.cli", *map(str, argv)], env=env)
    if proc.returncode != 0:
        raise CompressError(f"nnunet-compress {' '.join(map(str, argv))} failed (exit code {proc.returncode})")


def predict_folder(ws: TinyWorkspace, model_folder: Path, output: Path, fold: str = "0",
                   input_folder: Path | None = None) -> Path:
    """``nnUNetv2_predict_from_modelfolder`` on the held-out images; returns the output folder."""
    input_folder = input_folder or ws.raw_dataset / "imagesTs"
    run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(input_folder), "-o", str(output), "-m",
                str(model_folder), "-f", fold, "-device", "cpu", "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1"],
               ws.env(), ws.root / "logs" / f"predict_{output.name}.log")
    return output


def predict_dataset(ws: TinyWorkspace, trainer: str, plans: str, output: Path, fold: str = "0") -> Path:
    """``nnUNetv2_predict -d -c -f -tr -p`` on the held-out images: the model found by names, as users call it."""
    run_nnunet(["nnUNetv2_predict", "-i", str(ws.raw_dataset / "imagesTs"), "-o", str(output), "-d",
                str(ws.dataset_id), "-c", CONFIGURATION, "-f", fold, "-tr", trainer, "-p", plans, "-device", "cpu",
                "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1"],
               ws.env(), ws.root / "logs" / f"predict_{output.name}.log")
    return output


def dice_scores(ws: TinyWorkspace, prediction_folder: Path, reference_folder: Path | None = None) -> dict:
    """Per-class and mean foreground Dice of predictions against labelsTs (or `reference_folder`), by nnU-Net's own
    compute_metrics."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    dataset_json = read_json(ws.raw_dataset / "dataset.json")
    labels = sorted(v for v in dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    reference_folder = reference_folder or ws.raw_dataset / "labelsTs"
    result = compute_metrics_on_folder(str(reference_folder), str(prediction_folder),
                                       str(prediction_folder / "summary.json"), SimpleITKIO(),
                                       dataset_json["file_ending"], labels, None, 1)
    per_class = {int(k): float(v["Dice"]) for k, v in result["mean"].items()}
    return {"per_class": per_class, "mean_foreground": float(result["foreground_mean"]["Dice"])}


def checkpoint_path(model_folder: Path, fold: str = "0") -> Path:
    return model_folder / f"fold_{fold}" / CHECKPOINT_FINAL


def default_workspace(root: str | os.PathLike, dataset_id: int = 501) -> TinyWorkspace:
    return TinyWorkspace(Path(root).resolve(), dataset_id)
