"""TotalSegmentator's networks as nnU-Net plans: the architecture table and the test stand-ins are built from here.

TotalSegmentator's weights cannot be downloaded on every machine (and never at test time), yet two things need its
exact architectures: the benchmark that checks our parameter/FLOP counts against the Tucker paper's published ones,
and the tests that run TotalSegmentator's own code on a compressed home. Both build the networks from the plans
written here, with nnU-Net's own ``get_network_from_plans``, so they see what nnU-Net builds from the shipped plans.

Facts (checked against totalsegmentator 2.18; written out in docs/totalsegmentator_architecture.md): PlainConvUNet,
3x3x3 kernels, stride 2 after the first stage, 2 convolutions per stage in encoder and decoder, conv bias, affine
InstanceNorm, LeakyReLU, 2x2x2 transposed convs. 1.5 mm part models: 6 stages 32-64-128-256-320-320, patch 128^3.
3 mm ``--fast`` model: 5 stages 32...320, patch 112x112x128. The plans are written in the nnU-Net 2.1 format
(``UNet_class_name``, ``pool_op_kernel_sizes`` ...) that TotalSegmentator's v2 weights ship with (its nnunet.py
silences nnU-Net's "old plans format" warning for them); nnU-Net >= 2.2 converts that format itself, and so does our
compression, so both formats are exercised.

The label names come from the installed TotalSegmentator, so they match what its code maps back to class names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# dataset id -> (TotalSegmentator class-map key, resolution); ids and trainers per TotalSegmentator's task table
PART_MODELS = {291: "class_map_part_organs", 292: "class_map_part_vertebrae", 293: "class_map_part_cardiac",
               294: "class_map_part_muscles", 295: "class_map_part_ribs"}


@dataclass(frozen=True)
class Architecture:
    """One TotalSegmentator network shape."""

    name: str
    n_stages: int
    spacing_mm: float
    patch_size: tuple[int, int, int]
    num_outputs: int  # including background

    @property
    def features(self) -> list[int]:
        return [min(32 * 2 ** i, 320) for i in range(self.n_stages)]


ARCH_1_5MM_ORGANS = Architecture("1.5 mm (organs, id 291)", 6, 1.5, (128, 128, 128), 25)
ARCH_3MM = Architecture("3 mm (--fast, id 297)", 5, 3.0, (112, 112, 128), 118)

# The Tucker paper's counts (fvcore: one multiply-add = one FLOP; docs/totalsegmentator_architecture.md).
# None = not published.
PUBLISHED = {
    ARCH_1_5MM_ORGANS.name: {"params_M": {None: 31.19, 0.3: 3.69}, "GFLOPs": {None: 480.6, 0.3: 65.0}},
    ARCH_3MM.name: {"params_M": {None: 16.55, 0.3: 1.98}, "GFLOPs": {None: 369.1}},
}


def old_format_plans(dataset_name: str, arch: Architecture, patch_size: tuple[int, int, int] | None = None,
                     plans_name: str = "nnUNetPlans") -> dict:
    """nnU-Net 2.1-style plans for `arch` (the format TotalSegmentator's v2 weights ship with).

    `patch_size` overrides the architecture's patch (tests shrink it to keep CPU inference cheap; the network is
    the same, only the sliding window is smaller).
    """
    n = arch.n_stages
    patch = list(patch_size or arch.patch_size)
    spacing = [arch.spacing_mm] * 3
    resampling = "resample_data_or_seg_to_shape"
    configuration = {
        "data_identifier": f"{plans_name}_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [int(round(300 * 1.5 / arch.spacing_mm))] * 3,
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": 32,
        "n_conv_per_stage_encoder": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "num_pool_per_axis": [n - 1] * 3,
        "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "conv_kernel_sizes": [[3, 3, 3]] * n,
        "unet_max_num_features": 320,
        "resampling_fn_data": resampling,
        "resampling_fn_seg": resampling,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": resampling,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": configuration["median_image_size_in_voxels"],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 100.0, "median": 60.0, "min": -1024.0, "percentile_00_5": -1000.0,
            "percentile_99_5": 1500.0, "std": 300.0}},
    }


def dataset_json(class_names: dict[int, str], num_training: int = 1000) -> dict:
    """nnU-Net v2 dataset.json with background plus `class_names` ({label value: name})."""
    labels = {"background": 0}
    labels.update({name: int(value) for value, name in sorted(class_names.items())})
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": num_training, "file_ending": ".nii.gz"}


def class_names_for(task_id: int) -> dict[int, str]:
    """Label value -> name of TotalSegmentator dataset `task_id` (part models: their part; 297/298: all classes)."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts
    if task_id in PART_MODELS:
        return dict(class_map_5_parts[PART_MODELS[task_id]])
    if task_id in (297, 298):
        return dict(class_map["total"])
    raise ValueError(f"no class map known for TotalSegmentator dataset {task_id}")


def architecture_for(task_id: int) -> Architecture:
    """The architecture of a TotalSegmentator 'total' dataset, with that dataset's number of outputs."""
    outputs = len(class_names_for(task_id)) + 1
    if task_id in PART_MODELS:
        return Architecture(f"1.5 mm (id {task_id})", 6, 1.5, (128, 128, 128), outputs)
    if task_id == 297:
        return copy.copy(ARCH_3MM)
    raise ValueError(f"no architecture recorded for TotalSegmentator dataset {task_id}")
