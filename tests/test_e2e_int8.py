"""End-to-end INT8: ``nnunet-compress quantize`` on the trained tiny model, then nnU-Net's own predictor.

The INT8 folder must predict through ``nnUNetv2_predict_from_modelfolder`` with no flag (OpenVINO, INT8), agree with
the same folder run in f32 (``NNUNET_COMPRESS_CPU_PRECISION=f32``) on at least 99% of voxels, keep the Dice within
the budget it was quantised for, leave the source folder byte-identical, and refuse to be trained. Bad input gets
one-line errors.
"""

import json

import numpy as np
import pytest
from test_e2e_tucker import read_segmentations, tree_checksums

from conftest import run_cli
from nnunet_compress.demo import tiny
from nnunet_compress.errors import CompressError
from nnunet_compress.inference.int8 import BIN_KEY, XML_KEY
from nnunet_compress.nnunet.model_folder import build_network, load_checkpoint, read_json

pytestmark = pytest.mark.e2e


def predict(ws, model_folder, name: str, **env) -> dict:
    environment = {**ws.env(), "NNUNET_COMPRESS_CPU_ENGINE": "openvino", **env}
    out = ws.root / name
    tiny.run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(ws.raw_dataset / "imagesTs"), "-o", str(out),
                     "-m", str(model_folder), "-f", "0", "-device", "cpu", "--disable_progress_bar",
                     "--disable_tta", "-npp", "1", "-nps", "1"], environment, ws.root / "logs" / f"predict_{name}.log")
    return out


@pytest.fixture(scope="module")
def int8_folder(tiny_ws, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "base_int8"
    before = tree_checksums(tiny_base)
    proc = run_cli("quantize", tiny_base, "-o", out, "--calibration-dataset", tiny_ws.dataset_id, "--subset-size", 8,
                   "--validation-patches", 6, env=tiny_ws.env(), check=True)
    assert tree_checksums(tiny_base) == before, "the source model folder was modified"
    assert "convolutions INT8" in proc.stdout and "quantization_report.md" in proc.stdout
    return out


def test_int8_folder_carries_the_model_manifest_and_report(tiny_ws, tiny_base, int8_folder):
    plans = read_json(int8_folder / "plans.json")
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == "nnunet_compress.network.CompressedUNet"
    assert cfg["architecture"]["arch_kwargs"]["engine_int8"] is True
    assert cfg["nnunet_compress"]["int8"]["graded_against"] == "labels"
    weights = load_checkpoint(tiny.checkpoint_path(int8_folder))["network_weights"]
    base = load_checkpoint(tiny.checkpoint_path(tiny_base))["network_weights"]
    assert bytes(weights[XML_KEY].numpy()[:5]) == b"<?xml" and weights[BIN_KEY].numel() > 1000
    assert all((weights[k] == v).all() for k, v in base.items())  # the f32 weights are the parent's, unchanged
    manifest = json.loads((int8_folder / "fold_0" / "int8_manifest.json").read_text())
    assert {"openvino", "nncf", "torch"} <= set(manifest["versions"])
    assert manifest["calibration_patches"] == 8 and manifest["validation_patches"] == 6
    assert manifest["calibration_foreground_patches"] >= 4  # at least half the tiles hold labelled foreground
    assert manifest["mean_dice_f32"] - manifest["mean_dice_int8"] <= 0.01 + 1e-9
    assert all(manifest["dice_f32"][c] - manifest["dice_int8"][c] <= 0.02 + 1e-9 for c in manifest["dice_f32"])
    # graded on the cases fold 0 never trained on, calibrated on the ones it did (nnU-Net's own split file)
    split = read_json(tiny_ws.preprocessed / tiny_ws.dataset_folder_name / "splits_final.json")[0]
    assert manifest["validation_cases"] and set(manifest["validation_cases"]) <= set(split["val"])
    assert set(manifest["calibration_cases"]) <= set(split["train"])
    assert "validation cases in splits_final.json" in manifest["validation_source"]
    report = (int8_folder / "quantization_report.md").read_text()
    assert "| class | Dice f32 | Dice INT8 |" in report and "kept in f32" in report


def test_predictor_runs_int8_by_default_and_f32_on_request(tiny_ws, tiny_base_dice, int8_folder):
    int8_pred = predict(tiny_ws, int8_folder, "int8_default")
    f32_pred = predict(tiny_ws, int8_folder, "int8_as_f32", NNUNET_COMPRESS_CPU_PRECISION="f32")
    log = (tiny_ws.root / "logs" / "predict_int8_default.log").read_text()
    assert "cannot be used" not in log and "OpenVINO cannot run" not in log
    a, b = read_segmentations(int8_pred), read_segmentations(f32_pred)
    assert a.keys() == b.keys() and a
    agreement = np.mean([np.mean(a[k] == b[k]) for k in a])
    assert agreement >= 0.99, f"INT8 and f32 agree on {agreement:.4f} of the voxels"
    assert any(not np.array_equal(a[k], b[k]) for k in a) or agreement == 1.0
    dice_int8 = tiny.dice_scores(tiny_ws, int8_pred)["mean_foreground"]
    assert dice_int8 >= tiny_base_dice["mean_foreground"] - 0.03


def test_int8_folder_refuses_training_in_one_line(tiny_ws, int8_folder):
    plans = read_json(int8_folder / "plans.json")
    dataset_json = read_json(int8_folder / "dataset.json")
    with pytest.raises(CompressError, match="fine-tune the parent folder it was quantised from, then quantise again"):
        build_network(plans, dataset_json, "3d_fullres", deep_supervision=True)  # as nnU-Net's trainers build it
    proc = run_cli("plan", "tucker", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS,
                   "--rank-ratio", "0.5", "--weights", tiny.checkpoint_path(int8_folder), "--plans-name",
                   "nnUNetPlans_from_int8", "--overwrite", env=tiny_ws.env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "fine-tune the parent folder it was quantised from" in proc.stderr


@pytest.mark.parametrize("args, message", [
    ([], "exactly one calibration source"),
    (["--calibration-images", "MISSING"], "does not exist"),
    (["--calibration-images", "EMPTY"], "no .nii.gz images"),
    (["--calibration-dataset", "501", "--max-dice-drop", "1.5"], "outside (0, 1)"),
    (["--calibration-dataset", "501", "--max-dice-drop", "0.02", "--max-class-drop", "0.01"],
     "must be at least --max-dice-drop"),
    (["--calibration-images", "TWO_CHANNELS"], "has 2 channel file(s) but the model expects 1"),
])
def test_bad_input_one_line_errors(tiny_ws, tiny_base, tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    two = tmp_path / "TWO_CHANNELS"
    two.mkdir()
    image = next((tiny_ws.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))
    for channel in ("0000", "0001"):
        (two / image.name.replace("_0000", f"_{channel}")).write_bytes(image.read_bytes())
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY", "TWO_CHANNELS") else a for a in args]
    before = tree_checksums(tiny_base)
    proc = run_cli("quantize", tiny_base, "-o", tmp_path / "out", *args, env=tiny_ws.env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and tree_checksums(tiny_base) == before


def test_not_a_model_folder(tiny_ws, tmp_path):
    proc = run_cli("quantize", tmp_path, "-o", tmp_path / "out", "--calibration-dataset", tiny_ws.dataset_id,
                   env=tiny_ws.env())
    assert proc.returncode == 2 and "is not an nnU-Net model folder" in proc.stderr
