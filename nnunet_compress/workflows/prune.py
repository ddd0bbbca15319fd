"""Taylor first-order (and L1) filter pruning of nnU-Net networks: settings, pruning steps, one-shot CLI.

The in-training loop lives in ``trainers/nnUNetTrainerTaylorPruning.py``; this module holds what it shares with
the post-training ``nnunet-compress prune`` command: the settings recorded in the plans, one pruning step (score,
rank, remove) and the stopping rule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet, compressed_arch_kwargs
from nnunet_compress.nnunet.calibration import preprocessed_cases, random_patches
from nnunet_compress.nnunet.model_folder import (
    atomic_output_folder,
    check_output_location,
    copy_folder_metadata,
    input_channels_of,
    load_fold_network,
    open_model_folder,
    save_checkpoint,
    write_json,
)
from nnunet_compress.nnunet.plans import derive_plans, resolved_configuration
from nnunet_compress.pruning.class_guard import foreground_class_names
from nnunet_compress.pruning.surgery import channel_counts
from nnunet_compress.pruning.taylor import TaylorSettings, prune_until_target
from nnunet_compress.workflows.derived_folder import derived_checkpoint


def prune_model_folder(source: str | Path, output: str | Path, method: str, settings: TaylorSettings,
                       images: Path | None = None, folds: list[str] | None = None,
                       configuration: str | None = None, overwrite: bool = False,
                       checkpoint_name: str = "checkpoint_final.pth", calibration_batches: int = 8,
                       seed: int = 0, progress=print) -> dict:
    """Write a pruned copy of a trained model folder (no fine-tuning); the source is only read."""

    if method not in ("taylor", "l1"):
        raise CompressError(f"--method {method!r} unknown; choose taylor or l1")
    settings.validate()
    source, output = Path(source), Path(output)
    folder = open_model_folder(source, folds, checkpoint_name)
    check_output_location(folder.path, output)
    if method == "taylor" and images is None:
        raise CompressError("Taylor pruning needs calibration images: pass -i IMAGES_FOLDER (nnU-Net naming, "
                            "e.g. imagesTr or imagesTs)")
    results, plans = {}, None
    with atomic_output_folder(output, overwrite) as tmp:
        for fold in folder.folds:
            net, checkpoint, configuration = load_fold_network(folder, fold, configuration, deep_supervision=False)
            if isinstance(net, CompressedUNet) and net.tucker_ranks:
                raise CompressError(f"{source} is Tucker-factorised; prune its uncompressed parent instead")
            cfg = resolved_configuration(folder.plans, configuration)
            channels_in = input_channels_of(folder.plans, folder.dataset_json, configuration)
            calibration = None
            # Taylor scores need the patches; L1 uses them only for the class guard (when -i is given)
            if method == "taylor" or (images is not None and settings.class_guard > 0):
                volumes = preprocessed_cases(Path(images), folder.plans, folder.dataset_json, configuration)
                calibration = random_patches(volumes, cfg["patch_size"], calibration_batches, seed=seed)
            torch.manual_seed(seed)
            progress(f"fold {fold}: {method} pruning to {settings.metric} {settings.target}")
            rollbacks: list[dict] = []
            history = prune_until_target(net, settings, method, channels_in, cfg["patch_size"], calibration, progress,
                                         foreground_class_names(folder.dataset_json.get("labels", {})), rollbacks)
            counts = channel_counts(net)
            if plans is None:
                arch = compressed_arch_kwargs(cfg, channels=counts, per_fold_channels=len(folder.folds) > 1)
                plans = derive_plans(folder.plans, configuration, folder.plans.get("plans_name", "nnUNetPlans"), arch,
                                     {"method": f"{method}_oneshot", "settings": settings.to_dict()})
                write_json(tmp / "plans.json", plans)
                copy_folder_metadata(folder.path, tmp)
            save_checkpoint(derived_checkpoint(checkpoint, net, plans), tmp / f"fold_{fold}" / checkpoint_name)
            results[fold] = {"history": history, "channels": counts, "class_guard_rollbacks": rollbacks}
        write_json(tmp / "compression_report.json", {"method": method, "settings": settings.to_dict(),
                                                      "folds": results})
    return results
