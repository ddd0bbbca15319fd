"""Reproducibility of compressed weights, and nnU-Net's multi-part prediction with compressed models."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cli
from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.env import run_nnunet

pytestmark = pytest.mark.e2e


def weights(folder):
    return torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["network_weights"]


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("argv", [
    ["tucker", "--rank-ratio", "0.5", "--min-rank", "4"],
    ["tucker", "--target-flops", "0.6"],  # the tiny net at the default floor (--min-rank 8) keeps >= 0.52
    ["prune", "--method", "l1", "--target-flops", "0.6"],
    ["prune", "--method", "taylor", "--target-flops", "0.6", "--calibration-batches", "2", "--seed", "3"],
], ids=["tucker-ratio", "tucker-budget", "prune-l1", "prune-taylor"])
def test_same_inputs_and_seed_give_bit_identical_weights(tiny_ws, tiny_base, tmp_path, argv):
    command, options = argv[0], argv[1:]
    if "taylor" in options:
        options = options + ["-i", tiny_ws.raw_dataset / "imagesTr"]
    outs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        run_cli(command, tiny_base, "-o", out, *options, env=tiny_ws.env(), check=True)
        outs.append(out)
    assert_bit_identical(weights(outs[0]), weights(outs[1]))
    assert (outs[0] / "plans.json").read_text() == (outs[1] / "plans.json").read_text()


def test_multi_part_prediction_with_a_compressed_model(tiny_ws, tiny_base, tmp_path):
    """nnUNetv2_predict -num_parts 2 / -part_id 0,1 split the cases between two processes, as on a cluster."""
    plans = f"{tiny.TINY_PLANS}_tuckerparts"
    # a compressed model folder where nnUNetv2_predict looks for it: results/Dataset/TRAINER__PLANS__CONFIGURATION
    folder = tiny_ws.model_folder(tiny.BASE_TRAINER, plans)
    run_cli("tucker", tiny_base, "-o", folder, "--rank-ratio", "0.5", "--min-rank", "4", "--overwrite",
            env=tiny_ws.env(), check=True)
    parts = tmp_path / "parts"
    for part in ("0", "1"):
        run_nnunet(["nnUNetv2_predict", "-i", str(tiny_ws.raw_dataset / "imagesTs"), "-o", str(parts), "-d",
                    str(tiny_ws.dataset_id), "-c", tiny.CONFIGURATION, "-f", "0", "-tr", tiny.BASE_TRAINER, "-p", plans,
                    "-device", "cpu", "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1",
                    "-num_parts", "2", "-part_id", part], tiny_ws.env(), tiny_ws.root / "logs" / f"predict_part{part}.log")
    whole = tiny.predict_folder(tiny_ws, folder, tmp_path / "whole")
    names = sorted(p.name for p in whole.glob("*.nii.gz"))
    assert names and sorted(p.name for p in parts.glob("*.nii.gz")) == names
    for name in names:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(parts / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(whole / name)))
        assert np.array_equal(a, b), name
