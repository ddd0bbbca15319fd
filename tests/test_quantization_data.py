"""Calibration and validation tiles for INT8: nnU-Net's sliding-window grid, the foreground share, no reuse, and
each fold's split into calibration (trained-on) and validation (never trained on) cases.

References: the tile grid against nnU-Net's own step rule worked out by hand (size 40, patch 16, step 0.5: four
tiles at 0, 8, 16, 24 per axis), and foreground counted from the labels cut out of each tile.
"""

import json

import numpy as np

from nnunet_compress.nnunet.quantization_data import Case, cut, draw_patches, fold_split, tile_starts

PATCH = (16, 16, 16)


def corner_case(name="c") -> Case:
    image = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    labels = np.zeros((40, 40, 40), dtype=np.int16)
    labels[:6, :6, :6] = 2  # foreground only in the first corner: 1 of 64 tiles... and its overlaps
    return Case(name, image, labels)


def test_tile_grid_is_nnunets_sliding_window():
    starts = tile_starts((40, 40, 40), PATCH)
    assert len(starts) == 64 and sorted({s[0] for s in starts}) == [0, 8, 16, 24]
    assert tile_starts((10, 40, 16), PATCH) == [(0, y, 0) for y in (0, 8, 16, 24)]  # smaller axes: one padded tile


def test_cut_pads_like_the_predictor():
    case = Case("small", np.ones((1, 10, 20, 20), dtype=np.float32), np.ones((10, 20, 20), dtype=np.int16))
    p = cut(case, (0, 4, 0), PATCH)
    assert p.image.shape == (1, 1, *PATCH) and p.labels.shape == PATCH
    assert p.image[0, 0, :10].min() == 1 and p.image[0, 0, 10:].max() == 0  # zero padding beyond the case


def test_foreground_share_and_no_reuse():
    case = corner_case()
    fg_tiles = [s for s in tile_starts((40, 40, 40), PATCH) if (cut(case, s, PATCH).labels > 0).any()]
    assert len(fg_tiles) == 1  # only the tile at the origin reaches the corner blob
    drawn = draw_patches([case], PATCH, count=6, foreground_share=0.5, seed=0)
    assert len(drawn) == 6 and sum((p.labels > 0).any() for p in drawn) == 1  # all the foreground there is
    second = draw_patches([case], PATCH, count=6, foreground_share=0.5, seed=1,
                          exclude={(p.case, p.start) for p in drawn})
    assert not {p.start for p in drawn} & {p.start for p in second}
    assert draw_patches([case], PATCH, 6, 0.5, seed=0)[0].start == drawn[0].start  # seeded


def test_label_free_foreground_comes_from_the_predictor():
    case = corner_case()
    case.labels = None
    calls = []

    def predict(image):
        calls.append(1)
        return (image[0, 0] > 2.5).astype(np.int64)  # "foreground" where the noise is high

    drawn = draw_patches([case], PATCH, count=4, foreground_share=1.0, seed=0, predict=predict)
    assert len(drawn) == 4 and all(p.labels is None for p in drawn)
    assert all((p.image[0, 0] > 2.5).any() for p in drawn)
    assert len(calls) <= max(3 * 4, 4 + 8)  # a bounded look at the tiles, not all 64


def test_fold_split_reads_nnunets_split_file(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    dataset = "Dataset777_Split"
    (tmp_path / dataset).mkdir()
    assert fold_split(dataset, "0") is None  # not trained yet: no split file
    splits = [{"train": ["c", "a"], "val": ["b"]}, {"train": ["a", "b"], "val": ["c"]}]
    (tmp_path / dataset / "splits_final.json").write_text(json.dumps(splits))
    assert fold_split(dataset, "0") == (["a", "c"], ["b"])
    assert fold_split(dataset, "1") == (["a", "b"], ["c"])
    assert fold_split(dataset, "2") is None  # a fold the file does not hold
    assert fold_split(dataset, "all") is None  # trained on every case
