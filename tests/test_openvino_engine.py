"""The OpenVINO CPU engine behind CompressedUNet.forward: same predictions as torch, cached, and never a crash.

Numerical checks against the same network run on torch's plain path (``plain_inference()``): logits within 1e-3
relative (the engine sums in another order and fuses norms), labels at least 99.9% identical, for a single patch
and for nnU-Net's own sliding-window predictor. Plus the cache (a second process start converts nothing; new
weights never reuse old ones; a damaged entry is rebuilt), the thread count handed to OpenVINO, the fallback to
torch with one warning, and every place where the engine must stay out (autograd, training mode, deep
supervision, FLOP counting, ``NNUNET_COMPRESS_CPU_ENGINE=torch``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.errors import CompressError
from nnunet_compress.inference import openvino_engine as engine
from nnunet_compress.inference.settings import from_environment, plain_inference
from nnunet_compress.network import CompressedUNet
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import choose_ranks

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
PATCH = (16, 16, 16)


@pytest.fixture(autouse=True)
def engine_cache(fresh_openvino_engine):
    """Each test starts with an empty disk cache of its own and nothing compiled in memory."""
    return fresh_openvino_engine


def unet(seed: int = 0, deep_supervision: bool = False, **compression) -> CompressedUNet:
    torch.manual_seed(seed)
    net = CompressedUNet(1, 3, PLAIN, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=3,
                         strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision,
                         **compression)
    with torch.no_grad():  # non-trivial norms, so that a wrong channel would show
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def tucker_unet(seed: int = 0) -> CompressedUNet:
    net = unet(seed)
    ranks = choose_ranks(net, RankPolicy(ratio=0.5, min_rank=4), PATCH)
    assert ranks
    replace_convs(net, ranks, decompose=True)
    return net.eval()


def plain(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), plain_inference():
        return net(x)


def on_engine(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(x)


def assert_agrees(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-3, rel
    same = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert same >= 0.999, same


@pytest.mark.parametrize("make", [unet, tucker_unet], ids=["original", "tucker"])
def test_engine_agrees_with_torch(make):
    net = make()
    x = torch.randn(1, 1, *PATCH)
    out = on_engine(net, x)
    assert engine.STATS.inferences == 1 and len(engine.STATS.conversions) == 1
    assert_agrees(out, plain(net, x))
    # the same patch again (the sliding window's case): compiled model reused, nothing converted or compiled
    again = on_engine(net, x + 0.1)
    assert engine.STATS.inferences == 2 and len(engine.STATS.conversions) == 1 and len(engine.STATS.compilations) == 1
    assert_agrees(again, plain(net, x + 0.1))


def test_batch_of_two_and_other_shape_get_their_own_model():
    net = tucker_unet()
    x = torch.randn(2, 1, 16, 16, 24)
    assert_agrees(on_engine(net, x), plain(net, x))
    y = torch.randn(1, 1, *PATCH)
    assert_agrees(on_engine(net, y), plain(net, y))
    assert len(engine.STATS.conversions) == 2


def test_cache_serves_a_new_process_and_new_weights_are_converted_again(engine_cache):
    net = tucker_unet()
    x = torch.randn(1, 1, *PATCH)
    first = on_engine(net, x)
    entries = [p for p in (engine_cache / "openvino").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file() and (entries[0] / "model.bin").is_file()
    engine.clear()  # as a new process: nothing in memory, the disk cache stays
    assert torch.equal(on_engine(net, x), first)
    assert len(engine.STATS.conversions) == 1 and len(engine.STATS.cache_loads) == 1
    # other weights loaded into the same network object (nnU-Net's predictor does this for each fold)
    other = tucker_unet(seed=1)
    net.load_state_dict(other.state_dict())
    out = on_engine(net, x)
    assert len(engine.STATS.conversions) == 2
    assert_agrees(out, plain(other, x))
    assert not torch.allclose(out, first)


def test_weights_changed_in_place_are_noticed():
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    on_engine(net, x)
    with torch.no_grad():
        net.decoder.seg_layers[-1].weight.mul_(-1)  # bumps the tensor's version, as an optimizer step does
    assert_agrees(on_engine(net, x), plain(net, x))
    assert len(engine.STATS.conversions) == 2


def test_damaged_cache_entry_is_rebuilt(engine_cache, capsys):
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    on_engine(net, x)
    entry = next(p for p in (engine_cache / "openvino").iterdir() if not p.name.startswith("."))
    (entry / "model.xml").write_text("<not a model")
    engine.clear()
    capsys.readouterr()
    assert_agrees(on_engine(net, x), plain(net, x))
    err = capsys.readouterr().err
    assert "unreadable" in err and "converting again" in err
    assert len(engine.STATS.conversions) == 2 and not engine.STATS.fallbacks


def test_unwritable_cache_keeps_the_model_in_memory(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NNUNET_COMPRESS_CACHE_DIR", str(blocker / "cache"))  # below a file: cannot be created
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    assert_agrees(on_engine(net, x), plain(net, x))
    assert "cannot write the OpenVINO cache" in capsys.readouterr().err
    assert engine.STATS.inferences == 1 and not engine.STATS.fallbacks


def test_threads_follow_torch():
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            on_engine(net, x)
            compiled = engine._compiled[next(reversed(engine._compiled))]
            assert int(compiled.model.get_property("INFERENCE_NUM_THREADS")) == threads
            assert str(compiled.model.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    finally:
        torch.set_num_threads(before)
    assert len(engine.STATS.conversions) == 1 and len(engine.STATS.compilations) == 2


def test_precision_is_f32_unless_asked(monkeypatch):
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    on_engine(net, x)
    compiled = engine._compiled[next(reversed(engine._compiled))]
    assert "float32" in str(compiled.model.get_property("INFERENCE_PRECISION_HINT")).lower()
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_PRECISION", "bogus")
    with pytest.raises(CompressError, match="NNUNET_COMPRESS_CPU_PRECISION='bogus'.*f32"):
        from_environment()


def test_failed_conversion_falls_back_to_torch_with_one_warning(monkeypatch, capsys):
    def broken(net, x):
        raise RuntimeError("this frontend cannot take that op\nmore detail")
    monkeypatch.setattr(engine, "convert", broken)
    net = tucker_unet()
    x = torch.randn(1, 1, *PATCH)
    with torch.inference_mode():
        ref = net(torch.zeros_like(x))  # noqa: F841 (first call: the failure)
        out = net(x)
        net(x)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OpenVINO cannot run CompressedUNet" in err[0] and "this frontend" in err[0]
    assert "using torch's CPU path" in err[0]
    assert len(engine.STATS.fallbacks) == 1 and engine.STATS.inferences == 0
    assert torch.allclose(out, plain(net, x), rtol=1e-4, atol=1e-5)


def test_failed_compilation_falls_back(monkeypatch, capsys):
    import openvino as ov

    def refuse(self, *args, **kwargs):
        raise RuntimeError("device refused")
    monkeypatch.setattr(ov.Core, "compile_model", refuse)
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    assert torch.allclose(on_engine(net, x), plain(net, x), rtol=1e-4, atol=1e-5)
    assert "device refused" in capsys.readouterr().err


def test_engine_stays_out_where_torch_must_run(monkeypatch):
    net = unet()
    x = torch.randn(1, 1, *PATCH)
    net(x).sum().backward()  # autograd: training and gradient-based importance scores
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    assert counter.get_total_flops() > 0
    with torch.no_grad():
        net.train()
        net(x)
        net.eval()
        with plain_inference():
            net(x)
        monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "torch")
        net(x)
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "openvino")
    deep = unet(deep_supervision=True)
    with torch.no_grad():
        assert isinstance(deep(x), (list, tuple))  # several outputs (training's validation): torch
    assert engine.STATS.inferences == 0 and not engine.STATS.conversions


def test_unknown_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "tensorrt")
    with pytest.raises(CompressError, match="NNUNET_COMPRESS_CPU_ENGINE='tensorrt'.*openvino, torch"):
        from_environment()


def test_sliding_window_labels_match_torch():
    """nnU-Net's own sliding window (Gaussian weighting, several overlapping patches) on the engine vs torch."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    net = tucker_unet()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(PATCH))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=3)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    image = torch.randn(1, 30, 26, 34)
    out = predictor.predict_sliding_window_return_logits(image)
    assert engine.STATS.inferences >= 8 * 8 and len(engine.STATS.conversions) == 1  # 8 patches × 8 mirrorings
    with plain_inference():
        ref = predictor.predict_sliding_window_return_logits(image)
    assert_agrees(out.float(), ref.float())
