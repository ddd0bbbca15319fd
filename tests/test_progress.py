"""Progress bars: drawn on a terminal, never into a pipe or a file, and never after --quiet."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_compress import progress
from nnunet_compress.cli.main import build_parser


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def not_quiet():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_bar_on_a_terminal():
    stream = Terminal()
    assert list(progress.bar(range(3), "folds", "fold", stream=stream)) == [0, 1, 2]
    assert "folds:" in stream.getvalue() and "/3" in stream.getvalue()  # count of total, elapsed, ETA


def test_no_bar_in_a_pipe():
    stream = io.StringIO()
    items = [1, 2]
    assert progress.bar(items, "folds", "fold", stream=stream) is items
    assert stream.getvalue() == ""


def test_no_bar_when_quiet():
    progress.set_quiet(True)
    stream = Terminal()
    assert list(progress.bar(range(2), "folds", "fold", stream=stream)) == [0, 1]
    assert stream.getvalue() == ""


@pytest.mark.parametrize("command", [["tucker", "m", "-o", "out", "--rank-ratio", "0.3"], ["convert", "m", "-o", "o"],
                                     ["prune", "m", "-o", "o", "--target-flops", "0.5"], ["prepare-engine", "m"]])
def test_long_commands_take_quiet(command):
    assert build_parser().parse_args([*command, "--quiet"]).quiet
    assert not build_parser().parse_args(command).quiet


def test_tucker_decomposition_shows_a_bar_per_layer(monkeypatch):
    """The longest silent step of `tucker` and `totalseg`: one tick per factorised layer."""
    import torch
    from torch import nn

    from nnunet_compress.tucker.decomposition import replace_convs
    net = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with torch.no_grad():
        replace_convs(net, {"0": (4, 4), "1": (4, 4)})
    assert "Tucker decomposition" in terminal.getvalue() and "0/2 [" in terminal.getvalue()  # count of total
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    net = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1))
    replace_convs(net, {"0": (4, 4)})
    assert pipe.getvalue() == ""


LEGACY = Path(__file__).resolve().parent / "data" / "legacy_folders"


def _legacy_plans() -> tuple[dict, dict]:
    folder = LEGACY / "converted"
    return json.loads((folder / "plans.json").read_text()), json.loads((folder / "dataset.json").read_text())


@pytest.mark.parametrize("reader", ["tucker", "quantize"])
def test_calibration_cases_show_a_bar_per_case(monkeypatch, reader):
    """Preprocessing the calibration images (Tucker/budget guard and INT8 calibration): one tick per case, through
    nnU-Net's own preprocessor; nothing on a pipe."""
    from nnunet_compress.nnunet.calibration import preprocessed_cases
    from nnunet_compress.nnunet.quantization_data import cases_from_images

    plans, dataset_json = _legacy_plans()

    def read():
        if reader == "tucker":
            return preprocessed_cases(LEGACY / "images", plans, dataset_json, "3d_fullres")
        return [c.image for c in cases_from_images(LEGACY / "images", plans, dataset_json, "3d_fullres")]

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    on_terminal = read()
    assert "preprocessing calibration cases" in terminal.getvalue() and "0/1 [" in terminal.getvalue()  # count of total
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    piped = read()
    assert pipe.getvalue() == ""
    assert len(on_terminal) == 1 and np.array_equal(on_terminal[0], piped[0])  # the bar changes nothing else


def test_calibration_phantoms_show_a_bar_unless_quiet(monkeypatch):
    """`tucker` without images calibrates on synthetic phantoms: one tick per phantom, none with --quiet."""
    from nnunet_compress.nnunet.calibration import synthetic_ct_cases

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert len(synthetic_ct_cases(None, None, None, 1, count=2)) == 2
    assert "calibration phantoms" in terminal.getvalue() and "0/2 [" in terminal.getvalue()
    progress.set_quiet(True)
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert len(synthetic_ct_cases(None, None, None, 1, count=2)) == 2
    assert quiet.getvalue() == ""


def test_label_free_tile_search_shows_a_bar(monkeypatch):
    """INT8 calibration without labels predicts each tile it looks at with the f32 network: one tick per tile."""
    from nnunet_compress.nnunet.quantization_data import Case, draw_patches

    case = Case("c", np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32))
    calls = []

    def predict(image):
        calls.append(1)
        return (image[0, 0] > 2.5).astype(np.int64)

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert len(draw_patches([case], (16, 16, 16), count=4, foreground_share=1.0, seed=0, predict=predict)) == 4
    assert "foreground tiles" in terminal.getvalue() and f"/{max(3 * 4, 4 + 8)} [" in terminal.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    draw_patches([case], (16, 16, 16), count=4, foreground_share=1.0, seed=0, predict=predict)
    assert pipe.getvalue() == ""
