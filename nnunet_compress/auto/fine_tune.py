"""The fine-tuning step of ``nnunet-compress auto`` (``--fine-tune-epochs E``): which candidates to fine-tune, and
how one compressed model folder is fine-tuned through nnU-Net's own training.

Which: the cheap search grades every candidate without training; the ones worth training are those faster than the
best candidate within the budget (or all, where none is) whose Dice missed the budget by the least — fine-tuning
recovers Dice, never speed, so a candidate slower than the current winner cannot win after it. ``--fine-tune-count``
of them, distinct f32 networks first (an INT8 candidate is fine-tuned as its f32 network, then quantised again).

How: the candidate's model folder already describes its compressed network in its own ``plans.json`` (channel
counts and Tucker ranks of a Tucker, pruned or pruned-then-Tucker chain), so ``nnUNetv2_train -tr
nnUNetTrainerFineTune -p <those plans> -pretrained_weights <its checkpoint>`` trains exactly that network on the
labelled training split of the model's fold — the fold's validation cases, from which auto's choosing and held-out
cases come, are never trained on. From ``--images`` the training data are the fine-tuning part of those images
(nnunet_compress.auto.fine_tune_data): with ``--labels``, trained on their labels; without, distilled from the
parent (``alpha`` 1: the student learns the parent's soft predictions, each fold from the parent's same fold, and
the parent's segmentations only steer nnU-Net's foreground sampling). Training runs against a private
``nnUNet_preprocessed`` (links to the dataset's preprocessed files plus the fine-tuning plans) and a private
``nnUNet_results`` in the work area, so the user's nnU-Net folders gain nothing; the trained folder is renamed into
place once every fold is done (a killed run leaves no model folder, and ``--resume`` trains again from the start of
that step).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunet_compress.distillation.loss import DistillationSettings
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.env import nnunet_subprocess_env, require_env, run_nnunet
from nnunet_compress.nnunet.model_folder import open_model_folder, read_json, write_json
from nnunet_compress.nnunet.plans import SECTION

TRAINER = "nnUNetTrainerFineTune"
PLANS_FILE = "fine_tune_plans.json"


def plans_file_name(fold: str | None = None) -> str:
    """The plans a fine-tune trained with: one file, or one per fold where each fold distils from its own teacher."""
    return PLANS_FILE if fold is None else f"fine_tune_plans_fold_{fold}.json"


@dataclass
class FineTuneSettings:
    """What every fine-tune of one search shares: the labelled nnU-Net dataset, the schedule and where the
    training's output goes."""

    dataset: str                  # nnU-Net dataset name (DatasetXXX_Name) the parent was trained on
    epochs: int
    iterations_per_epoch: int
    learning_rate: float
    parent_schedule: dict         # the parent plans' own schedule entries (augmentation, seed) kept for the fine-tune
    device: str = "cpu"           # nnUNetv2_train -device: cuda where this machine has it (training is the slow part)
    preprocessed: Path | None = None    # nnUNet_preprocessed root holding `dataset`; None: the user's
    teachers: dict[str, str] | None = None  # fold -> parent checkpoint: distil from it (label-free fine-tuning)

    @property
    def val_iterations(self) -> int:
        return max(1, self.iterations_per_epoch // 5)  # nnU-Net's own ratio: 50 validation per 250 training

    def schedule(self) -> dict:
        return {**{k: v for k, v in self.parent_schedule.items() if k in ("augmentation", "seed", "weight_decay")},
                "num_epochs": self.epochs, "num_iterations_per_epoch": self.iterations_per_epoch,
                "num_val_iterations_per_epoch": self.val_iterations, "initial_lr": self.learning_rate}


def check_fine_tune_options(epochs: int | None, count: int, iterations: int, fraction: float) -> None:
    """Refuse before anything runs."""
    if epochs is None:
        return
    if epochs < 1:
        raise CompressError(f"--fine-tune-epochs {epochs} must be at least 1")
    if count < 1:
        raise CompressError(f"--fine-tune-count {count} must be at least 1")
    if iterations < 1:
        raise CompressError(f"--fine-tune-iterations {iterations} must be at least 1")
    if not 0 < fraction < 1:
        raise CompressError(f"--fine-tune-fraction {fraction} is outside (0, 1); e.g. 0.5 of the --images cases")


def frontier(rows: list, parent_dice: float, budget: float, count: int, speedup, f32_of) -> list:
    """The graded rows worth fine-tuning: faster than the best row within the budget, the smallest Dice misses
    first, at most `count`, distinct f32 networks preferred (an f32 row and its INT8 row share one training)."""
    graded = [r for r in rows if r.status == "graded" and r.dice is not None and speedup(r) is not None]
    within = [r for r in graded if parent_dice - r.dice <= budget + 1e-9]
    floor = max((speedup(r) for r in within), default=0.0)
    missed = sorted((r for r in graded if speedup(r) > floor and parent_dice - r.dice > budget + 1e-9),
                    key=lambda r: (parent_dice - r.dice, -speedup(r)))
    chosen, networks = [], set()
    for r in missed:                          # one per f32 network first ...
        if len(chosen) < count and f32_of(r) not in networks:
            chosen.append(r)
            networks.add(f32_of(r))
    for r in missed:                          # ... then the rest, which reuse a network already fine-tuned
        if len(chosen) < count and r not in chosen:
            chosen.append(r)
    return chosen


def fine_tune_plans(source: Path, configuration: str, settings: FineTuneSettings, plans_name: str,
                    fold: str | None = None) -> dict:
    """The source model folder's plans, renamed, for the training dataset, with the fine-tuning schedule (and, to
    distil, fold `fold`'s teacher) in their compression section."""
    plans = read_json(source / "plans.json")
    plans["plans_name"] = plans_name
    plans["dataset_name"] = settings.dataset
    cfg = plans["configurations"][configuration]
    cfg[SECTION] = {**cfg.get(SECTION, {}), "schedule": settings.schedule(), "fine_tuned_from": str(source)}
    cfg[SECTION].pop("distillation", None)
    if settings.teachers is not None and fold is not None:
        cfg[SECTION]["distillation"] = DistillationSettings(alpha=1.0, teacher=settings.teachers[fold]).to_dict()
    return plans


def plans_name_of(source_plans: dict, candidate_name: str) -> str:
    return f"{source_plans['plans_name']}_auto_{candidate_name}"


def shadow_preprocessed(root: Path, settings: FineTuneSettings, plans: dict) -> Path:
    """A private nnUNet_preprocessed whose dataset folder links every entry of the real one and adds `plans`."""
    dataset = settings.dataset
    real = (settings.preprocessed or require_env("nnUNet_preprocessed")["nnUNet_preprocessed"]) / dataset
    if not real.is_dir():
        raise CompressError(f"{real} does not exist; fine-tuning trains on the preprocessed dataset: run "
                            f"nnUNetv2_plan_and_preprocess for it first")
    folder = root / dataset
    folder.mkdir(parents=True)
    for entry in real.iterdir():
        (folder / entry.name).symlink_to(entry.resolve())
    write_json(folder / f"{plans['plans_name']}.json", plans)
    return root


def fine_tune_model_folder(source: Path, output: Path, configuration: str, checkpoint: str,
                           settings: FineTuneSettings, log) -> None:
    """Fine-tune every fold of the compressed model folder `source` into the new model folder `output`."""
    folder = open_model_folder(source, None, checkpoint)
    plans = fine_tune_plans(source, configuration, settings, plans_name_of(folder.plans, output.parent.name))
    scratch = output.parent / "fine_tune_run"
    if scratch.exists():  # a killed earlier run: its partial training is discarded, the step starts again
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    if settings.teachers is None:  # otherwise one plans file per fold, written below
        write_json(output.parent / PLANS_FILE, plans)
    env = nnunet_subprocess_env(nnUNet_preprocessed=shadow_preprocessed(scratch / "preprocessed", settings, plans),
                                nnUNet_results=scratch / "results")
    for fold in sorted(folder.folds):
        if settings.teachers is not None:  # each fold distils from the parent's same fold
            fold_plans = fine_tune_plans(source, configuration, settings, plans["plans_name"], fold)
            write_json(scratch / "preprocessed" / settings.dataset / f"{plans['plans_name']}.json", fold_plans)
            write_json(output.parent / plans_file_name(fold), fold_plans)
        log(f"fine-tuning fold {fold} of {source} ({settings.epochs} epoch(s) x {settings.iterations_per_epoch} "
            f"iterations)")
        log_file = output.parent / "logs" / f"fine_tune_fold_{fold}.log"
        try:
            run_nnunet(train_command(settings.dataset, configuration, fold, plans["plans_name"], folder.folds[fold],
                                     settings.device), env, log_file)
        except CompressError as e:  # the first line of nnU-Net's output is a warning; its last one says why
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise CompressError(f"nnUNetv2_train of fold {fold} failed: {last} (full output: {log_file})") from None
    trained = scratch / "results" / settings.dataset / f"{TRAINER}__{plans['plans_name']}__{configuration}"
    if not trained.is_dir():
        raise CompressError(f"nnUNetv2_train wrote no model folder at {trained}")
    trained.rename(output)  # same file system: the model folder appears whole or not at all
    shutil.rmtree(scratch)


def train_command(dataset: str, configuration: str, fold: str, plans_name: str, pretrained: Path,
                  device: str) -> list[str]:
    return ["nnUNetv2_train", dataset, configuration, fold, "-p", plans_name, "-tr", TRAINER, "-device", device,
            "-pretrained_weights", str(pretrained)]


def rebuild_commands(source: str, output: str, dataset: str, configuration: str, folds: list[str],
                     plans_folder: str, plans_name: str, checkpoint: str, device: str,
                     per_fold_plans: bool = False, setup: list[str] | None = None) -> list[str]:
    """What a user runs to fine-tune `source` by hand as auto did (`setup`: the commands that make the training
    dataset first, where it is not the model's own)."""
    import shlex

    def copy_plans(fold: str | None) -> str:
        plans_file = str(Path(plans_folder) / plans_file_name(fold))
        return f"cp {shlex.quote(plans_file)} \"$nnUNet_preprocessed\"/{dataset}/{plans_name}.json"

    out = list(setup or []) + ([] if per_fold_plans else [copy_plans(None)])
    for fold in folds:
        if per_fold_plans:
            out.append(copy_plans(fold))
        out.append(shlex.join(train_command(dataset, configuration, fold, plans_name,
                                            Path(source) / f"fold_{fold}" / checkpoint, device)))
    out.append(f"cp -r \"$nnUNet_results\"/{dataset}/{TRAINER}__{plans_name}__{configuration} {shlex.quote(output)}")
    return out
