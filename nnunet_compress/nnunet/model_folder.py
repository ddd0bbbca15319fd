"""Reading nnU-Net model folders and writing new ones safely.

A model folder is what ``nnUNetv2_predict_from_modelfolder`` takes: ``plans.json`` + ``dataset.json`` +
``fold_*/checkpoint_*.pth``. Users point our tools at clinical model folders they cannot afford to damage, so
reading never writes, and every output folder is assembled in a temporary sibling and renamed into place in one
step: a run killed half-way leaves no folder that nnU-Net would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.network import strip_wrapper_prefixes

# the checkpoint nnU-Net writes at the end of training and its predictor loads by default
CHECKPOINT_FINAL = "checkpoint_final.pth"


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CompressError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"{path} is not valid JSON ({e}); restore it from the original model") from None


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)


@dataclass
class ModelFolder:
    """A validated nnU-Net model folder (never modified by this class)."""

    path: Path
    plans: dict
    dataset_json: dict
    folds: dict[str, Path]  # fold name ("0", "all") -> checkpoint file

    @property
    def configurations(self) -> list[str]:
        return list(self.plans.get("configurations", {}))

    def configuration_from_name(self) -> str | None:
        """nnU-Net names model folders TRAINER__PLANS__CONFIGURATION."""
        parts = self.path.name.split("__")
        return parts[2] if len(parts) == 3 and parts[2] in self.configurations else None


def open_model_folder(path: str | os.PathLike, folds: list[str] | None = None,
                      checkpoint_name: str = CHECKPOINT_FINAL) -> ModelFolder:
    """Validate and read a model folder; `folds` None means every fold that has `checkpoint_name`."""
    root = Path(path)
    if not root.is_dir():
        raise CompressError(f"model folder {root} does not exist; pass the folder that holds plans.json, "
                            f"dataset.json and fold_X/")
    for name in ("plans.json", "dataset.json"):
        if not (root / name).is_file():
            raise CompressError(f"{root} is not an nnU-Net model folder: {name} is missing (expected plans.json, "
                                f"dataset.json and fold_X/{checkpoint_name})")
    plans = read_json(root / "plans.json")
    dataset_json = read_json(root / "dataset.json")
    if not isinstance(plans.get("configurations"), dict) or not plans["configurations"]:
        raise CompressError(f"{root / 'plans.json'} has no 'configurations' section; it is not an nnU-Net v2 "
                            f"plans file")
    available = {m.group(1): root / d / checkpoint_name
                 for d in sorted(os.listdir(root)) if (m := re.fullmatch(r"fold_(\w+)", d))
                 and (root / d / checkpoint_name).is_file()}
    if folds is None:
        chosen = available
    else:
        missing = [f for f in folds if f not in available]
        if missing:
            raise CompressError(f"{root} has no {checkpoint_name} for fold(s) {', '.join(missing)} "
                                f"(available: {', '.join(available) or 'none'}); train them first or pick "
                                f"other folds with -f")
        chosen = {f: available[f] for f in folds}
    if not chosen:
        raise CompressError(f"{root} holds no fold_X/{checkpoint_name}; train the model to the end (or pass "
                            f"--checkpoint checkpoint_best.pth / checkpoint_latest.pth)")
    return ModelFolder(root, plans, dataset_json, chosen)


def load_checkpoint(path: Path) -> dict:
    """Load an nnU-Net checkpoint on the CPU with a clear error for missing, empty or corrupt files."""
    if not Path(path).is_file():
        raise CompressError(f"checkpoint {path} does not exist")
    if Path(path).stat().st_size == 0:
        raise CompressError(f"checkpoint {path} is empty (an interrupted copy?); copy it again from the source")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for damaged files
        raise CompressError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt or not a "
                            f"torch file — copy it again from the source") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CompressError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); pass a "
                            f"checkpoint_final.pth written by nnUNetv2_train")
    return checkpoint


def configuration_name(folder: ModelFolder, configuration: str | None, checkpoint: dict | None = None) -> str:
    if configuration is None and checkpoint is not None:
        configuration = checkpoint.get("init_args", {}).get("configuration")
    if configuration is None:
        configuration = folder.configuration_from_name()
    if configuration is None:
        if len(folder.configurations) == 1:
            return folder.configurations[0]
        raise CompressError(f"cannot tell which configuration of {folder.path} to use; pass -c "
                            f"({', '.join(folder.configurations)})")
    if configuration not in folder.configurations:
        raise CompressError(f"configuration {configuration!r} does not exist in {folder.path / 'plans.json'} "
                            f"(it has: {', '.join(folder.configurations)})")
    return configuration


def build_network(plans: dict, dataset_json: dict, configuration: str, deep_supervision: bool = False) -> nn.Module:
    """Build the network a plans file describes, exactly as nnU-Net's trainers and predictor do."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    try:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, label_manager.num_segmentation_heads,
                                      allow_init=True, deep_supervision=deep_supervision)
    except CompressError:
        raise
    except (ImportError, TypeError, KeyError, AssertionError) as e:
        raise CompressError(f"plans configuration {configuration!r} does not describe a network nnU-Net can build "
                            f"({type(e).__name__}: {e}); check its 'architecture' section") from None


def input_channels_of(plans: dict, dataset_json: dict, configuration: str) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    return determine_num_input_channels(pm, pm.get_configuration(configuration), dataset_json)


def load_fold_network(folder: ModelFolder, fold: str, configuration: str | None = None,
                      deep_supervision: bool = False) -> tuple[nn.Module, dict, str]:
    """The network of one fold with its trained weights, its checkpoint, and the configuration used."""
    checkpoint = load_checkpoint(folder.folds[fold])
    configuration = configuration_name(folder, configuration, checkpoint)
    trained_as = checkpoint.get("init_args", {}).get("configuration")
    if trained_as and trained_as != configuration:
        raise CompressError(f"{folder.folds[fold]} was trained with configuration {trained_as!r}, not "
                            f"{configuration!r}; pass -c {trained_as} (or the model folder of that configuration)")
    net = build_network(folder.plans, folder.dataset_json, configuration, deep_supervision)
    weights = strip_wrapper_prefixes(checkpoint["network_weights"])
    try:
        net.load_state_dict(weights)
    except CompressError:
        raise
    except RuntimeError as e:
        raise CompressError(f"{folder.folds[fold]} does not match {folder.path / 'plans.json'} configuration "
                            f"{configuration!r} ({first_line(e)}); is this the right configuration (-c)?") from None
    return net, checkpoint, configuration


def check_output_location(source: Path, output: Path) -> None:
    """Refuse outputs that would overwrite or live inside the source model folder."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise CompressError(f"output {output} is the source folder or inside it; choose a folder outside "
                            f"{source} (the source model is never modified)")
    if out in src.parents:
        raise CompressError(f"output {output} contains the source folder {source}; choose another output folder")


def _partial_prefix(name: str) -> str:
    """Temporary siblings carry the writer's PID, so a later run can tell an abandoned one from a live one."""
    return f".{name}.partial-{os.getpid()}-"


def remove_abandoned_partials(parent: Path, name: str) -> list[Path]:
    """Delete temporary siblings of `name` left by writers that no longer run (e.g. killed with SIGKILL).

    They are hidden (dot) folders that nnU-Net never reads; removing them keeps a killed run from leaving
    clutter behind, while a concurrent writer's folder (its process still alive) is left alone.
    """
    removed = []
    for path in parent.glob(f".{name}.partial-*"):
        try:
            pid = int(path.name[len(f".{name}.partial-"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _process_alive(pid):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output_folder(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `output` in one rename.

    An existing output is refused unless `overwrite`; then it is only removed once the new folder is complete.
    On any failure the temporary folder is deleted and `output` is left as it was.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise CompressError(f"output {output} already exists; choose another folder or pass --overwrite")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_partials(parent, output.name)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(output.name), dir=parent))
    except OSError as e:
        raise CompressError(f"cannot write to {parent} ({e.strerror}); choose a writable output folder") from None
    try:
        yield tmp
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=parent))
            os.rename(output, old / output.name)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_file(path: Path, write) -> None:
    """Write a file via `write(tmp_path)` into a temporary sibling, then rename it into place."""
    path = Path(path)
    remove_abandoned_partials(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_folder_metadata(source: Path, target: Path) -> None:
    """Copy the small files of a model folder that nnU-Net reads beside plans.json (never checkpoints)."""
    for name in ("dataset.json", "dataset_fingerprint.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: torch.save(checkpoint, tmp))
