"""The distillation teacher: the uncompressed parent network, rebuilt from the compressed plans and loaded checked.

Compressed plans name :class:`~nnunet_compress.network.CompressedUNet` and keep, in its ``arch_kwargs``, the
parent's own architecture (``base_network_class_name`` and the parent's kwargs) beside the compression applied to
it. Dropping the compression keys gives back exactly the ``architecture`` entry of nnU-Net's parent plans, so the
teacher is built by nnU-Net's own ``get_network_from_plans`` as nnU-Net built the parent: a plain
``PlainConvUNet`` (or ResidualEncoderUNet), never a CompressedUNet, so the CPU inference engine
(OpenVINO, which only CompressedUNet.forward calls) never converts it during training.

A teacher that does not fit is refused before training with what does not fit: its labels, its number of output
classes, its number of input channels, or its architecture (e.g. a compressed checkpoint passed as the teacher).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.network import COMPRESSION_KEYS, NETWORK_CLASS_NAME, strip_wrapper_prefixes
from nnunet_compress.nnunet.model_folder import load_checkpoint


def parent_architecture(configuration: dict) -> dict:
    """The parent's ``architecture`` entry, recovered from a compressed configuration's CompressedUNet entry."""
    arch = configuration["architecture"]
    if arch["network_class_name"] != NETWORK_CLASS_NAME:
        raise CompressError("distillation needs plans made by `nnunet-compress plan tucker|taylor|sauron --distill` "
                            f"(network class {NETWORK_CLASS_NAME}), got {arch['network_class_name']}")
    kwargs = {k: v for k, v in arch["arch_kwargs"].items() if k not in COMPRESSION_KEYS}
    return {"network_class_name": arch["arch_kwargs"]["base_network_class_name"], "arch_kwargs": kwargs,
            "_kw_requires_import": list(arch.get("_kw_requires_import", []))}


def build_parent_network(architecture: dict, input_channels: int, num_classes: int,
                         deep_supervision: bool) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], input_channels, num_classes,
                                  allow_init=False, deep_supervision=deep_supervision)


def _first_conv_weight_key(net: nn.Module) -> str | None:
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"{name}.weight"
    return None


def _head_weight_key(net: nn.Module) -> str | None:
    """The full-resolution segmentation head (nnU-Net's decoder.seg_layers[-1])."""
    heads = sorted((int(m.group(1)), k) for k in net.state_dict()
                   if (m := re.fullmatch(r"decoder\.seg_layers\.(\d+)\.weight", k)))
    return heads[-1][1] if heads else None


def check_teacher_fits(net: nn.Module, weights: dict, source: str, input_channels: int, num_classes: int) -> None:
    """Raise a CompressError saying what does not fit when `weights` cannot load into the parent network `net`."""
    fix = "pass the checkpoint of the uncompressed parent these plans were derived from (--teacher)"
    head = _head_weight_key(net)
    if head is not None and head in weights and weights[head].shape[0] != num_classes:
        raise CompressError(f"teacher {source} predicts {weights[head].shape[0]} classes but the dataset has "
                            f"{num_classes} (incl. background); {fix}")
    stem = _first_conv_weight_key(net)
    if stem is not None and stem in weights and weights[stem].dim() > 1 and weights[stem].shape[1] != input_channels:
        raise CompressError(f"teacher {source} takes {weights[stem].shape[1]} input channel(s) but the dataset has "
                            f"{input_channels}; {fix}")
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        detail = (f"it lacks {missing[0]}" if missing else f"it has {unexpected[0]}") + \
                 f" ({len(missing)} missing, {len(unexpected)} unexpected weights)"
        raise CompressError(f"teacher {source} is not a network of the parent architecture in the plans ({detail}; "
                            f"a compressed checkpoint cannot teach); {fix}")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise CompressError(f"teacher {source} does not fit the parent architecture in the plans ({key}: "
                                f"{tuple(weights[key].shape)} in the checkpoint, {tuple(value.shape)} in the plans); "
                                f"{fix}")


def check_teacher_labels(checkpoint: dict, source: str, labels: dict) -> None:
    """The teacher must segment the classes of this dataset, under the same label values."""
    trained = (checkpoint.get("init_args") or {}).get("dataset_json", {}).get("labels")
    if trained is not None and dict(trained) != dict(labels):
        raise CompressError(f"teacher {source} was trained for labels {dict(trained)}, the dataset has "
                            f"{dict(labels)}; distil only from a parent trained on these labels (a pseudo-dataset "
                            f"of that parent has them)")


def load_teacher(path: str | Path, architecture: dict, input_channels: int, num_classes: int, labels: dict,
                 deep_supervision: bool, device: torch.device | str = "cpu") -> nn.Module:
    """The parent network with the teacher checkpoint's weights: eval mode, no gradients, on `device`."""
    source = str(path)
    try:
        checkpoint = load_checkpoint(Path(path))
    except CompressError as e:  # missing / empty / corrupt
        raise CompressError(f"teacher {e}; pass the uncompressed parent's checkpoint (--teacher, or "
                            f"-pretrained_weights of nnUNetv2_train)") from None
    check_teacher_labels(checkpoint, source, labels)
    net = build_parent_network(architecture, input_channels, num_classes, deep_supervision)
    weights = strip_wrapper_prefixes(checkpoint["network_weights"])
    check_teacher_fits(net, weights, source, input_channels, num_classes)
    net.load_state_dict(weights)
    net.eval()
    net.requires_grad_(False)
    return net.to(device)
