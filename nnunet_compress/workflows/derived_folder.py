"""The one routine that writes a model folder derived from a trained one: new plans, every fold's weights, atomically.

Tucker compression, one-shot pruning and the engine conversion (``nnunet-compress convert``) all produce the same
kind of output: the parent's ``dataset.json`` and metadata, a ``plans.json`` whose configuration names
:class:`~nnunet_compress.network.CompressedUNet`, and per fold a checkpoint whose weights fit those plans. They
differ only in how one fold's network becomes the derived one, which they pass in as `derive`; everything else is
written here, so all three keep the same safety rules: the source is only read, the output appears in one rename
or not at all, and a failure in any fold leaves nothing behind.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from torch import nn

from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    ModelFolder,
    atomic_output_folder,
    build_network,
    copy_folder_metadata,
    load_fold_network,
    save_checkpoint,
    write_json,
)
from nnunet_compress.progress import bar

# (fold, parent network with its trained weights) -> (derived network, the plans it fits); the first fold's plans
# are written, every later fold must fit them
DeriveFold = Callable[[str, nn.Module], tuple[nn.Module, dict]]
# called once per fold with (fold, parent network, relative reconstruction error per factorised layer)
FoldCallback = Callable[[str, nn.Module, dict], None]


def write_derived_model_folder(folder: ModelFolder, output: Path, configuration: str, derive: DeriveFold,
                               overwrite: bool = False, checkpoint_name: str = CHECKPOINT_FINAL,
                               finish: Callable[[Path], None] | None = None,
                               first_fold: tuple[nn.Module, dict] | None = None) -> dict:
    """Write `output` from `folder`, each fold's network passed through `derive`; returns the plans written.

    `finish(tmp)` adds files (reports) before the rename. `first_fold` = (network, checkpoint) of the first fold
    when the caller already loaded it (saves a load). Parents are built without deep supervision, as nnU-Net's
    predictor builds them.
    """
    fold_names = list(folder.folds)
    plans = None
    with atomic_output_folder(output, overwrite) as tmp:
        for fold in bar(fold_names, f"writing {output.name}", "fold"):
            if first_fold is not None and fold == fold_names[0]:
                parent, checkpoint = first_fold
            else:
                parent, checkpoint, _ = load_fold_network(folder, fold, configuration)
            network, fold_plans = derive(fold, parent)
            if plans is None:
                plans = fold_plans
                write_json(tmp / "plans.json", plans)
                copy_folder_metadata(folder.path, tmp)
            save_checkpoint(derived_checkpoint(checkpoint, network, plans), tmp / f"fold_{fold}" / checkpoint_name)
        if finish is not None:
            finish(tmp)
    return plans


def rebuilt_from_plans(plans: dict, dataset_json: dict, configuration: str,
                       on_fold: FoldCallback | None = None) -> DeriveFold:
    """The `derive` of Tucker and convert: build the network `plans` describe and fill it from the parent's weights
    (:meth:`CompressedUNet.load_parent_weights`: decomposed where the plans factorise a layer, copied elsewhere)."""
    def derive(fold: str, parent: nn.Module) -> tuple[nn.Module, dict]:
        derived = build_network(plans, dataset_json, configuration, deep_supervision=False)
        errors = derived.load_parent_weights(parent.state_dict())
        if on_fold is not None:
            on_fold(fold, parent, errors)
        return derived, plans
    return derive


def derived_checkpoint(checkpoint: dict, network: nn.Module, plans: dict) -> dict:
    """The parent's checkpoint with the derived weights; optimizer state dropped (its shapes may no longer fit)."""
    out = {k: v for k, v in checkpoint.items() if k not in ("network_weights", "optimizer_state", "grad_scaler_state")}
    out["network_weights"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    out["optimizer_state"] = None
    out["grad_scaler_state"] = None
    init_args = copy.deepcopy(checkpoint.get("init_args", {}))
    if "plans" in init_args:
        init_args["plans"] = plans
    out["init_args"] = init_args
    return out
