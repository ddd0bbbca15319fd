"""Progress bars: drawn on a terminal, never into a pipe or a file, and never after --quiet."""

from __future__ import annotations

import io

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
