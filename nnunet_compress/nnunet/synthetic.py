"""A small, deterministic, CT-like dataset in nnU-Net v2 raw format.

The demo and the end-to-end tests need a real nnU-Net model to compress, and a real model needs data that nobody
has to download, that trains to a useful Dice on two CPU cores in minutes, and that still exercises what matters
for compression: structures of very different size and shape. Each case is a torso-like phantom in Hounsfield
units with

* a large organ (``liver``),
* a small paired organ (``kidney``: two blobs either side of the spine, never touching each other),
* a thin curved tube (``vessel``),
* a small hypodense ``lesion`` that always touches the liver (the hard, class-imbalanced structure),

plus unlabelled air, subcutaneous fat, soft tissue and a bright spine, smooth intensity inhomogeneity and
Gaussian noise. Volume sizes and anisotropic spacings vary between cases as they do between scanners.

Everything is drawn from ``numpy.random.Generator`` streams keyed by ``(seed, case index)``: the same seed gives
byte-identical arrays on every run, and a case does not depend on how many other cases were generated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import atomic_output_folder

LABELS: dict[str, int] = {"background": 0, "liver": 1, "kidney": 2, "vessel": 3, "lesion": 4}

# Mean HU of each tissue (portal-venous-phase-like contrast); every case jitters them by up to +-HU_JITTER.
AIR_HU = -1000.0
HU: dict[str, float] = {"fat": -100.0, "soft_tissue": 40.0, "liver": 80.0, "kidney": 160.0, "vessel": 210.0,
                        "lesion": 5.0, "bone": 700.0, "disc": 90.0}
HU_JITTER: dict[str, float] = {"fat": 10.0, "soft_tissue": 5.0, "liver": 8.0, "kidney": 15.0, "vessel": 15.0,
                               "lesion": 5.0, "bone": 60.0, "disc": 10.0}
NOISE_SIGMA_HU = (15.0, 25.0)
INHOMOGENEITY_HU = (5.0, 15.0)
HU_RANGE = (-1000, 3071)  # what a CT scanner stores; air is clipped at exactly -1000

# Grid of each case: voxels as (z, y, x) and spacing in mm, quantised so that NIfTI's float32 header holds it.
SHAPE_RANGE = ((40, 56), (64, 80), (64, 80))
Z_SPACING_MM = (2.0, 3.0)
INPLANE_SPACING_MM = (1.2, 1.6)
SPACING_STEP_MM = 0.05
MIN_SHAPE = (40, 64, 64)  # below this the organs (fixed sizes in voxels) no longer fit inside the body

CASE_PREFIX = "synct"
FILE_ENDING = ".nii.gz"
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
MIN_TRAINING_CASES = 5  # nnU-Net's default 5-fold split needs at least one case per fold
MAX_ATTEMPTS = 25  # anatomy draws that break a rule (e.g. kidneys fused) are redrawn; this never runs out in practice

# Structure sizes in voxels ((z, y, x) ranges; fractions of the volume or body where noted). The small structures
# are as small as the tiny U-Net of demo/tiny.py (4 stages from 8 features, batch 2, patch 32x48x48, no
# augmentation) reliably learns in a short CPU run: a thinner vessel (radius below 3.5) or a smaller lesion
# (in-plane radius below 4.5) is a class some training seeds never find, which makes every Dice comparison on it
# noise. The lesion is thus a 2-3 cm lesion, the liver's smallest neighbour.
LIVER_RADII = ((0.30, 0.40), (0.50, 0.62), (0.34, 0.44))  # fractions of depth, body half-depth, body half-width
KIDNEY_RADII = ((0.20, 0.26), (6.0, 7.5), (5.0, 6.5))  # z as a fraction of the volume's depth
KIDNEY_LATERAL = (0.50, 0.58)  # centre's distance from the spine, as a fraction of the body's half-width
KIDNEY_ANTERIOR = (0.10, 0.30)  # centre in front of the spine's centre, as a fraction of the body's half-depth
VESSEL_RADIUS = (3.5, 4.5)
VESSEL_GAP = (1.5, 3.0)  # voxels between the vessel's wall and the spine
LESION_RADII = ((4.5, 6.0), (8.0, 10.0), (8.0, 10.0))
LESION_DEPTH = (0.6, 1.2)  # depth of the lesion's centre inside the liver, in in-plane lesion radii

# Fewest voxels per structure (per kidney for "kidney"); a draw where clipping by the body, the spine or another
# organ leaves less is redrawn, so that no case has a structure too small to learn.
MIN_VOXELS = {"liver": 3000, "kidney": 500, "vessel": 1000, "lesion": 500}


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: HU image and labels as (z, y, x) arrays, spacing in mm as (z, y, x)."""

    identifier: str
    image_hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class Anatomy:
    """Masks of one phantom; `labels` holds the segmentation targets, the rest only shapes the image."""

    body: np.ndarray
    inner: np.ndarray  # body without the subcutaneous fat layer
    bone: np.ndarray
    disc: np.ndarray  # intervertebral discs, the spine's low-intensity slices
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------

def write_synthetic_dataset(raw_root: str, dataset_id: int, name: str = "SyntheticCT", num_train: int = 12,
                            num_test: int = 4, seed: int = 0, overwrite: bool = False) -> str:
    """Write ``<raw_root>/Dataset{id:03d}_{name}`` (imagesTr/labelsTr, held-out imagesTs/labelsTs, dataset.json).

    The folder is assembled in a temporary sibling and renamed into place only when complete, so an interrupted
    run never leaves a half-written dataset that nnU-Net would plan on. Returns the dataset folder.
    """
    _check_request(dataset_id, name, num_train, num_test, seed)
    target = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    _refuse_existing(target, overwrite)
    _refuse_id_clash(Path(raw_root), dataset_id, target.name)
    with atomic_output_folder(target, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset folder is ordinary shared data
        for sub in SUBFOLDERS:
            (tmp / sub).mkdir()
        for index in range(num_train + num_test):
            split = "Tr" if index < num_train else "Ts"
            write_case(tmp, split, generate_case(seed, index))
        write_dataset_json(tmp, name, num_train, num_test, seed)
    return str(target)


def write_unlabelled_images(folder: str | Path, seed: int, indices) -> list[str]:
    """Only the images of cases `indices` (``<case>_0000.nii.gz``), for label-free fine-tuning.

    They stand for the scans a hospital holds without labels: drawn from the same distribution as the dataset's
    cases, and, with indices beyond ``num_train + num_test``, none of them is a case any model was trained or tested
    on. Returns the case ids.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for index in indices:
        case = generate_case(seed, int(index))
        _write_nifti(case.image_hu, case.spacing, folder / f"{case.identifier}_0000{FILE_ENDING}")
        ids.append(case.identifier)
    return ids


def write_held_out_cases(folder: str | Path, seed: int, indices, overwrite: bool = False) -> str:
    """A held-out test set of its own: ``imagesTs/`` and ``labelsTs/`` of cases `indices` of the dataset with `seed`.

    Why: a dataset's few test cases make a noisy estimate of a model's Dice (the demo has four), so a benchmark
    that compares runs can grade the same models on more cases. Indices in the dataset's test range give its own
    test cases again, identical voxel for voxel (every case has its own random stream); indices beyond every range
    a model was trained on give new cases of the same distribution. Written atomically; returns the folder.
    """
    target = Path(folder)
    if target.exists() and not overwrite:
        raise CompressError(f"held-out folder {target} already exists; pass overwrite=True to replace it")
    with atomic_output_folder(target, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)
        for sub in ("imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for index in indices:
            write_case(tmp, "Ts", generate_case(seed, int(index)))
    return str(target)


def generate_case(seed: int, index: int) -> SyntheticCase:
    """Case number `index` of the dataset with `seed`, independent of how many cases are generated around it."""
    rng = case_rng(seed, index)
    shape, spacing = sample_grid(rng)
    image, labels = make_case(rng, shape, spacing)
    return SyntheticCase(case_identifier(index), image, labels, spacing)


def case_identifier(index: int) -> str:
    return f"{CASE_PREFIX}_{index:03d}"


def case_rng(seed: int, index: int) -> np.random.Generator:
    """A random stream of its own per case, so that cases are reproducible one by one."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def sample_grid(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Volume shape (z, y, x) and anisotropic spacing (z, y, x) in mm, varied like scans from different scanners."""
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in SHAPE_RANGE)
    z = _quantised_spacing(rng.uniform(*Z_SPACING_MM))
    inplane = _quantised_spacing(rng.uniform(*INPLANE_SPACING_MM))
    return shape, (z, inplane, inplane)


def make_case(rng: np.random.Generator, shape: tuple[int, int, int],
              spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom on the given grid: (image in HU as int16, labels as uint8), both (z, y, x).

    Shapes are defined in voxels, so every structure is big enough in voxels for a tiny network whatever the
    spacing; the spacing only scales the things a scanner would (partial-volume blur, disc spacing).
    """
    shape = _checked_shape(shape)
    spacing = _checked_spacing(spacing)
    anatomy = sample_anatomy(rng, shape)
    image = render_ct(rng, anatomy, spacing)
    return image, anatomy.labels


def sample_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> Anatomy:
    """Draw organ shapes until they satisfy the dataset's rules (see `anatomy_problems`)."""
    problems: list[str] = []
    for _ in range(MAX_ATTEMPTS):
        anatomy = _draw_anatomy(rng, shape)
        problems = anatomy_problems(anatomy.labels)
        if not problems:
            return anatomy
    raise RuntimeError(f"no valid phantom in {MAX_ATTEMPTS} draws for shape {shape}: {problems}")


def anatomy_problems(labels: np.ndarray) -> list[str]:
    """Rules every case keeps, so that tests and training can rely on them: all labels present and big enough,
    exactly two separate kidneys, and a lesion that touches the liver."""
    problems = [f"{name} has {count} voxels (< {MIN_VOXELS[name]})"
                for name, count in ((n, int(np.count_nonzero(labels == LABELS[n]))) for n in MIN_VOXELS)
                if count < MIN_VOXELS[name]]
    kidney_parts = connected_components(labels == LABELS["kidney"])
    if len(kidney_parts) != 2:
        problems.append(f"kidney has {len(kidney_parts)} connected components, not 2")
    elif min(kidney_parts) < MIN_VOXELS["kidney"]:
        problems.append(f"a kidney has only {min(kidney_parts)} voxels")
    if not touches(labels == LABELS["lesion"], labels == LABELS["liver"]):
        problems.append("lesion does not touch the liver")
    return problems


def connected_components(mask: np.ndarray) -> list[int]:
    """Voxel counts of the 26-connected components of `mask` (26: diagonal contact counts as touching)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return [int(c) for c in np.bincount(components.ravel(), minlength=count + 1)[1:]]


def touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether some voxel of `a` is a face neighbour (6-connectivity) of some voxel of `b`."""
    return bool(np.any(ndimage.binary_dilation(a, structure=ndimage.generate_binary_structure(3, 1)) & b))


# --------------------------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------------------------

def _draw_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> Anatomy:
    """Body, spine and organs placed relative to each other like an axial abdominal scan.

    Array axes are (z, y, x) with y growing posteriorly and x towards the patient's left (LPS), so the spine sits
    at large y, the liver at small x. Organs are painted in a fixed order (liver, kidneys, vessel, lesion) and
    never over bone.
    """
    coords = np.indices(shape, dtype=np.float32)
    wobble = _smooth_noise(rng, shape, cells=(3, 4, 4))
    body, inner, (cy, cx, by, bx) = _body(rng, coords, shape)
    bone, disc, (sy, sx, spine_r) = _spine(rng, coords, shape, (cy, cx, by))
    soft = inner & ~ndimage.binary_dilation(bone | disc, iterations=1)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[_liver(rng, coords, shape, wobble, (cy, cx, by, bx)) & soft] = LABELS["liver"]
    labels[_kidneys(rng, coords, shape, wobble, (sy, sx, by, bx)) & soft] = LABELS["kidney"]
    labels[_vessel(rng, coords, shape, (sy, sx, spine_r)) & soft] = LABELS["vessel"]
    lesion = _lesion(rng, coords, labels == LABELS["liver"])
    labels[lesion & soft & np.isin(labels, (LABELS["background"], LABELS["liver"]))] = LABELS["lesion"]
    return Anatomy(body=body, inner=inner, bone=bone, disc=disc, labels=labels)


def _body(rng: np.random.Generator, coords: np.ndarray,
          shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Elliptic cylinder along z (slightly tapered) and, inside it, the body without its fat layer."""
    nz, ny, nx = shape
    cy, cx = ny / 2 + rng.uniform(-2, 2), nx / 2 + rng.uniform(-2, 2)
    by, bx = rng.uniform(0.34, 0.40) * ny, rng.uniform(0.42, 0.46) * nx
    taper = 1 + rng.uniform(-0.08, 0.08) * (coords[0] / nz - 0.5)
    fat = rng.uniform(2.0, 3.5)
    _, y, x = coords
    body = ((y - cy) / (by * taper)) ** 2 + ((x - cx) / (bx * taper)) ** 2 <= 1
    inner = ((y - cy) / (by * taper - fat)) ** 2 + ((x - cx) / (bx * taper - fat)) ** 2 <= 1
    return body, inner, (cy, cx, by, bx)


def _spine(rng: np.random.Generator, coords: np.ndarray, shape: tuple[int, int, int],
           body: tuple) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Vertebral column: a posterior cylinder of bone interrupted by discs every few slices (unlabelled)."""
    cy, cx, by = body
    sy, sx = cy + rng.uniform(0.50, 0.58) * by, cx + rng.uniform(-1, 1)
    radius = rng.uniform(0.16, 0.20) * by
    _, y, x = coords
    column = (y - sy) ** 2 + (x - sx) ** 2 <= radius ** 2
    period = int(rng.integers(7, 10))
    disc_slices = (np.arange(shape[0]) + int(rng.integers(0, period))) % period == 0
    disc = column & disc_slices[:, None, None]
    return column & ~disc, disc, (sy, sx, radius)


def _liver(rng: np.random.Generator, coords: np.ndarray, shape: tuple[int, int, int], wobble: np.ndarray,
           body: tuple) -> np.ndarray:
    """Large, irregular ellipsoid in the right upper abdomen (small x, anterior half)."""
    nz = shape[0]
    cy, cx, by, bx = body
    center = (rng.uniform(0.42, 0.58) * nz, cy - rng.uniform(0.05, 0.25) * by, cx - rng.uniform(0.30, 0.42) * bx)
    radii = (rng.uniform(*LIVER_RADII[0]) * nz, rng.uniform(*LIVER_RADII[1]) * by, rng.uniform(*LIVER_RADII[2]) * bx)
    return _ellipsoid(coords, center, radii, _random_rotation(rng, 35, 15), wobble, 0.25)


def _kidneys(rng: np.random.Generator, coords: np.ndarray, shape: tuple[int, int, int], wobble: np.ndarray,
             spine: tuple) -> np.ndarray:
    """Two small ellipsoids either side of the spine, each with its own size, level and tilt."""
    nz = shape[0]
    sy, sx, by, bx = spine
    mask = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        center = (rng.uniform(0.38, 0.62) * nz, sy - rng.uniform(*KIDNEY_ANTERIOR) * by,
                  sx + side * rng.uniform(*KIDNEY_LATERAL) * bx)
        radii = (rng.uniform(*KIDNEY_RADII[0]) * nz, rng.uniform(*KIDNEY_RADII[1]), rng.uniform(*KIDNEY_RADII[2]))
        mask |= _ellipsoid(coords, center, radii, _random_rotation(rng, 25, 12), wobble, 0.12)
    return mask


def _vessel(rng: np.random.Generator, coords: np.ndarray, shape: tuple[int, int, int], spine: tuple) -> np.ndarray:
    """Curved tube along z just anterior to the spine (an aorta) with a sinusoidal path."""
    nz = shape[0]
    sy, sx, spine_r = spine
    radius = rng.uniform(*VESSEL_RADIUS)
    amp_x, amp_y = rng.uniform(1.5, 3.5), rng.uniform(0.5, 1.5)
    z = np.arange(nz, dtype=np.float32)
    path_x = sx + rng.uniform(-1.5, 2.5) + amp_x * np.sin(2 * np.pi * z / (rng.uniform(1.0, 2.0) * nz)
                                                          + rng.uniform(0, 2 * np.pi))
    y0 = sy - spine_r - radius - amp_y - rng.uniform(*VESSEL_GAP)
    path_y = y0 + amp_y * np.sin(2 * np.pi * z / (rng.uniform(1.0, 2.0) * nz) + rng.uniform(0, 2 * np.pi))
    _, y, x = coords
    return (y - path_y[:, None, None]) ** 2 + (x - path_x[:, None, None]) ** 2 <= radius ** 2


def _lesion(rng: np.random.Generator, coords: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """Small ellipsoid centred inside the liver near its surface, so it always touches the liver and may bulge out.

    The centre is drawn among liver voxels LESION_DEPTH lesion radii deep, which keeps the lesion mostly inside the
    organ (where its contrast against liver makes it learnable) without swallowing the organ."""
    radii = tuple(rng.uniform(low, high) for low, high in LESION_RADII)
    if not liver.any():
        return np.zeros(liver.shape, dtype=bool)
    depth = ndimage.distance_transform_edt(liver)
    candidates = np.argwhere(liver & (depth >= LESION_DEPTH[0] * radii[1])
                             & (depth <= LESION_DEPTH[1] * radii[1]))
    if len(candidates) == 0:
        return np.zeros(liver.shape, dtype=bool)
    center = candidates[rng.integers(len(candidates))].astype(np.float32)
    return _ellipsoid(coords, tuple(center), radii, _random_rotation(rng, 90, 20))


def _ellipsoid(coords: np.ndarray, center: tuple, radii: tuple, rotation: np.ndarray,
               wobble: np.ndarray | None = None, wobble_amount: float = 0.0) -> np.ndarray:
    """Rotated ellipsoid in voxel coordinates; `wobble` (a smooth field in [-1, 1]) makes its surface irregular."""
    offsets = coords - np.asarray(center, dtype=np.float32)[:, None, None, None]
    local = np.einsum("ji,j...->i...", rotation.astype(np.float32), offsets)
    level = sum((local[i] / radii[i]) ** 2 for i in range(3))
    threshold = 1.0 if wobble is None else 1.0 + wobble_amount * wobble
    return level <= threshold


def _random_rotation(rng: np.random.Generator, max_inplane_deg: float, max_tilt_deg: float) -> np.ndarray:
    """Rotation of (z, y, x) offsets: mostly in the axial plane, a little out of it, as organs lie in a torso."""
    inplane, tilt_zy, tilt_zx = np.deg2rad([rng.uniform(-max_inplane_deg, max_inplane_deg),
                                            rng.uniform(-max_tilt_deg, max_tilt_deg),
                                            rng.uniform(-max_tilt_deg, max_tilt_deg)])
    return _plane_rotation(1, 2, inplane) @ _plane_rotation(0, 1, tilt_zy) @ _plane_rotation(0, 2, tilt_zx)


def _plane_rotation(a: int, b: int, angle: float) -> np.ndarray:
    rotation = np.eye(3)
    c, s = np.cos(angle), np.sin(angle)
    rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
    return rotation


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse Gaussian noise upsampled with cubic splines (cheap, no large blur)."""
    coarse = rng.standard_normal(tuple(c + 2 for c in cells))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3, mode="nearest",
                         grid_mode=True)
    field = _fit_shape(field, shape)
    return (field / max(float(np.abs(field).max()), 1e-6)).astype(np.float32)


def _fit_shape(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Crop or edge-pad to `shape` (zoom's rounding can be one voxel off)."""
    array = array[tuple(slice(0, s) for s in shape)]
    return np.pad(array, [(0, s - a) for s, a in zip(shape, array.shape)], mode="edge")


# --------------------------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------------------------

def render_ct(rng: np.random.Generator, anatomy: Anatomy, spacing: tuple[float, float, float]) -> np.ndarray:
    """Paint tissue HU, blur like a scanner's point spread, add a smooth bias and noise; int16 clipped to CT range."""
    hu = {tissue: HU[tissue] + rng.uniform(-HU_JITTER[tissue], HU_JITTER[tissue]) for tissue in HU}
    image = np.full(anatomy.labels.shape, AIR_HU, dtype=np.float32)
    image[anatomy.body] = hu["fat"]
    image[anatomy.inner] = hu["soft_tissue"]
    image[_perirenal_fat(anatomy)] = hu["fat"]
    image[anatomy.bone] = hu["bone"]
    image[anatomy.disc] = hu["disc"]
    for name in ("liver", "kidney", "vessel", "lesion"):
        image[anatomy.labels == LABELS[name]] = hu[name]
    # partial-volume blur of ~0.8 mm: thinner in voxels along the coarse z axis
    image = ndimage.gaussian_filter(image, sigma=[0.8 / s for s in spacing], mode="nearest")
    bias = rng.uniform(*INHOMOGENEITY_HU) * _smooth_noise(rng, anatomy.labels.shape, cells=(1, 2, 2))
    image += np.where(anatomy.body, bias, 0.0).astype(np.float32)
    image += rng.normal(0.0, rng.uniform(*NOISE_SIGMA_HU), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), *HU_RANGE).astype(np.int16)


def _perirenal_fat(anatomy: Anatomy) -> np.ndarray:
    """A thin fat rim around the kidneys, as in real CT; it gives the kidney boundary its contrast."""
    kidneys = anatomy.labels == LABELS["kidney"]
    rim = ndimage.binary_dilation(kidneys, iterations=2) & ~kidneys
    return rim & anatomy.inner & (anatomy.labels == LABELS["background"])


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------

def write_case(dataset_folder: Path, split: str, case: SyntheticCase) -> None:
    """imagesXx/<case>_0000.nii.gz and labelsXx/<case>.nii.gz with the case's spacing in the headers."""
    image_file = dataset_folder / f"images{split}" / f"{case.identifier}_0000{FILE_ENDING}"
    _write_nifti(case.image_hu, case.spacing, image_file)
    _write_nifti(case.labels, case.spacing, dataset_folder / f"labels{split}" / f"{case.identifier}{FILE_ENDING}")


def _write_nifti(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """SimpleITK takes arrays as (z, y, x) but spacing and origin as (x, y, z)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    nz, ny, nx = array.shape
    image.SetOrigin((-nx * spacing[2] / 2, -ny * spacing[1] / 2, 0.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_dataset_json(dataset_folder: Path, name: str, num_train: int, num_test: int, seed: int) -> None:
    """The keys nnU-Net requires (channel "CT" selects its CT normalisation), plus a description for people."""
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": num_train,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": f"Synthetic CT-like phantoms from nnunet_compress.nnunet.synthetic (seed {seed}); "
                       f"{num_test} held-out cases in imagesTs/labelsTs.",
        "numTest": num_test,
        "licence": "CC0",
    }
    with open(dataset_folder / "dataset.json", "w") as f:
        json.dump(dataset_json, f, indent=2)


# --------------------------------------------------------------------------------------------------------------
# Checks of user input
# --------------------------------------------------------------------------------------------------------------

def _check_request(dataset_id: int, name: str, num_train: int, num_test: int, seed: int) -> None:
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise CompressError(f"dataset_id {dataset_id!r} is not an nnU-Net dataset id; use an integer in 1..999")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise CompressError(f"dataset name {name!r} is not usable in a folder name Dataset{dataset_id:03d}_<name>; "
                            "use letters, digits, '_' and '-' only")
    if not isinstance(num_train, (int, np.integer)) or num_train < MIN_TRAINING_CASES:
        raise CompressError(f"num_train={num_train!r}: nnU-Net's 5-fold split needs at least {MIN_TRAINING_CASES} "
                            f"training cases; pass num_train >= {MIN_TRAINING_CASES}")
    if not isinstance(num_test, (int, np.integer)) or num_test < 0:
        raise CompressError(f"num_test={num_test!r} must be a non-negative integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CompressError(f"seed={seed!r} must be a non-negative integer")


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise CompressError(f"dataset folder {target} already exists; pass overwrite=True to replace it, or choose "
                            "another dataset_id or raw_root")


def _refuse_id_clash(raw_root: Path, dataset_id: int, folder_name: str) -> None:
    """nnU-Net resolves a dataset by its id alone and fails when two folders share it."""
    if not raw_root.is_dir():
        return
    others = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name)
    if others:
        raise CompressError(f"{raw_root} already holds {', '.join(others)} with dataset id {dataset_id}; nnU-Net "
                            "could not tell the two apart. Choose another dataset_id or remove that folder")


def _checked_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise CompressError(f"shape {shape} is too small for the phantom; use a (z, y, x) shape of at least "
                            f"{MIN_SHAPE}")
    return shape


def _checked_spacing(spacing) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise CompressError(f"spacing {spacing} must be three positive numbers in mm, ordered (z, y, x)")
    return spacing


def _quantised_spacing(value: float) -> float:
    return round(round(value / SPACING_STEP_MM) * SPACING_STEP_MM, 4)
