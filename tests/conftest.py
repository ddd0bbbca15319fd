"""Shared fixtures: a tiny nnU-Net workspace on synthetic CT and a base model trained once per test session.

The base model is trained by nnU-Net's own CLI (plan_and_preprocess, nnUNetv2_train -device cpu); every
end-to-end test of a compression method starts from it, as a user starts from their trained model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Converted OpenVINO models of the test networks go to a cache of this test run (inherited by the nnU-Net
# subprocesses), not to the user's ~/.cache.
if "NNUNET_COMPRESS_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["NNUNET_COMPRESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="nnunet_compress_test_cache_")


# The suite runs the CPU engine every user gets (OpenVINO, the default when the variable is unset), whatever the
# developer's shell says; the tests of torch's CPU paths ask for them with the `torch_engine` fixture.
os.environ.pop("NNUNET_COMPRESS_CPU_ENGINE", None)


@pytest.fixture
def fresh_openvino_engine(tmp_path, monkeypatch):
    """The OpenVINO engine switched on, with an empty disk cache of the test's own and nothing compiled in memory;
    yields the cache folder."""
    from nnunet_compress.inference import openvino_engine
    monkeypatch.setenv("NNUNET_COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "openvino")
    monkeypatch.delenv("NNUNET_COMPRESS_CPU_PRECISION", raising=False)
    openvino_engine.clear()
    openvino_engine.STATS.__init__()
    yield tmp_path / "cache"
    openvino_engine.clear()


@pytest.fixture
def torch_engine(monkeypatch):
    """Run CompressedUNet's CPU inference on torch's own paths (for the tests of those paths)."""
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")


# Developers may point this at a workspace kept between runs (its base model is then trained only once);
# CI leaves it unset and every run starts from nothing.
REUSE_WORKSPACE = os.environ.get("NNUNET_COMPRESS_TEST_WORKSPACE")


@pytest.fixture(scope="session")
def tiny_ws(tmp_path_factory):
    from nnunet_compress.demo.tiny import default_workspace, prepare_dataset
    root = Path(REUSE_WORKSPACE) if REUSE_WORKSPACE else tmp_path_factory.mktemp("tiny")
    ws = default_workspace(root, dataset_id=501)
    prepare_dataset(ws)
    return ws


@pytest.fixture(scope="session")
def tiny_base(tiny_ws) -> Path:
    """Model folder of the tiny base model (fold 0), trained with nnUNetv2_train on the CPU."""
    from nnunet_compress.demo.tiny import checkpoint_path, train
    if REUSE_WORKSPACE and checkpoint_path(tiny_ws.model_folder()).is_file():
        return tiny_ws.model_folder()
    return train(tiny_ws)


@pytest.fixture(scope="session")
def tiny_base_dice(tiny_ws, tiny_base) -> dict:
    from nnunet_compress.demo.tiny import dice_scores, predict_folder
    out = predict_folder(tiny_ws, tiny_base, tiny_ws.root / "pred_base")
    return dice_scores(tiny_ws, out)


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `nnunet-compress ARGS` in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "nnunet_compress.cli", *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"nnunet-compress {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
