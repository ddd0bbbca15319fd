"""``nnunet-compress pseudo-dataset`` refuses bad input before it writes anything (the labelling itself runs in
tests/test_e2e_distillation.py): one ``error:`` line naming the problem and the fix, exit code 2, no folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from nnunet_compress.errors import CompressError
from nnunet_compress.workflows.pseudo_dataset import image_cases


@pytest.fixture
def setup(tmp_path):
    """A parent model folder (its checkpoint is never read by these checks) and nnU-Net's folders."""
    parent = tmp_path / "results" / "Dataset501_Parent" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (parent / "fold_0").mkdir(parents=True)
    (parent / "fold_0" / "checkpoint_final.pth").write_bytes(b"never read here")
    (parent / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "dataset_name": "Dataset501_Parent",
                                                   "configurations": {"3d_fullres": {}}}))
    (parent / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                     "file_ending": ".nii.gz", "numTraining": 1}))
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results")}
    for var in ("raw", "preprocessed"):
        (tmp_path / var).mkdir()
    return tmp_path, parent, env


def images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")
    return folder


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("files, extra, message", [
    ([], [], "is empty"),
    (["a_0000.nrrd"], [], "cannot read: a_0000.nrrd"),
    (["a_0000.nii.gz", "a_0001.nii.gz"], [], "case a in .* has channel 0001, but the parent model takes 1 channel"),
    (["a.nii.gz"], [], "not in nnU-Net's naming"),
    (["a_0000.nii.gz"], ["-d", "1000"], "outside 1..999"),
    (["a_0000.nii.gz"], ["-d", "501", "-n", "Parent"], "the dataset the parent model was trained on"),
    (["a_0000.nii.gz"], ["-n", "bad name"], "may only hold letters"),
])
def test_bad_input_is_refused_and_nothing_written(setup, files, extra, message):
    root, parent, env = setup
    folder = images(root / "images", *files)
    before = tree(root)
    args = ["-d", "502", *extra] if "-d" not in extra else extra
    proc = run_cli("pseudo-dataset", parent, "-i", folder, *args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    import re
    assert re.search(message, lines[0]), lines[0]
    assert tree(root) == before


def test_missing_images_folder_and_missing_channel(setup, tmp_path):
    root, parent, env = setup
    proc = run_cli("pseudo-dataset", parent, "-i", root / "nowhere", "-d", "502", env=env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    with pytest.raises(CompressError, match="case a .* lacks channel 0001"):
        image_cases(images(tmp_path / "two", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"), ".nii.gz",
                    {"0": "T1", "1": "T2"})
    assert image_cases(images(tmp_path / "ok", "b_0001.nii.gz", "b_0000.nii.gz", ".hidden"), ".nii.gz",
                       {"0": "T1", "1": "T2"}) == ["b"]


def test_existing_dataset_id_is_refused_without_overwrite(setup):
    root, parent, env = setup
    folder = images(root / "images", "a_0000.nii.gz")
    (root / "raw" / "Dataset502_Other").mkdir()
    proc = run_cli("pseudo-dataset", parent, "-i", folder, "-d", "502", "-n", "Mine", "--overwrite", env=env)
    assert proc.returncode == 2 and "taken by" in proc.stderr and "Dataset502_Other" in proc.stderr, proc.stderr
    (root / "preprocessed" / "Dataset503_Mine").mkdir()
    proc = run_cli("pseudo-dataset", parent, "-i", folder, "-d", "503", "-n", "Mine", env=env)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr, proc.stderr
    assert not (root / "raw" / "Dataset503_Mine").exists()


def test_missing_environment_is_named(setup):
    root, parent, env = setup
    env = {k: v for k, v in env.items() if k != "nnUNet_preprocessed"}
    proc = run_cli("pseudo-dataset", parent, "-i", images(root / "images", "a_0000.nii.gz"), "-d", "502", env=env)
    assert proc.returncode == 2 and "nnUNet_preprocessed" in proc.stderr


def test_given_labels_are_taken_and_nothing_is_predicted(setup):
    """--labels: the dataset holds the user's label files as they are (the parent's checkpoint, a stand-in here,
    is never run) and the parent's plans renamed to the new dataset."""
    root, parent, env = setup
    folder = images(root / "images", "a_0000.nii.gz", "b_0000.nii.gz")
    labels = root / "labels"
    labels.mkdir()
    for case in ("a", "b"):
        (labels / f"{case}.nii.gz").write_bytes(f"label of {case}".encode())
    proc = run_cli("pseudo-dataset", parent, "-i", folder, "--labels", labels, "-d", "502", "-n", "Mine", env=env)
    assert proc.returncode == 0, proc.stderr
    raw = root / "raw" / "Dataset502_Mine"
    assert {f.name: f.read_bytes() for f in (raw / "labelsTr").iterdir()} == \
        {"a.nii.gz": b"label of a", "b.nii.gz": b"label of b"}
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["nnunet_compress_pseudo_labels"]["labels"] == str(labels.resolve())
    plans = json.loads((root / "preprocessed" / "Dataset502_Mine" / "nnUNetPlans.json").read_text())
    assert plans["dataset_name"] == "Dataset502_Mine"


def test_a_missing_given_label_is_refused_before_anything_is_written(setup):
    root, parent, env = setup
    folder = images(root / "images", "a_0000.nii.gz", "b_0000.nii.gz")
    labels = images(root / "labels", "a.nii.gz")
    before = tree(root)
    proc = run_cli("pseudo-dataset", parent, "-i", folder, "--labels", labels, "-d", "502", env=env)
    assert proc.returncode == 2 and "the labels do not match the images" in proc.stderr \
        and "has no b.nii.gz" in proc.stderr, proc.stderr
    assert tree(root) == before
