"""``nnunet-compress prepare-engine`` (and ``totalseg``'s use of it): the converted model is put where nnU-Net's
predictor then finds it, so the first prediction converts nothing; bad requests are clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.inference import openvino_engine as engine
from nnunet_compress.totalseg import home
from nnunet_compress.workflows.engine_cache import prepare_engine

DATA = Path(__file__).parent / "data" / "legacy_folders"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "openvino")
    engine.clear()
    engine.STATS.__init__()
    yield tmp_path / "cache" / "openvino"
    engine.clear()


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["tucker_r0.5", "l1_F0.6"])
def test_prepared_entry_is_the_one_nnunets_predictor_reads(cache, name):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    before = tree(DATA / name)
    (row,) = prepare_engine(DATA / name, ["0"], progress=lambda line: None)
    assert row["input_shape"] == [1, 1, 16, 16, 16] and row["seconds"] > 0  # the plans' patch, one CT channel
    assert entries(cache) == [Path(row["cache_entry"]).name]
    (again,) = prepare_engine(DATA / name, ["0"], progress=lambda line: None)
    assert again["seconds"] is None and again["cache_entry"] == row["cache_entry"]

    # nnU-Net's predictor builds the network and loads the weights its own way; its sliding window must read the
    # prepared model, not convert another one
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(DATA / name), use_folds=("0",))
    conversions = len(engine.STATS.conversions)
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(1, 24, 20, 16))
    assert engine.STATS.inferences > 0 and logits.shape[1:] == (24, 20, 16)
    assert len(engine.STATS.conversions) == conversions and len(engine.STATS.cache_loads) == 1
    assert entries(cache) == [Path(row["cache_entry"]).name]
    assert tree(DATA / name) == before  # the model folder is only read


def test_torch_engine_or_a_plain_folder_is_refused(cache, monkeypatch, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(DATA / "converted", plain)
    plans = json.loads((plain / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = arch["arch_kwargs"].pop("base_network_class_name")
    for key in ("channels", "tucker_ranks", "per_fold_channels"):
        arch["arch_kwargs"].pop(key)
    (plain / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CompressError, match="PlainConvUNet, which nnU-Net runs on plain torch.*nnunet-compress convert"):
        prepare_engine(plain, ["0"])
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")
    with pytest.raises(CompressError, match="NNUNET_COMPRESS_CPU_ENGINE=torch: predictions run on torch"):
        prepare_engine(DATA / "converted", ["0"])
    assert entries(cache) == []


def test_cli_reports_the_conversion_and_its_errors(cache, tmp_path):
    run = [sys.executable, "-m", "nnunet_compress.cli", "prepare-engine"]
    proc = subprocess.run([*run, str(DATA / "converted"), "-f", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fold 0: input 1x1x16x16x16 converted in" in proc.stdout and len(entries(cache)) == 1
    proc = subprocess.run([*run, str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_totalseg_home_reports_instead_of_failing_where_the_engine_is_off(monkeypatch):
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")
    lines = []
    assert home._prepare_engine(Path("unused"), [], lines.append) == []
    assert lines == ["engine cache not prepared: NNUNET_COMPRESS_CPU_ENGINE=torch: predictions run on torch, so "
                     "there is nothing to convert; unset NNUNET_COMPRESS_CPU_ENGINE (or set it to openvino) to use "
                     "the engine"]
