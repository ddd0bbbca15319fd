"""The synthetic CT dataset: valid for nnU-Net, anatomically what the tiny pipeline relies on, and reproducible.

A dataset written once per module (5 training + 2 held-out cases) serves the read-back tests; the determinism and
safety tests write their own, smaller ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet import synthetic
from nnunet_compress.nnunet.synthetic import (
    LABELS,
    generate_case,
    make_case,
    write_held_out_cases,
    write_synthetic_dataset,
)

NUM_TRAIN, NUM_TEST, SEED = 5, 2, 3

# (low, high) HU of the median of each labelled structure, eroded by one voxel to skip partial-volume borders
HU_BANDS = {"liver": (50, 110), "kidney": (120, 200), "vessel": (170, 250), "lesion": (-25, 35)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    return Path(write_synthetic_dataset(str(raw), 777, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=SEED))


def read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array (z, y, x) and SimpleITK spacing (x, y, z) of a NIfTI file."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def training_cases(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    cases = []
    for label_file in sorted((folder / "labelsTr").glob("*.nii.gz")):
        identifier = label_file.name[:-len(".nii.gz")]
        image, spacing = read(folder / "imagesTr" / f"{identifier}_0000.nii.gz")
        labels, _ = read(label_file)
        cases.append((identifier, image, labels, spacing))
    return cases


def array_digest(folder: Path) -> str:
    """Hash of every array read back (not of the gzip bytes, which may carry a timestamp)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.nii.gz")):
        array, spacing = read(path)
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode() + str(spacing).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- layout and nnU-Net's own check

def test_layout_and_dataset_json(dataset):
    assert dataset.name == "Dataset777_SyntheticCT"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == LABELS
    assert meta["numTraining"] == NUM_TRAIN and meta["file_ending"] == ".nii.gz"
    names = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    assert names == [f"synct_{i:03d}_0000.nii.gz" for i in range(NUM_TRAIN)]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == \
        [f"synct_{i:03d}.nii.gz" for i in range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)]
    assert len(list((dataset / "imagesTs").iterdir())) == NUM_TEST
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_nnunet_verify_dataset_integrity(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(dataset), num_processes=1)  # raises (AssertionError/RuntimeError) on any problem


def test_files_are_small(dataset):
    for path in dataset.rglob("*.nii.gz"):
        assert path.stat().st_size < 1_000_000, path


# ---------------------------------------------------------------- anatomy

def test_every_label_in_every_training_case(dataset):
    for identifier, _, labels, _ in training_cases(dataset):
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) == set(LABELS.values()), identifier


def test_lesion_touches_liver(dataset):
    six = ndimage.generate_binary_structure(3, 1)
    for identifier, _, labels, _ in training_cases(dataset):
        around_lesion = ndimage.binary_dilation(labels == LABELS["lesion"], structure=six)
        assert np.any(around_lesion & (labels == LABELS["liver"])), identifier


def test_two_separate_kidneys(dataset):
    for identifier, _, labels, _ in training_cases(dataset):
        _, count = ndimage.label(labels == LABELS["kidney"], structure=np.ones((3, 3, 3)))
        assert count == 2, identifier


def test_structures_are_big_enough_for_a_tiny_unet(dataset):
    """Vessel at least 2 voxels in radius (survives a 2-voxel erosion), lesion at least 3 (survives 3)."""
    for identifier, _, labels, _ in training_cases(dataset):
        vessel_core = ndimage.binary_erosion(labels == LABELS["vessel"], iterations=1)
        assert vessel_core.any(), identifier
        in_plane = np.zeros((1, 3, 3), dtype=bool)
        in_plane[0, 1, :] = in_plane[0, :, 1] = True
        assert ndimage.binary_erosion(labels == LABELS["vessel"], structure=in_plane, iterations=2).any(), identifier
        lesion_core = ndimage.binary_erosion(labels == LABELS["lesion"], iterations=2)
        assert lesion_core.any(), identifier
        liver, lesion = (int(np.count_nonzero(labels == LABELS[n])) for n in ("liver", "lesion"))
        assert liver > 3 * lesion, "the liver is the large organ, the lesion small"


# ---------------------------------------------------------------- geometry

def test_spacing_matches_generation_and_is_anisotropic(dataset):
    for index, (identifier, image, labels, spacing) in enumerate(training_cases(dataset)):
        expected = generate_case(SEED, index)
        assert expected.identifier == identifier
        np.testing.assert_allclose(spacing, tuple(reversed(expected.spacing)), rtol=0, atol=1e-5)
        _, label_spacing = read(dataset / "labelsTr" / f"{identifier}.nii.gz")
        np.testing.assert_allclose(label_spacing, spacing, rtol=0, atol=1e-6)
        sx, sy, sz = spacing
        assert sx == pytest.approx(sy) and sz >= 1.25 * sx
        assert 2.0 - 1e-5 <= sz <= 3.0 + 1e-5 and 1.2 - 1e-5 <= sx <= 1.6 + 1e-5
        assert image.shape == labels.shape == expected.image_hu.shape


def test_sizes_and_spacings_vary(dataset):
    cases = training_cases(dataset)
    assert len({image.shape for _, image, _, _ in cases}) > 1
    assert len({spacing for *_, spacing in cases}) > 1
    for _, image, _, _ in cases:
        z, y, x = image.shape
        assert 40 <= z <= 56 and 64 <= y <= 80 and 64 <= x <= 80


# ---------------------------------------------------------------- intensities

def test_intensities_are_ct_like(dataset):
    for identifier, image, labels, _ in training_cases(dataset):
        assert image.dtype == np.int16
        assert image.min() == -1000, "air is clipped at -1000 HU"
        corner = image[:, :5, :5]
        assert np.median(corner) < -950, "outside the body is air"
        assert image.max() > 500, "the spine is bone"
        medians = {}
        for name, (low, high) in HU_BANDS.items():
            core = ndimage.binary_erosion(labels == LABELS[name])
            medians[name] = float(np.median(image[core]))
            assert low <= medians[name] <= high, (identifier, name, medians[name])
        assert medians["liver"] - medians["lesion"] >= 40, "the lesion is hypodense in the liver"
        background_body = (labels == 0) & (image > -500) & (image < 300)
        assert -40 <= np.median(image[background_body]) <= 80, "soft tissue and fat around the organs"
        assert np.count_nonzero((image > -160) & (image < -50)) > 1000, "there is fat"


def test_noise_is_present():
    image, labels = make_case(np.random.default_rng(0), (40, 64, 64), (2.5, 1.4, 1.4))
    liver_core = ndimage.binary_erosion(labels == LABELS["liver"], iterations=2)
    assert 8 <= np.std(image[liver_core]) <= 35


# ---------------------------------------------------------------- determinism

def test_same_seed_same_arrays_different_seed_different(tmp_path):
    first = write_synthetic_dataset(str(tmp_path / "a"), 1, num_train=5, num_test=1, seed=11)
    again = write_synthetic_dataset(str(tmp_path / "b"), 1, num_train=5, num_test=1, seed=11)
    other = write_synthetic_dataset(str(tmp_path / "c"), 1, num_train=5, num_test=1, seed=12)
    assert array_digest(Path(first)) == array_digest(Path(again))
    assert array_digest(Path(first)) != array_digest(Path(other))


def test_make_case_is_deterministic_per_generator():
    a = make_case(np.random.default_rng(5), (40, 64, 64), (2.5, 1.4, 1.4))
    b = make_case(np.random.default_rng(5), (40, 64, 64), (2.5, 1.4, 1.4))
    c = make_case(np.random.default_rng(6), (40, 64, 64), (2.5, 1.4, 1.4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[0].shape == a[1].shape == (40, 64, 64)


def test_a_case_does_not_depend_on_the_dataset_size():
    assert np.array_equal(generate_case(0, 3).image_hu, generate_case(0, 3).image_hu)
    assert generate_case(0, 3).identifier == "synct_003"


def test_more_held_out_cases_repeat_the_datasets_own_and_add_new_ones(dataset, tmp_path):
    own = list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))
    folder = Path(write_held_out_cases(tmp_path / "held_out", SEED, own + [2000]))
    for sub in ("imagesTs", "labelsTs"):
        names = sorted(p.name for p in (folder / sub).iterdir())
        assert names == sorted(p.name for p in (dataset / sub).iterdir()) + [
            "synct_2000_0000.nii.gz" if sub == "imagesTs" else "synct_2000.nii.gz"]
        for name in names[:-1]:  # the dataset's own test cases, voxel for voxel and with their spacing
            (a, spacing_a), (b, spacing_b) = read(folder / sub / name), read(dataset / sub / name)
            assert np.array_equal(a, b) and spacing_a == spacing_b
    new_labels, _ = read(folder / "labelsTs" / "synct_2000.nii.gz")
    assert set(np.unique(new_labels)) == set(LABELS.values())  # a complete case, every structure in it
    with pytest.raises(CompressError, match="already exists"):
        write_held_out_cases(folder, SEED, [2001])
    assert not (folder / "imagesTs" / "synct_2001_0000.nii.gz").exists()


# ---------------------------------------------------------------- safety

def test_refuses_existing_folder_without_overwrite(tmp_path):
    folder = Path(write_synthetic_dataset(str(tmp_path), 2, num_train=5, num_test=0, seed=0))
    marker = folder / "keep.txt"
    marker.write_text("user data")
    with pytest.raises(CompressError, match="overwrite=True"):
        write_synthetic_dataset(str(tmp_path), 2, num_train=5, num_test=0, seed=1)
    assert marker.read_text() == "user data"
    write_synthetic_dataset(str(tmp_path), 2, num_train=5, num_test=0, seed=1, overwrite=True)
    assert not marker.exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_failure_leaves_no_half_written_folder(tmp_path, monkeypatch):
    written = []

    def failing_write_case(folder, split, case):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(case.identifier)
        real_write_case(folder, split, case)

    real_write_case = synthetic.write_case
    monkeypatch.setattr(synthetic, "write_case", failing_write_case)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_dataset(str(tmp_path), 3, num_train=5, num_test=0)
    assert list(tmp_path.iterdir()) == []


def test_failure_with_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch):
    folder = Path(write_synthetic_dataset(str(tmp_path), 4, num_train=5, num_test=0, seed=0))
    before = array_digest(folder)

    def failing_write_dataset_json(*args):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_dataset_json", failing_write_dataset_json)
    with pytest.raises(OSError):
        write_synthetic_dataset(str(tmp_path), 4, num_train=5, num_test=0, seed=9, overwrite=True)
    assert array_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_refuses_a_second_dataset_with_the_same_id(tmp_path):
    write_synthetic_dataset(str(tmp_path), 5, name="First", num_train=5, num_test=0)
    with pytest.raises(CompressError, match="Dataset005_First"):
        write_synthetic_dataset(str(tmp_path), 5, name="Second", num_train=5, num_test=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset_id": 0}, "1..999"),
    ({"dataset_id": 1000}, "1..999"),
    ({"name": "has space"}, "letters, digits"),
    ({"num_train": 4}, "num_train >= 5"),
    ({"num_test": -1}, "num_test"),
])
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"raw_root": str(tmp_path), "dataset_id": 6, **kwargs}
    with pytest.raises(CompressError, match=message):
        write_synthetic_dataset(**args)
    assert list(tmp_path.iterdir()) == []


def test_rejects_a_grid_too_small_for_the_phantom():
    with pytest.raises(CompressError, match="at least"):
        make_case(np.random.default_rng(0), (20, 64, 64), (2.5, 1.4, 1.4))
    with pytest.raises(CompressError, match="positive"):
        make_case(np.random.default_rng(0), (40, 64, 64), (2.5, 0.0, 1.4))


def test_unlabelled_images_are_the_cases_of_those_indices(tmp_path):
    import SimpleITK as sitk

    from nnunet_compress.nnunet.synthetic import generate_case, write_unlabelled_images
    ids = write_unlabelled_images(tmp_path / "images", seed=3, indices=[20, 21])
    assert ids == ["synct_020", "synct_021"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["synct_020_0000.nii.gz",
                                                                       "synct_021_0000.nii.gz"]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "images" / "synct_021_0000.nii.gz")))
    assert np.array_equal(written, generate_case(3, 21).image_hu)
