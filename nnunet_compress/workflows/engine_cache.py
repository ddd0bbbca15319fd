"""``nnunet-compress prepare-engine``: convert a model folder for the CPU engine before its first prediction.

Why: the engine converts a network once per weights and patch shape and keeps the result in the user's cache, but
the first prediction pays that conversion (7-17 s per 1.5 mm TotalSegmentator part model on 2 idle cores, more on
a busy machine): a compressed home's first CT was slower than the original's on torch. Converting when the folder
(or home) is written moves that cost to the moment the user compresses, so the first CT starts at once. nnU-Net's sliding window
feeds the network one patch of the plans' patch size at a time (a smaller image is padded up to it), so that one
shape is all the cache needs. The model folder is only read; the cache lives in the user's cache directory.
"""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.settings import ENGINE_VARIABLE, from_environment
from nnunet_compress.network import NETWORK_CLASS_NAME, CompressedUNet
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    input_channels_of,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import resolved_configuration
from nnunet_compress.progress import bar


def check_engine_in_use() -> None:
    """Refuse where predictions would not run on the engine: nothing to prepare then."""
    engine = from_environment().engine
    if engine != "openvino":
        raise CompressError(f"{ENGINE_VARIABLE}={engine}: predictions run on torch, so there is nothing to convert; "
                            f"unset {ENGINE_VARIABLE} (or set it to openvino) to use the engine")
    if not openvino_engine.available():
        raise CompressError("OpenVINO is not installed (pip install openvino); predictions run on torch's CPU path")


def prepare_engine(model_folder: str | Path, folds: list[str] | None = None, configuration: str | None = None,
                   checkpoint_name: str = CHECKPOINT_FINAL, progress=print) -> list[dict]:
    """Fill the engine cache for every fold of `model_folder` at its patch size; returns one row per fold."""
    check_engine_in_use()
    folder = open_model_folder(model_folder, folds, checkpoint_name)
    rows = []
    for fold in bar(list(folder.folds), "preparing the engine", "fold"):
        net, _, config_name = load_fold_network(folder, fold, configuration)
        if not isinstance(net, CompressedUNet):
            raise CompressError(f"{folder.path} builds {type(net).__name__}, which nnU-Net runs on plain torch; "
                                f"write it as a {NETWORK_CLASS_NAME} folder first (nnunet-compress convert, tucker "
                                "or prune) and prepare that one")
        net.eval()
        patch = tuple(resolved_configuration(folder.plans, config_name)["patch_size"])
        shape = (1, input_channels_of(folder.plans, folder.dataset_json, config_name), *patch)
        entry, seconds = openvino_engine.fill_cache(net, shape)
        rows.append({"fold": fold, "input_shape": list(shape), "cache_entry": str(entry), "seconds": seconds})
        done = "already cached" if seconds is None else f"converted in {seconds:.0f} s"
        progress(f"fold {fold}: input {'x'.join(map(str, shape))} {done} ({entry})")
    return rows
