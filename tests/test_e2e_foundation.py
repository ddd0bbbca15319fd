"""End-to-end: nnU-Net's real CLI finds our trainers, trains the tiny base model and the CLI profiles it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from nnunet_compress.nnunet.env import trainers_path

pytestmark = pytest.mark.e2e


def test_trainers_path_is_the_top_level_trainers_folder():
    out = run_cli("trainers-path", check=True).stdout.strip()
    assert Path(out) == Path(trainers_path())
    assert (Path(out) / "nnUNetTrainerTucker.py").is_file()
    assert (Path(out) / "nnUNetTrainerSauron.py").is_file()


def test_nnunet_finds_our_trainers_through_extTrainer():
    """nnU-Net's own lookup (used by nnUNetv2_train and the predictor) resolves our trainer names."""
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "print(f('nnUNetTrainerTucker').__name__, f('nnUNetTrainerTaylorPruning').__name__, "
            "f('nnUNetTrainerSauron').__name__)")
    env = {**os.environ, "nnUNet_extTrainer": trainers_path()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "nnUNetTrainerTucker nnUNetTrainerTaylorPruning nnUNetTrainerSauron"


def test_tiny_training_reaches_dice(tiny_ws, tiny_base, tiny_base_dice):
    """nnUNetv2_train -tr nnUNetTrainerScheduled (found via nnUNet_extTrainer) trains the tiny base model."""
    assert (tiny_base / "fold_0" / "checkpoint_final.pth").is_file()
    debug = json.loads((tiny_base / "fold_0" / "debug.json").read_text())
    assert debug["device"] == "cpu"
    assert tiny_base_dice["mean_foreground"] >= 0.8, tiny_base_dice


def test_profile_cli_on_model_folder(tiny_base, tmp_path):
    out_json = tmp_path / "profile.json"
    proc = run_cli("profile", tiny_base, "--runs", "2", "--warmup", "1", "--json", out_json, check=True)
    figures = json.loads(out_json.read_text())
    assert figures["configuration"] == "3d_fullres"
    assert figures["patch_size"] == [32, 48, 48]
    # features 8-16-32-64, 3x3x3 convs, 2 per stage, 3 classes + background: parameter count from the layers
    assert figures["params"] == sum(layer["params"] for layer in figures["layers"])
    assert "parameters" in proc.stdout and "latency" in proc.stdout


def test_profile_cli_errors(tiny_base, tmp_path):
    proc = run_cli("profile", tmp_path)
    assert proc.returncode == 2 and "plans.json is missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("profile", tiny_base, "-c", "4d_fullres")
    assert proc.returncode == 2 and "configuration '4d_fullres' does not exist" in proc.stderr
    # 2d exists in the plans, but this model was trained as 3d_fullres
    proc = run_cli("profile", tiny_base, "-c", "2d")
    assert proc.returncode == 2 and "trained with configuration '3d_fullres', not '2d'" in proc.stderr, proc.stderr


def test_missing_nnunet_env_vars_are_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    proc = run_cli("plan", "tucker", "-d", "501", "-c", "3d_fullres", "--rank-ratio", "0.5", env=env)
    assert proc.returncode == 2 and "nnUNet_preprocessed not set" in proc.stderr, proc.stderr
    assert "export nnUNet_preprocessed=" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_data_cli_writes_a_dataset(tmp_path):
    proc = run_cli("demo-data", "-d", "77", "-o", tmp_path, "--num-train", "5", "--num-test", "1", check=True)
    assert run_cli("demo-data", "-d", "78", "-o", tmp_path, "--num-train", "2").returncode == 2
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and (folder / "dataset.json").is_file()
    assert len(list((folder / "imagesTr").glob("*_0000.nii.gz"))) == 5
    assert len(list((folder / "labelsTs").glob("*.nii.gz"))) == 1
