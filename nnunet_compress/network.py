"""The compressed network class that compressed plans name in ``network_class_name``.

nnU-Net builds every network with ``get_network_from_plans``: it locates the class named in the plans and calls it
with ``input_channels``, ``num_classes`` and the plans' ``arch_kwargs``. A compressed plans file therefore names
:class:`CompressedUNet` and records, in its ``arch_kwargs``, the parent architecture (class name and kwargs exactly
as the parent plans had them) plus the compression applied to it: the kept channel count of every pruned channel
group and the Tucker ranks of every factorised layer. Any trainer — nnU-Net's default one, TotalSegmentator's
``nnUNetTrainerNoMirroring``, ours — and nnU-Net's predictor then rebuild the compressed network, and the
checkpoint's weights load into it with strict ``load_state_dict``.

The parent network is built first and then reshaped (channels first, then factorisation), so its module names
and therefore the state-dict keys stay those of the parent: ``encoder.*``, ``decoder.*``. A Tucker layer's three
convolutions appear as ``<layer>.0``, ``<layer>.1``, ``<layer>.2``.
"""

from __future__ import annotations

import pydoc
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.int8 import PAYLOAD_KEYS
from nnunet_compress.inference.torch_paths import fast_convolutions
from nnunet_compress.pruning.dependency import channel_groups
from nnunet_compress.pruning.surgery import channel_counts, set_channel_counts
from nnunet_compress.tucker.decomposition import replace_convs

NETWORK_CLASS_NAME = "nnunet_compress.network.CompressedUNet"
INT8_TRAINING_REFUSED = ("this model folder is INT8 (nnunet-compress quantize): its INT8 model cannot be trained; "
                         "fine-tune the parent folder it was quantised from, then quantise again")


def refuse_int8_weights(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Training starts from f32 weights: an INT8 folder's checkpoint is refused where training would start from it."""
    if any(key in state_dict for key in PAYLOAD_KEYS):
        raise CompressError(INT8_TRAINING_REFUSED)


def locate_class(name: str) -> type:
    cls = pydoc.locate(name)
    if cls is None:
        raise CompressError(f"cannot import the network class {name!r} named in the plans; install the package "
                            f"that provides it or correct 'network_class_name' in plans.json")
    return cls


def build_base_network(base_network_class_name: str, base_kwargs: Mapping, input_channels: int,
                       num_classes: int) -> nn.Module:
    """The uncompressed parent network from already-resolved kwargs (conv_op etc. as classes)."""
    return locate_class(base_network_class_name)(input_channels=input_channels, num_classes=num_classes,
                                                 **base_kwargs)


class CompressedUNet(nn.Module):
    """A parent nnU-Net U-Net (``.encoder`` + ``.decoder``) with pruned channels and/or Tucker-factorised convs.

    The plans' ``arch_kwargs`` are the parent's own (nnU-Net reads some of them, e.g. ``strides``, and resolves
    ``conv_op`` & co. through ``_kw_requires_import`` as for the parent) plus the keys below.

    Args:
        input_channels, num_classes: passed by nnU-Net.
        base_network_class_name: the parent architecture's class (e.g. PlainConvUNet).
        channels: kept channel count per channel group (group name = its first producing conv), or None.
        tucker_ranks: ``{layer name: [rank_out, rank_in]}`` of factorised layers, or None.
        per_fold_channels: set by the in-training pruning trainers, whose folds end with different shapes. Then a
            state dict whose channel counts differ from ``channels`` reshapes the network before loading (so
            nnU-Net's predictor can load every fold into one network object); otherwise any mismatch is an error.
        engine_int8: set by ``nnunet-compress quantize``: the state dict also carries the fold's INT8 model for the
            CPU engine (:mod:`nnunet_compress.inference.int8`), which the engine runs in place of the f32 weights.
            Such a network predicts but does not train: fine-tune the parent and quantise again.
        deep_supervision: passed by nnU-Net's trainers and predictor.
    """

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str,
                 channels: Mapping[str, int] | None = None,
                 tucker_ranks: Mapping[str, Sequence[int]] | None = None,
                 per_fold_channels: bool = False, engine_int8: bool = False, **base_kwargs):
        super().__init__()
        build = (input_channels, num_classes, base_network_class_name, channels, tucker_ranks, per_fold_channels,
                 base_kwargs)
        self.engine_int8 = bool(engine_int8)
        if self.engine_int8 and base_kwargs.get("deep_supervision"):  # nnU-Net's trainers build with it, predictors not
            raise CompressError(INT8_TRAINING_REFUSED)
        if channels:  # channel surgery computes index tensors, which need values: build on the CPU
            self._build(*build)
            self._register_int8_payload()
            return
        # Built on the meta device, factorised, then given memory once: initialising the full parent's weights only
        # to discard most of them cost seconds per model load (TotalSegmentator loads one network per part model).
        with torch.device("meta"):
            self._build(*build)
        self.to_empty(device="cpu")
        for buffer in self.buffers():  # memory from to_empty is uninitialised; normalisation layers reset theirs below
            buffer.zero_()
        for module in self.modules():  # the thin network's own default initialisation (nnU-Net's follows)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._register_int8_payload()

    def _register_int8_payload(self) -> None:
        """Empty INT8-model buffers, filled (at their stored size) by :meth:`load_state_dict`."""
        if self.engine_int8:
            for key in PAYLOAD_KEYS:
                self.register_buffer(key, torch.zeros(0, dtype=torch.uint8))

    def _build(self, input_channels, num_classes, base_network_class_name, channels, tucker_ranks,
               per_fold_channels, base_kwargs) -> None:
        base = build_base_network(base_network_class_name, base_kwargs, input_channels, num_classes)
        if not (hasattr(base, "encoder") and hasattr(base, "decoder")):
            raise CompressError(f"{base_network_class_name} has no .encoder/.decoder; nnunet-compress supports "
                                f"nnU-Net's PlainConvUNet and ResidualEncoderUNet families")
        self.encoder = base.encoder
        self.decoder = base.decoder
        self.base_network_class_name = base_network_class_name
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.per_fold_channels = per_fold_channels
        self._base_kwargs = dict(base_kwargs)
        self.channels = dict(channels) if channels else None
        # nnU-Net's weight initialisation of the parent class (get_network_from_plans applies network.initialize)
        self._initialize = getattr(type(base), "initialize", None)
        for attr in ("key_to_encoder", "key_to_stem", "keys_to_in_proj"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        if channels:
            set_channel_counts(self, dict(channels))
        self.tucker_ranks = {k: tuple(v) for k, v in (tucker_ranks or {}).items()}
        if self.tucker_ranks:
            replace_convs(self, self.tucker_ranks, decompose=False)

    def initialize(self, module: nn.Module) -> None:
        if self._initialize is not None:
            self._initialize(module)

    def train(self, mode: bool = True):
        if mode and self.engine_int8:
            raise CompressError(INT8_TRAINING_REFUSED)
        return super().train(mode)

    def forward(self, x: torch.Tensor):
        # CPU inference: OpenVINO where it applies and can take this network (inference/openvino_engine.py)
        if openvino_engine.applies(self, x):
            out = openvino_engine.run(self, x)
            if out is not None:
                return out
        elif self.engine_int8:
            openvino_engine.int8_notice(self, x)
        # torch's CPU fallback: thin convs go to oneDNN / GEMMs instead of torch's slow generic kernel, freed
        # feature-map memory is kept for the next layer (inference/torch_paths.py)
        with fast_convolutions(x):
            return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size):
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    # ---- loading -------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.per_fold_channels:
            wanted = channel_counts_in_state_dict(self, state_dict)
            if wanted and wanted != channel_counts(self):
                set_channel_counts(self, wanted)
        openvino_engine.forget(self)  # new weights: the engine must not reuse the old weights' compiled model
        if self.engine_int8:  # each fold's INT8 model has its own size: take the stored tensors' shapes
            with torch.inference_mode(False):  # nnU-Net's predictor loads folds inside inference mode
                for key in PAYLOAD_KEYS:
                    if key in state_dict:
                        self.register_buffer(key, torch.zeros(state_dict[key].shape, dtype=torch.uint8))
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            raise CompressError(
                "the checkpoint does not match the compressed architecture in plans.json "
                f"({first_line(e)}); use the plans.json written together with this checkpoint, or rebuild the "
                "compressed model folder from its parent") from e


    def _sibling(self, **compression) -> "CompressedUNet":
        """A network of the same parent architecture (and deep-supervision setting) with other compression."""
        return CompressedUNet(self.input_channels, self.num_classes, self.base_network_class_name, **compression,
                              **{**self._base_kwargs, "deep_supervision": self.decoder.deep_supervision})

    def load_parent_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Initialise every layer (segmentation heads included) from the trained PARENT network's weights.

        The parent is rebuilt uncompressed, loaded strictly, pruned to this network's channel counts where the
        weights are already pruned, and factorised with this network's Tucker ranks; then this network takes its
        weights. nnU-Net's own ``-pretrained_weights`` loader cannot do this: it needs identical keys and shapes
        and skips the segmentation heads, which would leave them random and wreck the first fine-tuning epochs.
        Returns the relative reconstruction error of every factorised layer. Weights that already fit this
        network exactly (a compressed checkpoint) are loaded as they are.
        """
        state_dict = strip_wrapper_prefixes(dict(state_dict))
        if not self.engine_int8:  # an INT8 parent's engine model does not fit a derived network: its f32 weights do
            state_dict = {k: v for k, v in state_dict.items() if k not in PAYLOAD_KEYS}
        own = self.state_dict()
        if own.keys() == state_dict.keys() and all(own[k].shape == state_dict[k].shape for k in own):
            self.load_state_dict(state_dict)
            return {}
        parent = self._sibling(per_fold_channels=True)
        try:
            parent.load_state_dict(state_dict)
        except CompressError as e:
            raise CompressError("the pretrained weights are neither this compressed network's nor its parent "
                                f"network's ({e}); pass the checkpoint of the model these plans were derived "
                                "from") from None
        # the channel map only knows plain convs, so compare against this architecture before factorisation
        unfactorised = self._sibling(channels=self.channels)
        mine, theirs = channel_counts(unfactorised), channel_counts(parent)
        if mine != theirs:
            raise CompressError("the pretrained weights have other channel counts than these plans; pass the "
                                "checkpoint of the model these plans were derived from")
        errors: dict[str, float] = {}
        if self.tucker_ranks:
            errors = replace_convs(parent, self.tucker_ranks, decompose=True)
        self.load_state_dict(parent.state_dict())
        return errors


def channel_counts_in_state_dict(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Kept channels of every prunable group as the weights in `state_dict` have them (by the producer's shape)."""
    counts = {}
    for group in channel_groups(net):
        if not group.prunable:
            continue
        producer = group.producers[0]
        weight = state_dict.get(f"{producer}.weight")
        if weight is None:
            return {}
        module = net.get_submodule(producer)
        out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        counts[group.name] = int(weight.shape[out_dim])
    return counts


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


COMPRESSION_KEYS = ("base_network_class_name", "channels", "tucker_ranks", "per_fold_channels", "engine_int8")


def compressed_arch_kwargs(parent_configuration: Mapping, channels: Mapping[str, int] | None = None,
                           tucker_ranks: Mapping[str, Sequence[int]] | None = None,
                           per_fold_channels: bool = False, engine_int8: bool = False) -> dict:
    """The ``architecture`` entry of a compressed configuration, derived from the parent configuration's one.

    A parent that is already compressed is compressed further: its base architecture is kept, and the new
    channels / ranks replace its old ones where given. A derived network is f32 unless `engine_int8` says that its
    checkpoints carry an INT8 model too (an INT8 parent's model does not fit new weights).
    """
    arch = parent_configuration["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    if arch["network_class_name"] == NETWORK_CLASS_NAME:
        base_class = kwargs["base_network_class_name"]
        channels = channels if channels is not None else kwargs.get("channels")
        tucker_ranks = tucker_ranks if tucker_ranks is not None else kwargs.get("tucker_ranks")
        for key in COMPRESSION_KEYS:
            kwargs.pop(key, None)
    else:
        base_class = arch["network_class_name"]
    return {
        "network_class_name": NETWORK_CLASS_NAME,
        "arch_kwargs": {
            **kwargs,
            "base_network_class_name": base_class,
            "channels": dict(channels) if channels else None,
            "tucker_ranks": {k: list(v) for k, v in tucker_ranks.items()} if tucker_ranks else None,
            "per_fold_channels": per_fold_channels,
            **({"engine_int8": True} if engine_int8 else {}),
        },
        "_kw_requires_import": list(arch.get("_kw_requires_import", [])),
    }


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Checkpoints written outside nnU-Net may carry DDP's 'module.' or torch.compile's '_orig_mod.' prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out
