"""`nnunet-compress totalseg` end to end: TotalSegmentator's own Python API runs the compressed home, offline.

TotalSegmentator's weights cannot be downloaded here, so a stand-in source home is built with TotalSegmentator's
layout, dataset names, trainers, class counts and architecture and random weights (nnunet_compress.totalseg.standin).
TotalSegmentator then runs in a subprocess on a small synthetic CT, with every network call refused and recorded,
and with nnU-Net's predictor watched to see which model folder and network class it really loads.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnunet_compress.totalseg.standin import write_offline_config, write_standin_model

pytestmark = pytest.mark.e2e

FAST_ID, FAST_TRAINER = 297, "nnUNetTrainer_4000epochs_NoMirroring"

RUNNER = r"""
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:1]))
    raise OSError("network disabled by the test")
import requests
requests.get = requests.post = requests.request = refuse
plain_connect = socket.socket.connect
def guarded_connect(self, address):  # internet sockets only: multiprocessing talks over local sockets
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse(address)
    return plain_connect(self, address)
socket.socket.connect = guarded_connect
loaded = []
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
original = nnUNetPredictor.initialize_from_trained_model_folder
def watched(self, folder, *args, **kwargs):
    out = original(self, folder, *args, **kwargs)
    loaded.append({"folder": str(folder), "network": type(self.network).__name__,
                   "params": sum(p.numel() for p in self.network.parameters())})
    return out
nnUNetPredictor.initialize_from_trained_model_folder = watched
from totalsegmentator.python_api import totalsegmentator
totalsegmentator(sys.argv[1], sys.argv[2], fast=True, device="cpu", quiet=True, nr_thr_saving=1)
from nnunet_compress.inference import openvino_engine
ran = sorted({key[2] for key in openvino_engine._compiled})  # precisions the engine compiled models for
print("RESULT" + json.dumps({"attempts": attempts, "loaded": loaded, "engine": ran}))
"""


@pytest.fixture(scope="module")
def fast_source_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ts_source") / "home"
    write_standin_model(home / "nnunet" / "results", FAST_ID, FAST_TRAINER)
    write_offline_config(home)
    return home


@pytest.fixture(scope="module")
def synthetic_ct(tmp_path_factory) -> Path:
    """A small CT-like volume (about 48 x 72 x 72 voxels at 2-3 mm x 1.2-1.6 mm), as TotalSegmentator's input."""
    from nnunet_compress.nnunet.synthetic import generate_case
    case = generate_case(seed=3, index=0)
    img = sitk.GetImageFromArray(case.image_hu.astype(np.int16))
    img.SetSpacing(tuple(float(s) for s in case.spacing[::-1]))
    path = tmp_path_factory.mktemp("ts_ct") / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def run_totalsegmentator(home: Path, ct: Path, out: Path, **environment) -> tuple[dict, float]:
    import os
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), **environment)
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ct), str(out)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), elapsed


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def tree_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.totalseg  # compresses the real 16.5 M-parameter 3 mm model and runs TotalSegmentator on the CPU
def test_compressed_home_runs_in_totalsegmentator_offline(fast_source_home, synthetic_ct, tmp_path):
    from totalsegmentator.map_to_binary import class_map
    before = tree_files(fast_source_home / "nnunet")
    compressed = tmp_path / "home_0.3"
    t0 = time.perf_counter()
    proc = run_cli("totalseg", "--task", "total_fast", "--source-home", fast_source_home, "-o", compressed,
                   "--rank-ratio", "0.3", "--include-stem", check=True)
    print(f"totalseg compression: {time.perf_counter() - t0:.0f} s")
    assert "TOTALSEG_HOME_DIR=" in proc.stdout
    assert tree_files(fast_source_home / "nnunet") == before, "the source home was modified"

    # the layout TotalSegmentator looks for, and a config that sends nothing
    folder = compressed / "nnunet/results/Dataset297_TotalSegmentator_total_3mm_1559subj" / \
        f"{FAST_TRAINER}__nnUNetPlans__3d_fullres"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == \
        "nnunet_compress.network.CompressedUNet"
    assert json.loads((compressed / "config.json").read_text())["send_usage_stats"] is False
    (row,) = json.loads((compressed / "nnunet_compress_totalseg.json").read_text())["models"]
    assert 16.5e6 < row["params_before"] < 16.7e6 and row["params_after"] < 0.2 * row["params_before"]

    ct_shape = sitk.GetArrayFromImage(sitk.ReadImage(str(synthetic_ct))).shape
    info, seconds = run_totalsegmentator(compressed, synthetic_ct, tmp_path / "seg")
    print(f"TotalSegmentator run: {seconds:.0f} s")
    assert info["attempts"] == [], f"TotalSegmentator tried to reach the network: {info['attempts']}"
    (loaded,) = info["loaded"]  # nnU-Net's predictor loaded exactly one model: ours, from the compressed home
    assert Path(loaded["folder"]).resolve().is_relative_to(compressed.resolve()), loaded
    assert loaded["network"] == "CompressedUNet" and loaded["params"] == row["params_after"]
    masks = read_masks(tmp_path / "seg")
    assert len(masks) == len(class_map["total"]) and f"{class_map['total'][1]}.nii.gz" in masks
    assert all(m.shape == ct_shape for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) > 0  # random weights still label something


@pytest.mark.totalseg
def test_int8_home_runs_int8_in_totalsegmentator(fast_source_home, synthetic_ct, tmp_path):
    """totalseg --int8: every model quantised on the user's CTs; TotalSegmentator's run compiles INT8 models."""
    calibration = tmp_path / "cts"
    calibration.mkdir()
    (calibration / "case_0000.nii.gz").write_bytes(synthetic_ct.read_bytes())
    home = tmp_path / "home_int8"
    before = tree_files(fast_source_home / "nnunet")
    # random weights: their labels flip under any rounding, so the Dice budget is opened wide (the accuracy control
    # is tested on a trained model in test_e2e_int8.py)
    proc = run_cli("totalseg", "--task", "total_fast", "--source-home", fast_source_home, "-o", home,
                   "--rank-ratio", "0.3", "--int8", "--calibration-images", calibration, "--subset-size", "2",
                   "--validation-patches", "2", "--max-dice-drop", "0.99", "--max-cases", "1", check=True)
    assert "INT8" in proc.stdout and tree_files(fast_source_home / "nnunet") == before
    (row,) = json.loads((home / "nnunet_compress_totalseg.json").read_text())["models"]
    assert row["int8"][0]["convolutions"] > 0
    folder = home / "nnunet/results/Dataset297_TotalSegmentator_total_3mm_1559subj" / \
        f"{FAST_TRAINER}__nnUNetPlans__3d_fullres"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no f32 leftovers
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["engine_int8"] is True
    info, _ = run_totalsegmentator(home, synthetic_ct, tmp_path / "seg", NNUNET_COMPRESS_CPU_ENGINE="openvino")
    assert info["attempts"] == [] and info["engine"] == ["int8"], info
    assert read_masks(tmp_path / "seg")


def test_total_task_resolves_to_the_five_part_models():
    """The default 'total' task: TotalSegmentator's five 1.5 mm part models, each once, in its own layout."""
    from nnunet_compress.totalseg.home import task_models
    from nnunet_compress.totalseg.shapes import PART_MODELS, architecture_for
    models = task_models(["total", "total_fast"])
    assert [m.dataset_id for m in models] == [291, 292, 293, 294, 295, 297]
    assert str(models[0].model_folder) == \
        "Dataset291_TotalSegmentator_part1_organs_1559subj/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    assert models[-1].trainer == FAST_TRAINER and all(m.folds == ("0",) for m in models)
    assert {i: architecture_for(i).num_outputs for i in PART_MODELS} == {291: 25, 292: 27, 293: 19, 294: 24, 295: 27}
    assert architecture_for(297).num_outputs == 118


def test_missing_weights_and_unknown_task_are_user_errors(tmp_path):
    proc = run_cli("totalseg", "--task", "total_fast", "--source-home", tmp_path / "nothing", "-o", tmp_path / "o",
                   "--rank-ratio", "0.3")
    assert proc.returncode == 2 and "totalseg_download_weights" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("totalseg", "--task", "no_such_task", "--source-home", tmp_path, "-o", tmp_path / "o",
                   "--rank-ratio", "0.3")
    assert proc.returncode == 2 and "unknown TotalSegmentator task" in proc.stderr
    assert not (tmp_path / "o").exists()
