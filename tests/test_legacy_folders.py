"""Model folders written by an earlier layout of this package still load and predict the same.

Every compressed plans.json names ``nnunet_compress.network.CompressedUNet`` and its arch_kwargs; TotalSegmentator
homes and users' model folders written months ago must keep working whatever moves inside the package. The folders
in tests/data/legacy_folders/ were written by the flat-layout code (see the README there), in the nnU-Net 2.1 plans
format of TotalSegmentator's weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_compress.network import CompressedUNet
from nnunet_compress.nnunet.model_folder import load_fold_network, open_model_folder

DATA = Path(__file__).parent / "data" / "legacy_folders"
FOLDERS = ["tucker_r0.5", "l1_F0.6", "converted"]


@pytest.mark.parametrize("name", FOLDERS)
def test_legacy_folder_loads_strictly_and_gives_the_same_logits(name):
    folder = open_model_folder(DATA / name, ["0"])
    net, _, _ = load_fold_network(folder, "0")  # load_state_dict is strict inside
    assert isinstance(net, CompressedUNet)
    x = torch.load(DATA / "input.pt")
    expected = torch.load(DATA / "expected_logits.pt")[name]
    with torch.no_grad():
        out = net.eval()(x).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FOLDERS)
def test_legacy_folder_predicts_the_same_segmentation(name, tmp_path, torch_engine):
    exe = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    env = dict(os.environ, nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path))
    subprocess.run([str(exe), "-i", str(DATA / "images"), "-o", str(tmp_path / "seg"), "-m", str(DATA / name),
                    "-f", "0", "-device", "cpu", "--disable_progress_bar", "-npp", "1", "-nps", "1"],
                   check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg" / "case.nii.gz")))
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "expected_seg" / name / "case.nii.gz")))
    assert got.shape == want.shape
    assert np.array_equal(got, want)
