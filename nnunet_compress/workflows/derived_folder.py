"""Write a model folder derived from a trained one: new plans, every fold's weights carried over, atomically.

Both Tucker compression and the engine conversion (``nnunet-compress convert``) produce the same kind of output:
the parent's ``dataset.json`` and metadata, a ``plans.json`` whose configuration names
:class:`~nnunet_compress.network.CompressedUNet`, and per fold a checkpoint whose weights were derived from the
parent's by :meth:`CompressedUNet.load_parent_weights` (decomposed where the plans factorise a layer, copied where
they do not). One routine writes it, so both share the safety rules: the source is only read, the output appears
in one rename or not at all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from torch import nn

from nnunet_compress.nnunet.model_folder import (
    ModelFolder,
    atomic_output_folder,
    build_network,
    copy_folder_metadata,
    load_fold_network,
    save_checkpoint,
    write_json,
)

# called once per fold with (fold, parent network, relative reconstruction error per factorised layer)
FoldCallback = Callable[[str, nn.Module, dict], None]


def write_derived_model_folder(folder: ModelFolder, output: Path, plans: dict, configuration: str,
                               overwrite: bool, checkpoint_name: str, on_fold: FoldCallback | None = None,
                               finish: Callable[[Path], None] | None = None,
                               first_fold: tuple[nn.Module, dict] | None = None) -> None:
    """Write `output` from `folder` with `plans`; `finish(tmp)` adds files (reports) before the rename.

    `first_fold` = (network, checkpoint) of the first fold when the caller already loaded it (saves a load).
    """
    fold_names = list(folder.folds)
    with atomic_output_folder(output, overwrite) as tmp:
        write_json(tmp / "plans.json", plans)
        copy_folder_metadata(folder.path, tmp)
        for fold in fold_names:
            if first_fold is not None and fold == fold_names[0]:
                parent, checkpoint = first_fold
            else:
                parent, checkpoint, _ = load_fold_network(folder, fold, configuration)
            derived = build_network(plans, folder.dataset_json, configuration, deep_supervision=False)
            errors = derived.load_parent_weights(parent.state_dict())
            save_checkpoint(derived_checkpoint(checkpoint, derived, plans), tmp / f"fold_{fold}" / checkpoint_name)
            if on_fold is not None:
                on_fold(fold, parent, errors)
        if finish is not None:
            finish(tmp)


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
