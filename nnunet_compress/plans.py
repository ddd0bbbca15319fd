"""Plan modifiers: derive a compressed plans file from a parent plans file.

A derived plans file is the parent with one configuration's ``architecture`` replaced by our
:class:`~nnunet_compress.network.CompressedUNet` and a ``nnunet_compress`` section recording how it was made.
It keeps the parent's ``data_identifier``, so nnU-Net trains on the already preprocessed data.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from nnunet_compress.errors import CompressError
from nnunet_compress.model_folder import atomic_write_file, read_json, write_json
from nnunet_compress.training import SECTION


def resolved_configuration(plans: dict, configuration: str) -> dict:
    """The configuration with nnU-Net's ``inherits_from`` resolved (read-only view)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if configuration not in plans.get("configurations", {}):
        raise CompressError(f"configuration {configuration!r} does not exist in plans {plans.get('plans_name')!r} "
                            f"(it has: {', '.join(plans.get('configurations', {}))})")
    return PlansManager(plans).get_configuration(configuration).configuration


def derive_plans(parent_plans: dict, configuration: str, plans_name: str, architecture: dict,
                 section: dict[str, Any]) -> dict:
    """A new plans dict: the parent with `configuration` compressed; the parent dict is not modified."""
    parent_cfg = resolved_configuration(parent_plans, configuration)
    plans = copy.deepcopy(parent_plans)
    plans["plans_name"] = plans_name
    cfg = copy.deepcopy(parent_cfg)
    cfg.pop("inherits_from", None)
    cfg["architecture"] = architecture
    cfg[SECTION] = {**section, "parent_plans": parent_plans.get("plans_name")}
    plans["configurations"][configuration] = cfg
    return plans


def preprocessed_dataset_folder(dataset: str | int) -> Path:
    from nnunet_compress.nnunet_env import require_env
    root = require_env("nnUNet_preprocessed")["nnUNet_preprocessed"]
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise CompressError(f"dataset {dataset} not found in nnUNet_preprocessed ({root}); run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset} first") from None
    folder = root / name
    if not folder.is_dir():
        raise CompressError(f"{folder} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return folder


def read_parent_plans(dataset: str | int, plans_name: str) -> tuple[Path, dict]:
    folder = preprocessed_dataset_folder(dataset)
    path = folder / f"{plans_name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.json") if "Plans" in p.stem or "plans" in p.stem)
        raise CompressError(f"plans {path} not found (available: {', '.join(available) or 'none'}); pass the "
                            f"parent plans with -p")
    return folder, read_json(path)


def write_plans_beside(folder: Path, plans: dict, overwrite: bool = False) -> Path:
    """Write `plans` as <folder>/<plans_name>.json atomically; never overwrite the parent silently."""
    path = folder / f"{plans['plans_name']}.json"
    if path.exists() and not overwrite:
        raise CompressError(f"{path} already exists; pass --overwrite or choose another --plans-name")
    atomic_write_file(path, lambda tmp: write_json(tmp, plans))
    return path


def format_number_tag(value: float) -> str:
    """0.3 -> '0.3', 0.125 -> '0.125': short, filename-safe plans-name suffixes."""
    text = f"{value:g}"
    if os.sep in text or " " in text:
        raise CompressError(f"cannot make a plans name from {value!r}; pass --plans-name")
    return text
