"""``nnunet-compress prune``: one-shot L1 or Taylor filter pruning of a trained model folder, without fine-tuning.

Every fold's network is pruned step by step to the target (:func:`nnunet_compress.pruning.taylor.prune_until_target`,
the same step as the in-training pruning of ``nnUNetTrainerTaylorPruning``), on calibration patches cut from the
user's images after nnU-Net's own preprocessing; the first fold's channel counts become the plans.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from nnunet_compress.budgets.measured import pruned_layer_seconds, pruning_latency
from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet, compressed_arch_kwargs
from nnunet_compress.nnunet.calibration import preprocessed_cases, random_patches
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    check_output_location,
    configuration_name,
    input_channels_of,
    open_model_folder,
    write_json,
)
from nnunet_compress.nnunet.plans import derive_plans, resolved_configuration
from nnunet_compress.pruning.class_guard import foreground_class_names
from nnunet_compress.pruning.surgery import channel_counts
from nnunet_compress.pruning.taylor import PRUNE_METHODS, TaylorSettings, prune_until_target
from nnunet_compress.settings import check_choice
from nnunet_compress.workflows.derived_folder import write_derived_model_folder


def prune_model_folder(source: str | Path, output: str | Path, method: str, settings: TaylorSettings,
                       images: Path | None = None, folds: list[str] | None = None,
                       configuration: str | None = None, overwrite: bool = False,
                       checkpoint_name: str = CHECKPOINT_FINAL, calibration_batches: int = 8,
                       seed: int = 0, progress=print) -> dict:
    """Write a pruned copy of a trained model folder (no fine-tuning); the source is only read."""

    check_choice("--method", method, PRUNE_METHODS)
    settings.validate()
    source, output = Path(source), Path(output)
    folder = open_model_folder(source, folds, checkpoint_name)
    check_output_location(folder.path, output)
    if method == "taylor" and images is None:
        raise CompressError("Taylor pruning needs calibration images: pass -i IMAGES_FOLDER (nnU-Net naming, "
                            "e.g. imagesTr or imagesTs)")
    configuration = configuration_name(folder, configuration)
    cfg = resolved_configuration(folder.plans, configuration)
    channels_in = input_channels_of(folder.plans, folder.dataset_json, configuration)
    calibration = None
    # Taylor scores need the patches; L1 uses them only for the class guard (when -i is given)
    if method == "taylor" or (images is not None and settings.class_guard > 0):
        volumes = preprocessed_cases(Path(images), folder.plans, folder.dataset_json, configuration)
        calibration = random_patches(volumes, cfg["patch_size"], calibration_batches, seed=seed)
    results: dict[str, dict] = {}

    def derive(fold: str, net) -> tuple:
        """Prune the fold's network in place; the first fold's channel counts shape the plans."""
        if isinstance(net, CompressedUNet) and net.tucker_ranks:
            raise CompressError(f"{source} is Tucker-factorised; prune its uncompressed parent instead")
        torch.manual_seed(seed)
        progress(f"fold {fold}: {method} pruning to {settings.metric} {settings.target}")
        rollbacks: list[dict] = []
        latency = measure = terms = None
        if settings.metric == "seconds":
            original = copy.deepcopy(net)
            latency, measure, terms = pruning_latency(net, (channels_in, *cfg["patch_size"]), settings.cost_model,
                                                      settings.min_channels, settings.min_keep_fraction, progress)
        history = prune_until_target(net, settings, method, channels_in, cfg["patch_size"], calibration, progress,
                                     foreground_class_names(folder.dataset_json.get("labels", {})), rollbacks,
                                     latency, measure)
        counts = channel_counts(net)
        results[fold] = {"history": history, "channels": counts, "class_guard_rollbacks": rollbacks}
        if terms is not None:
            results[fold]["latency"] = terms.to_dict()
            results[fold]["layers"] = pruned_layer_seconds(original, net, (channels_in, *cfg["patch_size"]), terms)
        arch = compressed_arch_kwargs(cfg, channels=counts, per_fold_channels=len(folder.folds) > 1)
        return net, derive_plans(folder.plans, configuration, folder.plans.get("plans_name", "nnUNetPlans"), arch,
                                 {"method": f"{method}_oneshot", "settings": settings.to_dict()})

    def report(tmp: Path) -> None:
        write_json(tmp / "compression_report.json", {"method": method, "settings": settings.to_dict(),
                                                      "folds": results})

    write_derived_model_folder(folder, output, configuration, derive, overwrite, checkpoint_name, report)
    return results
