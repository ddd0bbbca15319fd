"""End-to-end: the CPU engine inside nnU-Net's own predictor, for the original (``convert``) and a compressed model.

``nnunet-compress convert`` writes the trained tiny model unchanged as a CompressedUNet folder;
``nnUNetv2_predict_from_modelfolder`` then runs it on OpenVINO (the converted model appears in the engine cache)
and must segment as the original folder does on torch. The same folder with ``NNUNET_COMPRESS_CPU_ENGINE=torch``
is the original network exactly.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_e2e_tucker import read_segmentations, tree_checksums

from conftest import run_cli
from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.model_folder import load_checkpoint

pytestmark = pytest.mark.e2e


def predict(ws, model_folder: Path, name: str, engine: str) -> Path:
    """nnUNetv2_predict_from_modelfolder with the CPU engine chosen by NNUNET_COMPRESS_CPU_ENGINE."""
    env = {**ws.env(), "NNUNET_COMPRESS_CPU_ENGINE": engine}
    tiny.run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(ws.raw_dataset / "imagesTs"), "-o",
                     str(ws.root / name), "-m", str(model_folder), "-f", "0", "-device", "cpu",
                     "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1"], env,
                    ws.root / "logs" / f"predict_{name}.log")
    return ws.root / name


def cache_entries() -> set[str]:
    root = Path(os.environ["NNUNET_COMPRESS_CACHE_DIR"]) / "openvino"
    return {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()


@pytest.fixture(scope="module")
def converted(tiny_ws, tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "converted"
    before = tree_checksums(tiny_base)
    proc = run_cli("convert", tiny_base, "-o", out, env=tiny_ws.env(), check=True)
    assert "runs on the CPU engine" in proc.stdout
    assert tree_checksums(tiny_base) == before, "the source model folder was modified"
    return out


def test_convert_keeps_the_model(tiny_base, converted):
    plans = json.loads((converted / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "nnunet_compress.network.CompressedUNet"
    assert arch["arch_kwargs"]["channels"] is None and arch["arch_kwargs"]["tucker_ranks"] is None
    base = load_checkpoint(tiny.checkpoint_path(tiny_base))["network_weights"]
    mine = load_checkpoint(tiny.checkpoint_path(converted))["network_weights"]
    assert base.keys() == mine.keys()
    assert all(torch.equal(base[k], mine[k]) for k in base)


def test_converted_model_predicts_on_the_engine_like_the_original(tiny_ws, tiny_base, converted):
    before = cache_entries()
    engine_pred = predict(tiny_ws, converted, "engine_converted", "openvino")
    assert cache_entries() - before, "nnUNetv2_predict_from_modelfolder did not run the network on OpenVINO"
    predict(tiny_ws, converted, "torch_converted", "torch")
    base_pred = tiny.predict_folder(tiny_ws, tiny_base, tiny_ws.root / "engine_base")
    base, on_engine = read_segmentations(base_pred), read_segmentations(engine_pred)
    on_torch = read_segmentations(tiny_ws.root / "torch_converted")
    assert base.keys() == on_engine.keys() == on_torch.keys() and base
    for name in base:
        assert np.array_equal(on_torch[name], base[name]), f"{name}: the converted network is not the original"
        same = np.mean(on_engine[name] == base[name])
        assert same >= 0.999, f"{name}: only {same:.5f} of the labels agree between OpenVINO and torch"


def test_convert_refuses_bad_input(tiny_ws, tiny_base, converted, tmp_path):
    proc = run_cli("convert", converted, "-o", tmp_path / "again", env=tiny_ws.env())
    assert proc.returncode == 2 and "already names nnunet_compress.network.CompressedUNet" in proc.stderr
    proc = run_cli("convert", tiny_base, "-o", tiny_base / "inside", env=tiny_ws.env())
    assert proc.returncode == 2 and "inside it" in proc.stderr
    proc = run_cli("convert", tmp_path / "missing", "-o", tmp_path / "out", env=tiny_ws.env())
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    proc = run_cli("convert", tiny_base, "-o", converted, env=tiny_ws.env())
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
