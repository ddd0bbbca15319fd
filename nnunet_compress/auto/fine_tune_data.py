"""The training data of ``nnunet-compress auto --fine-tune-epochs`` when the quality data are ``--images``.

With ``--dataset`` the model's own preprocessed training split is trained on. With ``--images`` there is none, so
the fine-tuning part of the images (split off before the choosing and held-out parts, see
nnunet_compress.auto.quality_data) becomes an nnU-Net dataset of its own, in a private ``nnUNet_raw`` /
``nnUNet_preprocessed`` of the work area so that the user's nnU-Net folders gain nothing:

1. ``pseudo-dataset``'s workflow writes it with the parent's plans: labels are the user's (``--labels``) or the
   parent's own predictions (label-free; the fine-tune then distils from the parent);
2. ``nnUNetv2_preprocess`` preprocesses it exactly as the parent's training data were (the plans carry the
   intensity statistics);
3. ``splits_final.json`` puts every case in the training part of each of the parent's folds: the cases auto chooses
   and grades on are elsewhere, and a fold's own validation (nnU-Net's pseudo Dice) only needs to run.

A ``ready.json`` written last marks the dataset complete; a killed preparation is started again by ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nnunet_compress.auto.quality_data import CaseSet
from nnunet_compress.nnunet.env import nnunet_subprocess_env, run_nnunet
from nnunet_compress.nnunet.model_folder import ModelFolder, atomic_write_file

DATASET_ID = 999   # any id: the private folders hold this one dataset only
NAME = "AutoFineTune"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
READY = "ready.json"


@dataclass
class FineTuneData:
    """Where the training dataset of an ``--images`` fine-tune lives and how it is trained."""

    root: Path          # the work area's fine_tune_data/
    distil: bool        # no labels: the parent's predictions are the labels and the fine-tune distils

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    def setup_commands(self, parent: Path, train: CaseSet, configuration: str, checkpoint: str, plans_name: str,
                       folds: list[str]) -> list[str]:
        """What a user runs to make the same dataset by hand."""
        import shlex

        make = ["nnunet-compress", "pseudo-dataset", str(parent), "-i", str(train.images), "-d", str(DATASET_ID),
                "-n", NAME, "-f", *folds, "--checkpoint", checkpoint]
        if not self.distil:
            make += ["--labels", str(train.labels)]
        return [f"export nnUNet_raw={shlex.quote(str(self.raw))} "
                f"nnUNet_preprocessed={shlex.quote(str(self.preprocessed))}",
                shlex.join(make), shlex.join(preprocess_command(plans_name, configuration)),
                f"cp {shlex.quote(str(self.root / 'splits_final.json'))} \"$nnUNet_preprocessed\"/{DATASET}/"]


def preprocess_command(plans_name: str, configuration: str) -> list[str]:
    return ["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", plans_name, "-c", configuration, "-np", "2"]


def training_splits(cases: list[str], folds: list[str]) -> list[dict]:
    """nnU-Net's splits_final.json with every case trained on in each numbered fold of the parent."""
    numbered = [int(f) for f in folds if f != "all"]
    return [{"train": list(cases), "val": list(cases)} for _ in range(max(numbered, default=-1) + 1)]


@contextmanager
def nnunet_folders(**folders: Path):
    """nnU-Net's folder variables set to `folders` for the block (the workflow reads them from the environment)."""
    old = {k: os.environ.get(k) for k in folders}
    os.environ.update({k: str(v) for k, v in folders.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_fine_tune_data(data: FineTuneData, parent: ModelFolder, train: CaseSet, configuration: str,
                           checkpoint: str, log: Callable[[str], None]) -> None:
    """The preprocessed training dataset under `data.root`, made once (see the module docstring)."""
    from nnunet_compress.workflows.pseudo_dataset import PseudoDatasetRequest, write_pseudo_dataset

    root = data.root
    if (root / READY).is_file():
        log(f"fine-tuning data: {DATASET} in {root} already prepared, reused")
        return
    if root.exists():  # a killed preparation: start it again
        shutil.rmtree(root)
    results = root / "results"
    for folder in (data.raw, data.preprocessed, results):
        folder.mkdir(parents=True)
    request = PseudoDatasetRequest(parent=parent.path, images=train.images, dataset_id=DATASET_ID, name=NAME,
                                   folds=sorted(parent.folds), checkpoint=checkpoint,
                                   labels=None if data.distil else train.labels)
    with nnunet_folders(nnUNet_raw=data.raw, nnUNet_preprocessed=data.preprocessed, nnUNet_results=results):
        _, prep, plans_name = write_pseudo_dataset(request, progress=log)
    env = nnunet_subprocess_env(nnUNet_raw=data.raw, nnUNet_preprocessed=data.preprocessed, nnUNet_results=results)
    log(f"fine-tuning data: nnUNetv2_preprocess of {len(train.cases)} case(s) with the parent's plans")
    run_nnunet(preprocess_command(plans_name, configuration), env, root / "preprocess.log")
    splits = training_splits(train.cases, sorted(parent.folds))
    (root / "splits_final.json").write_text(json.dumps(splits, indent=2))
    shutil.copy2(root / "splits_final.json", prep / "splits_final.json")
    atomic_write_file(root / READY, lambda tmp: tmp.write_text(json.dumps(
        {"dataset": DATASET, "cases": train.cases, "labels": "the parent's predictions" if data.distil else "given"})))
