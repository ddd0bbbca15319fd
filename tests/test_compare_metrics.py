"""The maths of `nnunet-compress compare`: surface Dice against hand-computed cases and a brute-force reference,
paired tests and multiple-comparison corrections against hand-computed values."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_compress.evaluation.stats import adjust, benjamini_hochberg, holm, paired_wilcoxon
from nnunet_compress.evaluation.surface_dice import normalized_surface_dice

# ---- surface Dice: hand-computed cases ------------------------------------------------------------------------

def test_identical_masks_score_one():
    m = np.zeros((10, 12, 14), bool)
    m[2:8, 3:9, 4:12] = True
    assert normalized_surface_dice(m, m, (1.0, 1.0, 1.0), 0.0) == 1.0


def test_empty_masks():
    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[2, 2, 2] = True
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1), 2))
    assert normalized_surface_dice(full, empty, (1, 1, 1), 2) == 0.0
    assert normalized_surface_dice(empty, full, (1, 1, 1), 2) == 0.0


@pytest.mark.parametrize("axis,spacing,tolerance,expected", [
    (0, (3.0, 1.0, 1.0), 5.9, 0.0),   # 2 voxels along z at 3 mm = 6 mm apart
    (0, (3.0, 1.0, 1.0), 6.0, 1.0),
    (2, (3.0, 1.0, 1.0), 2.0, 1.0),   # 2 voxels along x at 1 mm = 2 mm apart
    (2, (3.0, 1.0, 1.0), 1.9, 0.0),
])
def test_single_voxels_use_the_spacing_of_their_axis(axis, spacing, tolerance, expected):
    a = np.zeros((9, 9, 9), bool)
    b = a.copy()
    a[4, 4, 4] = True
    index = [4, 4, 4]
    index[axis] += 2
    b[tuple(index)] = True
    assert normalized_surface_dice(a, b, spacing, tolerance) == expected


def test_partial_agreement_by_hand():
    # A: one 5x5 slab at z=2 (25 boundary voxels). B: the same slab plus one at z=6 (50 boundary voxels).
    # A->B: all 25 at distance 0. B->A: the z=2 slab (25) at 0, the z=6 slab 4 slices away.
    a = np.zeros((9, 7, 7), bool)
    a[2, 1:6, 1:6] = True
    b = a.copy()
    b[6, 1:6, 1:6] = True
    # 1 mm slices: 4 mm > 1 mm tolerance -> (25 + 25) / (25 + 50)
    assert normalized_surface_dice(a, b, (1.0, 1.0, 1.0), 1.0) == pytest.approx(2 / 3)
    # 0.25 mm slices: 4 slices = 1 mm, within tolerance -> everything agrees
    assert normalized_surface_dice(a, b, (0.25, 1.0, 1.0), 1.0) == 1.0


def test_boundary_of_a_solid_cube_by_hand():
    # A = 4x4x4 cube at x=2..5, B = the same at x=3..6; each has 64 - 2x2x2 = 56 boundary voxels.
    # Tolerance 0: a boundary voxel counts if it is also a boundary voxel of the other cube. Slice by slice, A's
    # boundary is x=2: face (16), x=3: rim (12), x=4: rim (12), x=5: face (16); B's at x=3: face, x=4, x=5: rims.
    # A's counted voxels: x=3 rim 12 (in B's face), x=4 rim 12, x=5 the 12 of its face on B's rim -> 36;
    # by symmetry also 36 for B. NSD = 72 / 112. Tolerance 1 mm: every boundary voxel is within one voxel.
    a = np.zeros((9, 8, 8), dtype=bool)
    b = np.zeros((9, 8, 8), dtype=bool)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True
    assert normalized_surface_dice(a, b, (1, 1, 1), 0.0) == pytest.approx(72 / 112)
    assert normalized_surface_dice(a, b, (1, 1, 1), 1.0) == 1.0


# ---- surface Dice: brute-force reference on random shapes -------------------------------------------------

def brute_force_nsd(a, b, spacing, tol):
    def border(m):
        p = np.pad(m, 1)
        inner = p.copy()
        for axis in range(3):
            for shift in (1, -1):
                inner &= np.roll(p, shift, axis=axis)
        return (p & ~inner)[1:-1, 1:-1, 1:-1]
    ba, bb = np.argwhere(border(a)) * spacing, np.argwhere(border(b)) * spacing
    d = cdist(ba, bb)
    close = np.sum(d.min(axis=1) <= tol + 1e-9) + np.sum(d.min(axis=0) <= tol + 1e-9)
    return close / (len(ba) + len(bb))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_blobs(seed):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    shape = (14, 18, 16)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    a[0, :, :4] = True  # touch the image's edge: outside the image counts as background
    spacing = np.array([2.5, 0.8, 1.1])
    for tol in (0.0, 1.0, 2.0, 5.0):
        assert normalized_surface_dice(a, b, spacing, tol) == pytest.approx(brute_force_nsd(a, b, spacing, tol))


# ---- paired test and corrections ----------------------------------------------------------------------------

def test_wilcoxon_exact_by_hand():
    # five positive differences: two-sided exact p = 2 * P(W+ = 15) = 2 / 2**5
    t = paired_wilcoxon([0.5, 0.5, 0.5, 0.5, 0.5], [0.51, 0.52, 0.53, 0.54, 0.55])
    assert t.n_pairs == 5 and t.p_value == pytest.approx(0.0625)
    assert t.mean_difference == pytest.approx(0.03)


def test_wilcoxon_identical_and_missing():
    t = paired_wilcoxon([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert t.p_value == 1.0 and t.n_pairs == 3
    t = paired_wilcoxon([0.9, math.nan, 0.7, 0.6], [0.8, 0.5, math.nan, 0.6])
    assert t.n_pairs == 2  # cases where a class is absent in either are left out
    assert math.isnan(paired_wilcoxon([math.nan], [math.nan]).p_value)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02 .03 .06 .06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_benjamini_hochberg_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> p*4/rank = 0.02, 0.02, 0.04, 0.04 -> running min from the top
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_corrections_skip_nan():
    out = holm([0.01, math.nan, 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    out = adjust([0.01, math.nan, 0.04], "bh")
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        adjust([0.1], "bonferroni-ish")
