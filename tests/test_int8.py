"""INT8 on the CPU engine without nnU-Net training: NNCF's quantisation of the engine's model, the payload a network
carries in its state dict, which model the engine runs, and the fallbacks.

References: Dice against hand-counted voxels; the INT8 model read back from the payload against the quantised
model compiled directly (identical outputs); the kept-f32 layers against OpenVINO's graph (a convolution whose data
input is not a FakeQuantize); the engine's INT8 output against the f32 engine's (close, not identical).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.inference import int8
from nnunet_compress.inference import openvino_engine as engine
from nnunet_compress.inference.settings import plain_inference
from nnunet_compress.network import CompressedUNet

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
PATCH = (16, 16, 16)
SHAPE = (1, 1, *PATCH)


@pytest.fixture(autouse=True)
def engine_cache(fresh_openvino_engine):
    return fresh_openvino_engine


def unet(engine_int8: bool = False, seed: int = 0) -> CompressedUNet:
    torch.manual_seed(seed)
    net = CompressedUNet(1, 3, PLAIN, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=3,
                         strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False,
                         engine_int8=engine_int8)
    return net.eval()


def blob_image(seed: int) -> np.ndarray:
    """A patch with a bright blob in noise: inputs with structure, so calibration ranges are not pure noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in PATCH], indexing="ij")
    centre = rng.integers(4, 12, size=3)
    blob = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < 16
    return (blob * 2.0 + rng.normal(0, 0.3, PATCH)).astype(np.float32)[None, None]


@pytest.fixture(scope="module")
def quantised():
    """A network, its f32 OpenVINO model and an INT8 model of it (calibrated, no accuracy control)."""
    net = unet()
    with plain_inference():
        model = engine.convert(net, torch.zeros(SHAPE))
    result = int8.quantize(model, [blob_image(i) for i in range(4)], None, [1, 2], max_drop=None)
    return net, model, result


def with_payload(net: CompressedUNet, model) -> CompressedUNet:
    xml, weights = int8.serialize(model)
    carrier = unet(engine_int8=True)
    carrier.load_state_dict({**net.state_dict(), int8.XML_KEY: torch.from_numpy(xml),
                             int8.BIN_KEY: torch.from_numpy(weights)})
    return carrier.eval()


def test_dice_per_class_matches_hand_counts():
    prediction = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    target = np.array([0, 1, 2, 2, 2, 0, 0, 0])
    dice = int8.dice_per_class(prediction, target, [1, 2, 3])
    assert dice[1] == pytest.approx(2 * 1 / (3 + 1))
    assert dice[2] == pytest.approx(2 * 2 / (3 + 3))
    assert np.isnan(dice[3])  # in neither map


def test_layer_names_map_to_state_dict_modules():
    assert int8.layer_name("__module.decoder.encoder.stages.0.0.convs.1.all_modules.0/aten::_convolution/Convolution"
                           ) == "encoder.stages.0.0.convs.1.conv"
    assert int8.layer_name("__module.decoder.seg_layers.2/aten::_convolution/Convolution") == "decoder.seg_layers.2"
    net = unet()
    ran = []  # the convolutions a forward pass runs (deep supervision off: only the last head)
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: ran.append(name)) for name, m in net.named_modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad(), plain_inference():
        net(torch.zeros(SHAPE))
    for h in hooks:
        h.remove()
    with plain_inference():
        model = engine.convert(net, torch.zeros(SHAPE))
    names = [int8.layer_name(op.get_friendly_name()) for op in int8.convolutions(model)]
    assert sorted(names) == sorted(ran)


def test_quantised_model_has_int8_convolutions_and_round_trips_through_bytes(quantised):
    import openvino as ov
    _, model, result = quantised
    assert result.convolutions == len(int8.convolutions(model)) > 0
    assert result.f32_layers == []  # no accuracy control: everything NNCF can quantise is quantised
    fake_quantize = [op for op in result.model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantize) >= result.convolutions
    xml, weights = int8.serialize(result.model)
    core = ov.Core()
    x = blob_image(99)
    direct = core.compile_model(result.model, "CPU")(x)[0]
    read_back = core.compile_model(int8.deserialize(core, xml, weights), "CPU")(x)[0]
    np.testing.assert_array_equal(direct, read_back)


@pytest.fixture(scope="module")
def graded_model():
    """A network, its f32 OpenVINO model, and validation patches labelled by that f32 model's own prediction."""
    import openvino as ov
    net = unet(seed=3)
    with plain_inference():
        model = engine.convert(net, torch.zeros(SHAPE))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    validation = [int8.ValidationPatch(x, int8.predict_labels(compiled, x)) for x in map(blob_image, range(10, 13))]
    return net, model, validation


def test_accuracy_control_keeps_layers_in_f32_under_a_tight_budget(graded_model):
    net, model, validation = graded_model
    loose = int8.quantize(model, [blob_image(i) for i in range(3)], validation, [1, 2], max_drop=0.9)
    assert loose.f32_layers == []
    tight = int8.quantize(model, [blob_image(i) for i in range(3)], validation, [1, 2], max_drop=1e-6,
                          max_restore_steps=2)
    assert tight.f32_layers, "a budget INT8 cannot meet must return operations to f32"
    modules = dict(net.named_modules())
    assert all(name in modules for name in tight.f32_layers), tight.f32_layers

    def fake_quantize(m):
        return sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops())
    assert fake_quantize(tight.model) < fake_quantize(loose.model)  # what was returned to float lost its quantiser
    assert len(tight.f32_layers) < tight.convolutions
    assert tight.mean_dice_f32 == pytest.approx(1.0)  # graded against the f32 model's own labels


class LabelMapModel:
    """Stands in for a compiled model: one-hot logits of a fixed label map, whatever the input."""

    def __init__(self, labels: np.ndarray, classes: int = 3):
        self.logits = np.eye(classes, dtype=np.float32)[labels].transpose(3, 0, 1, 2)[None]

    def __call__(self, image):
        return [self.logits]


def test_dice_metric_drop_is_the_larger_of_mean_and_weighted_class_drop(monkeypatch):
    monkeypatch.setattr(int8, "MIN_CLASS_VOXELS", 1)
    target = np.zeros((4, 4, 4), dtype=np.int64)
    target[:2] = 1                              # 32 voxels of class 1
    target[2:, :2] = 2                          # 16 voxels of class 2
    prediction = target.copy()
    prediction[2:, :2, :1] = 0                  # class 2 loses 4 of its 16 voxels: Dice 2*12/(12+16)
    patches = [int8.ValidationPatch(np.zeros(SHAPE, np.float32), target)]
    reference = {1: 1.0, 2: 1.0}
    dice_2 = 24 / 28
    mean_drop, class_drop = (1 - dice_2) / 2, 1 - dice_2
    for weight in (0.25, 0.5, 2.0):             # max_drop / max_class_drop
        score, per_item = int8._dice_metric([1, 2], reference, weight)(LabelMapModel(prediction), patches)
        assert score == pytest.approx(1.0 - max(mean_drop, weight * class_drop))
        assert per_item == [pytest.approx((1 + dice_2) / 2)]
    score, _ = int8._dice_metric([1, 2], reference, 0.5)(LabelMapModel(target), patches)
    assert score == pytest.approx(1.0)          # the reference itself: no drop


def test_dice_metric_class_limit_skips_classes_with_few_voxels(monkeypatch):
    target = np.zeros((4, 4, 4), dtype=np.int64)
    target[:2] = 1                              # 32 voxels of class 1
    target[2:, :2] = 2                          # 16 voxels of class 2
    prediction = target.copy()
    prediction[2:, :2, :1] = 0                  # class 2 loses 4 of its 16 voxels
    patches = [int8.ValidationPatch(np.zeros(SHAPE, np.float32), target)]
    dice_2 = 24 / 28
    monkeypatch.setattr(int8, "MIN_CLASS_VOXELS", 17)  # class 2 (16 voxels) counts in the mean only
    score, _ = int8._dice_metric([1, 2], {1: 1.0, 2: 1.0}, 2.0)(LabelMapModel(prediction), patches)
    assert score == pytest.approx(1.0 - (1 - dice_2) / 2)


def test_class_limit_returns_layers_to_f32_where_the_mean_budget_would_not(graded_model):
    _, model, validation = graded_model
    calibration = [blob_image(i) for i in range(3)]
    loose = int8.quantize(model, calibration, validation, [1, 2], max_drop=0.45, max_class_drop=0.9)
    assert loose.f32_layers == []
    class_bound = int8.quantize(model, calibration, validation, [1, 2], max_drop=0.45, max_class_drop=1e-6,
                                max_restore_steps=2)
    assert class_bound.f32_layers, "a class limit INT8 cannot meet must return operations to f32"


def test_engine_runs_the_int8_model_and_f32_on_request(quantised, monkeypatch):
    net, model, result = quantised
    carrier = with_payload(net, result.model)
    x = torch.from_numpy(blob_image(7))
    with torch.inference_mode():
        out_int8 = carrier(x)
    assert {k[2] for k in engine._compiled} == {"int8"}
    runtime = next(iter(engine._compiled.values())).model.get_runtime_model()  # what the CPU plugin really runs
    int8_convolutions = [op for op in runtime.get_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"
                         and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8")]
    assert len(int8_convolutions) >= result.convolutions // 2
    with torch.inference_mode(), plain_inference():
        reference = net(x)
    assert not torch.allclose(out_int8, reference, atol=1e-6)  # really the quantised arithmetic
    assert torch.allclose(out_int8, reference, atol=0.25 * float(reference.abs().max()))
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_PRECISION", "f32")
    with torch.inference_mode():
        out_f32 = carrier(x)
    assert "f32" in {k[2] for k in engine._compiled}
    torch.testing.assert_close(out_f32, reference, rtol=1e-3, atol=1e-3)


def test_unreadable_int8_model_falls_back_to_f32_with_one_warning(quantised, capsys):
    net, _, _ = quantised
    carrier = unet(engine_int8=True)
    garbage = torch.from_numpy(np.frombuffer(b"<net>not an IR", dtype=np.uint8).copy())
    carrier.load_state_dict({**net.state_dict(), int8.XML_KEY: garbage,
                             int8.BIN_KEY: torch.zeros(8, dtype=torch.uint8)})
    carrier.eval()
    x = torch.from_numpy(blob_image(5))
    with torch.inference_mode():
        first = carrier(x)
        second = carrier(x)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "converted the network for OpenVINO" not in line]  # the f32 model's first conversion
    assert len(err) == 1 and "INT8 model" in err[0] and "f32 weights on the engine" in err[0]
    with torch.inference_mode(), plain_inference():
        reference = net(x)
    torch.testing.assert_close(first, reference, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(second, first)
    assert engine.STATS.inferences == 2


def test_int8_network_refuses_training_and_tells_what_to_do(quantised):
    net, _, result = quantised
    carrier = with_payload(net, result.model)
    with pytest.raises(CompressError, match="fine-tune the parent folder .* then quantise again"):
        carrier.train()
    carrier.eval()  # eval stays possible (the predictor calls it)


def test_payload_loads_at_each_folds_size_and_is_stripped_for_derived_networks(quantised):
    net, _, result = quantised
    carrier = with_payload(net, result.model)
    state = carrier.state_dict()
    assert state[int8.XML_KEY].dtype == torch.uint8 and state[int8.XML_KEY].numel() > 100
    other = unet(engine_int8=True)
    with torch.inference_mode():  # as nnU-Net's predictor loads each fold
        other.load_state_dict({**state, int8.XML_KEY: state[int8.XML_KEY][:50]})  # another fold: another size
    assert other.state_dict()[int8.XML_KEY].numel() == 50
    assert not other.state_dict()[int8.XML_KEY].is_inference()  # the engine's weight signature reads versions
    f32 = unet()
    with pytest.raises(CompressError, match="does not match"):
        f32.load_state_dict(state)  # plans without the INT8 flag do not take an INT8 checkpoint silently
    f32.load_parent_weights(state)  # a derived (f32) network takes the f32 weights of an INT8 parent
    torch.testing.assert_close(f32.state_dict()["decoder.seg_layers.1.weight"], state["decoder.seg_layers.1.weight"])


def test_torch_engine_runs_f32_weights_with_one_notice(quantised, monkeypatch, capsys):
    net, _, result = quantised
    carrier = with_payload(net, result.model)
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")
    x = torch.from_numpy(blob_image(2))
    with torch.inference_mode():
        out = carrier(x)
        carrier(x)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "INT8 weights run on OpenVINO's CPU engine only" in err[0] and "torch engine" in err[0]
    with torch.inference_mode(), plain_inference():
        torch.testing.assert_close(out, net(x))
