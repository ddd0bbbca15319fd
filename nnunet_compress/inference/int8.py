"""INT8 models for the CPU engine: NNCF's post-training quantisation of the converted network, accuracy-controlled
by Dice, and the bytes that carry the quantised model inside a checkpoint.

Why NNCF on the engine's own model: it is the quantiser OpenVINO is built for (its FakeQuantize nodes become the
CPU plugin's int8 kernels), and it quantises the graph the engine runs — the converted network with the decoder's
concatenations folded (:mod:`.decoder_fold`) — so what was calibrated is what predicts. Its accuracy-controlled
mode ranks the quantised operations by how much each one costs the metric and returns groups of them to float
until the drop is within budget; we give it Dice over validation patches as the metric, with limits on the mean
foreground Dice and on every single class.

Why the quantised model travels inside the checkpoint (as two uint8 tensors of the state dict, :data:`XML_KEY` and
:data:`BIN_KEY`) rather than only as files: nnU-Net's predictor, and TotalSegmentator through it, hand a network
nothing but its plans' ``arch_kwargs`` and the checkpoint's ``network_weights``; no model-folder path reaches the
network. Inside the weights, the INT8 model follows every fold's checkpoint wherever a folder is copied, and the
f32 weights beside it stay the source of truth for torch, CUDA and ``NNUNET_COMPRESS_CPU_PRECISION=f32``.

Pure engine maths: no nnU-Net here (patches and targets come in as arrays).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_compress.progress import shows_bar

XML_KEY = "engine_int8_xml"
BIN_KEY = "engine_int8_bin"
PAYLOAD_KEYS = (XML_KEY, BIN_KEY)
CONV_TYPES = ("Convolution", "ConvolutionBackpropData", "GroupConvolution")
MIN_CLASS_VOXELS = 64  # target voxels a class needs on the validation patches before its own Dice limit applies


@dataclass
class ValidationPatch:
    """One validation input patch (1, C, *patch) and its target label map (*patch), labels or the f32 prediction."""

    image: np.ndarray
    target: np.ndarray


@dataclass
class Int8Result:
    """A quantised model and what the accuracy control found."""

    model: object  # openvino.Model
    convolutions: int
    f32_layers: list[str]
    dice_f32: dict[int, float] = field(default_factory=dict)   # per class, on the validation patches
    dice_int8: dict[int, float] = field(default_factory=dict)
    max_drop: float | None = None

    @property
    def mean_dice_f32(self) -> float:
        return _mean(self.dice_f32)

    @property
    def mean_dice_int8(self) -> float:
        return _mean(self.dice_int8)


def _mean(per_class: dict[int, float]) -> float:
    values = [v for v in per_class.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def dice_per_class(prediction: np.ndarray, target: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice of each foreground class over all voxels given (NaN where the class is in neither map)."""
    out = {}
    for c in classes:
        p, t = prediction == c, target == c
        denominator = int(p.sum()) + int(t.sum())
        out[int(c)] = float(2 * int(np.logical_and(p, t).sum()) / denominator) if denominator else float("nan")
    return out


def predict_labels(compiled_model, image: np.ndarray) -> np.ndarray:
    """Label map (*patch) of one patch through a compiled OpenVINO model."""
    logits = compiled_model(image)[0]
    return np.asarray(logits)[0].argmax(0)


def patches_dice(compiled_model, patches: Sequence[ValidationPatch], classes: Sequence[int]) -> dict[int, float]:
    """Per-class Dice over all validation patches pooled (each patch predicted by itself)."""
    predictions = np.stack([predict_labels(compiled_model, p.image) for p in patches])
    targets = np.stack([p.target for p in patches])
    return dice_per_class(predictions, targets, classes)


def _dice_metric(classes: Sequence[int], reference: dict[int, float], class_weight: float):
    """NNCF's validation function: one score whose drop from the f32 model's is the larger of the mean foreground
    Dice's drop and `class_weight` times the largest single class's drop, and one value per patch (for ranking).

    Why one score for two limits: NNCF's accuracy control compares a single metric against one ``max_drop``. With
    `reference` the f32 model's per-class Dice on the same patches and `class_weight` = max_drop / max_class_drop,
    the score stays within ``max_drop`` of the f32 model's exactly when the mean drop is within ``max_drop`` and no
    class drops more than ``max_class_drop``; a loss that concentrates in one small class (a lesion) then returns
    layers to float even where the mean barely moves. Classes with fewer than :data:`MIN_CLASS_VOXELS` target voxels
    over all patches count in the mean only: on a handful of voxels one flipped voxel moves Dice by more than any
    limit, and a TotalSegmentator model has dozens of classes that a few tiles barely touch.
    """
    reference_mean = _mean(reference)

    def validate(compiled_model, items) -> tuple[float, list[float]]:
        items = list(items)
        # one inference per patch serves both the pooled score and the per-patch values: NNCF calls this for every
        # group of operations it ranks
        predictions = np.stack([predict_labels(compiled_model, p.image) for p in items])
        targets = np.stack([p.target for p in items])
        per_class = dice_per_class(predictions, targets, classes)
        class_drops = [reference[c] - v for c, v in per_class.items()
                       if not np.isnan(v) and not np.isnan(reference.get(c, float("nan")))
                       and int((targets == c).sum()) >= MIN_CLASS_VOXELS]
        drop = max([reference_mean - _mean(per_class)] + [class_weight * d for d in class_drops])
        per_item = []
        for prediction, target in zip(predictions, targets):
            values = [v for v in dice_per_class(prediction, target, classes).values() if not np.isnan(v)]
            per_item.append(float(np.mean(values)) if values else 1.0)
        return reference_mean - drop, per_item
    return validate


def quantize(model, calibration: Sequence[np.ndarray], validation: Sequence[ValidationPatch] | None,
             classes: Sequence[int], max_drop: float | None = 0.01, preset: str = "mixed", threads: int = 1,
             max_restore_steps: int | None = None, show_progress: bool | None = None,
             max_class_drop: float | None = None):
    """INT8 version of the OpenVINO `model`, calibrated on `calibration` patches (each (1, C, *patch) float32).

    With `validation` and `max_drop`, NNCF's accuracy control keeps in float the quantised operations whose loss of
    mean foreground Dice (absolute, on the validation patches) would exceed `max_drop`, or whose loss of any one
    class's Dice would exceed `max_class_drop` (None: twice `max_drop`); otherwise every operation NNCF can quantise
    is quantised. `max_restore_steps` caps the groups it returns to float (None: as many as the budget needs). The
    ``mixed`` preset quantises activations asymmetrically: after LeakyReLU and
    InstanceNorm they are not centred on zero, and a symmetric range wastes half the int8 codes. NNCF's own
    progress bars show on a terminal without ``--quiet`` (`show_progress` None) and nowhere else.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    if not calibration:
        raise ValueError("no calibration patches")
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    calibration_set = nncf.Dataset(list(calibration))
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    dice_f32 = patches_dice(core.compile_model(model, "CPU", config), validation, classes) if validation else {}
    with _nncf_output(show_progress):
        if validation and max_drop is not None:
            class_limit = max_class_drop if max_class_drop is not None else 2 * max_drop
            validation_set = nncf.Dataset(list(validation), lambda p: p.image)
            restorer = AdvancedAccuracyRestorerParameters(
                **({"max_num_iterations": max_restore_steps} if max_restore_steps is not None else {}))
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_set, validation_set, _dice_metric(classes, dice_f32, max_drop / class_limit),
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, preset=presets[preset],
                subset_size=len(calibration), advanced_accuracy_restorer_parameters=restorer)
        else:
            quantized = nncf.quantize(model, calibration_set, preset=presets[preset], subset_size=len(calibration))
    result = Int8Result(quantized, len(convolutions(quantized)), f32_layers(quantized), max_drop=max_drop)
    if validation:
        result.dice_f32 = dice_f32
        result.dice_int8 = patches_dice(core.compile_model(quantized, "CPU", config), validation, classes)
    return result


@contextlib.contextmanager
def _nncf_output(show_progress: bool | None):
    """NNCF's log at warnings only (its info lists every reverted node), its bars only where asked or on a tty."""
    from nncf.common.logging.logger import nncf_logger
    if show_progress is None:
        show_progress = shows_bar(sys.stdout)
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        if show_progress:
            yield
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        nncf_logger.setLevel(level)


def convolutions(model) -> list:
    return [op for op in model.get_ops() if op.get_type_name() in CONV_TYPES]


def layer_name(friendly_name: str) -> str:
    """torch's module name from the OpenVINO frontend's node name.

    The frontend names a node by the module path it was traced under ('__module.a.b/aten::_convolution/...'). The
    decoder holds the encoder, so encoder layers appear as 'decoder.encoder.*', and nnU-Net's conv blocks reach
    their conv and norm as 'all_modules.0' and '.1' as well as 'conv' and 'norm'; both are mapped to the usual names.
    """
    name = friendly_name.split("/")[0]
    name = name[len("__module."):] if name.startswith("__module.") else name
    if name.startswith("decoder.encoder."):
        name = name[len("decoder."):]
    return name.replace(".all_modules.0", ".conv").replace(".all_modules.1", ".norm")


def weights_quantised(op) -> bool:
    """Whether a convolution's weights are int8: NNCF stores them as an int8 constant dequantised on the way in
    (Constant i8/u8 -> Convert -> [Subtract] -> Multiply), or behind a FakeQuantize before compression."""
    node = op.input(1).get_source_output().get_node()
    seen = 0
    while seen < 8:
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")
        if node.get_input_size() == 0:
            return False
        node = node.input(0).get_source_output().get_node()
        seen += 1
    return False


def activation_quantised(op) -> bool:
    """Whether an operation's data input is quantised (a FakeQuantize feeds it; NNCF quantises InstanceNorm's)."""
    return op.input(0).get_source_output().get_node().get_type_name() == "FakeQuantize"


def f32_layers(model) -> list[str]:
    """Operations of a quantised model that run in float: convolutions with float weights and InstanceNorms (MVN)
    without a quantised input. NNCF's accuracy control returns exactly these kinds to float."""
    out = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if (kind in CONV_TYPES and not weights_quantised(op)) or (kind == "MVN" and not activation_quantised(op)):
            out.append(layer_name(op.get_friendly_name()))
    return out


def serialize(model) -> tuple[np.ndarray, np.ndarray]:
    """The model's IR (XML and weights) as two uint8 arrays, for a state dict."""
    import openvino as ov
    with tempfile.TemporaryDirectory(prefix="nnunet_compress_int8_") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return (np.frombuffer(xml.read_bytes(), dtype=np.uint8).copy(),
                np.frombuffer(xml.with_suffix(".bin").read_bytes(), dtype=np.uint8).copy())


def deserialize(core, xml: np.ndarray, weights: np.ndarray):
    """The OpenVINO model from :func:`serialize`'s arrays (raises where they are not a readable IR)."""
    import openvino as ov
    return core.read_model(model=bytes(np.asarray(xml, dtype=np.uint8)).decode("utf-8"),
                           weights=ov.Tensor(np.ascontiguousarray(weights, dtype=np.uint8)))
