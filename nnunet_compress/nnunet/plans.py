"""Plan modifiers: derive a compressed plans file from a parent plans file.

A derived plans file is the parent with one configuration's ``architecture`` replaced by our
:class:`~nnunet_compress.network.CompressedUNet` and a ``nnunet_compress`` section recording how it was made.
It keeps the parent's ``data_identifier``, so nnU-Net trains on the already preprocessed data.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from nnunet_compress.errors import CompressError
from nnunet_compress.network import compressed_arch_kwargs
from nnunet_compress.nnunet.env import require_env
from nnunet_compress.nnunet.model_folder import atomic_write_file, read_json, write_json

# The configuration entry that holds everything nnunet-compress adds to a plans file (method, ranks or pruning
# settings, schedule, distillation); nnU-Net ignores keys it does not know, so the plans stay ordinary plans.
SECTION = "nnunet_compress"


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


def tucker_plans(parent_plans: dict, configuration: str, ranks: dict, policy, plans_name: str,
                 schedule: dict | None = None, budget_guard: dict | None = None, latency: dict | None = None) -> dict:
    """Parent plans with `configuration` rebuilt as a Tucker-factorised CompressedUNet."""
    arch = compressed_arch_kwargs(resolved_configuration(parent_plans, configuration), tucker_ranks=ranks)
    section: dict[str, Any] = {"method": "tucker", "rank_policy": policy.to_dict()}
    if budget_guard:
        section["budget_guard"] = budget_guard
    if latency:
        section["latency"] = latency  # what --target-latency measured: engine, threads, calibration rounds
    if schedule:
        section["schedule"] = schedule
    return derive_plans(parent_plans, configuration, plans_name, arch, section)


def pruning_plans(parent_plans: dict, configuration: str, method: str, settings: dict, plans_name: str,
                  schedule: dict | None = None) -> dict:
    """Parent plans whose network can change shape per fold while training prunes it."""
    arch = compressed_arch_kwargs(resolved_configuration(parent_plans, configuration), per_fold_channels=True)
    if arch["arch_kwargs"].get("tucker_ranks"):
        raise CompressError("the parent plans are Tucker-factorised; prune the uncompressed parent instead")
    section = {"method": method, "settings": settings}
    if schedule:
        section["schedule"] = schedule
    return derive_plans(parent_plans, configuration, plans_name, arch, section)
