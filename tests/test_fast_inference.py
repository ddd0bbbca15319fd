"""The CPU fast paths (nnunet_compress.inference.torch_paths) give the plain paths' results, and stay out of the way.

Numerical checks only (no timing): single convolutions of every geometry the re-routing handles, whole compressed
networks (Tucker-factorised and pruned, 3-d and 2-d, built as nnU-Net builds them: CompressedUNet from arch
kwargs) and nnU-Net's sliding-window predictor, each compared with the same computation under
``plain_inference()`` to 1e-4 relative. Plus where the fast paths must NOT act: autograd, FLOP counting.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.inference import torch_paths as fi
from nnunet_compress.inference.settings import plain_inference
from nnunet_compress.network import CompressedUNet
from nnunet_compress.pruning.surgery import channel_counts, set_channel_counts
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import choose_ranks

# these tests are about torch's CPU paths, the fallback of the OpenVINO engine
pytestmark = pytest.mark.usefixtures("torch_engine")

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def unet(dim: int = 3, **compression) -> CompressedUNet:
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(0)
    net = CompressedUNet(1, 4, PLAIN, n_stages=3, features_per_stage=[16, 32, 64], conv_op=conv, kernel_sizes=3,
                         strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
                         norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False, **compression)
    with torch.no_grad():  # non-trivial norms, so that a wrong channel would show
        for m in net.modules():
            if isinstance(m, norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def tucker_unet(dim: int = 3) -> CompressedUNet:
    net = unet(dim)
    patch = (16, 16, 16) if dim == 3 else (32, 32)
    ranks = choose_ranks(net, RankPolicy(ratio=0.25, min_rank=4), patch)
    assert ranks
    replace_convs(net, ranks, decompose=False)  # shapes are what matters here; HOOI would only cost time
    return net.eval()


def pruned_unet() -> CompressedUNet:
    net = unet()
    counts = {name: max(3, c // 2 - 1) for name, c in channel_counts(net).items()}  # odd, thin counts
    set_channel_counts(net, counts)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


def both(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        fast = net(x)
        with plain_inference():
            plain = net(x)
    return fast, plain


# ---- single convolutions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,kwargs", [
    ((1, 8, 12, 10, 9), dict(out=5, k=3, padding=1)),  # thin 3-d conv (torch's slow path)
    ((1, 8, 12, 10, 9), dict(out=6, k=3, padding=1, stride=2)),  # strided encoder conv
    ((2, 6, 8, 8, 8), dict(out=4, k=3, padding=2, dilation=2)),
    ((1, 8, 8, 8, 8), dict(out=8, k=3, padding=1, groups=2)),
    ((1, 7, 9, 8, 5), dict(out=3, k=1)),  # pointwise, bias, batch 1: addmm
    ((3, 7, 9, 8, 5), dict(out=3, k=1)),  # pointwise, batch > 1
    ((1, 5, 16, 12), dict(out=4, k=3, padding=1)),  # 2-d
    ((2, 5, 16, 12), dict(out=4, k=1)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_conv_matches_torch(shape, kwargs, bias):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    out, k = kwargs.pop("out"), kwargs.pop("k")
    groups = kwargs.get("groups", 1)
    x = torch.randn(shape)
    w = torch.randn(out, shape[1] // groups, *(k,) * (len(shape) - 2))
    b = torch.randn(out) if bias else None
    conv = F.conv3d if len(shape) == 5 else F.conv2d
    expected = conv(x, w, b, **kwargs)
    got = fi.fast_conv(x, w, b, **kwargs)
    assert got is not None and got.shape == expected.shape
    assert rel_err(got, expected) < TOL


def test_fast_conv_declines_what_it_cannot_do():
    x, w = torch.randn(1, 4, 6, 6, 6), torch.randn(4, 4, 3, 3, 3)
    assert fi.fast_conv(x, w, padding="same") is None
    assert fi.fast_conv(x.double(), w.double()) is None


# ---- whole networks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,shape", [(tucker_unet, (1, 1, 16, 16, 16)), (pruned_unet, (1, 1, 16, 16, 16)),
                                         (lambda: tucker_unet(2), (2, 1, 32, 32)), (unet, (1, 1, 16, 16, 16))])
def test_network_fast_equals_plain(build, shape):
    net = build()
    x = torch.randn(shape)
    assert fi.fast_paths_apply(x) is False  # grad mode on: off
    with torch.inference_mode():
        assert fi.fast_paths_apply(x)
    fast, plain = both(net, x)
    assert rel_err(fast, plain) < TOL


def test_fast_paths_really_reroute(monkeypatch):
    """The mode intercepts the network's convs: with the re-routing broken on purpose, outputs change."""
    net, x = tucker_unet(), torch.randn(1, 1, 16, 16, 16)
    calls = []
    original = fi.fast_conv
    monkeypatch.setattr(fi, "fast_conv", lambda *a, **k: calls.append(1) or original(*a, **k))
    ran = []
    handles = [m.register_forward_hook(lambda *_: ran.append(1)) for m in net.modules() if isinstance(m, nn.Conv3d)]
    with torch.inference_mode():
        net(x)
    for h in handles:
        h.remove()
    assert len(calls) == len(ran) > 0


def test_off_while_training_and_counting_flops():
    net, x = tucker_unet(), torch.randn(1, 1, 16, 16, 16)
    net.train()
    out = net(x)  # autograd records: the plain differentiable path
    out.sum().backward()
    assert not fi.fast_paths_apply(x)
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None
    net.eval()
    counts = []
    for plain in (False, True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            if plain:
                with plain_inference():
                    net(x)
            else:
                net(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_state_dict_and_modules_untouched():
    net = tucker_unet()
    keys = list(net.state_dict())
    with torch.inference_mode():
        net(torch.randn(1, 1, 16, 16, 16))
    assert list(net.state_dict()) == keys


def test_sliding_window_prediction_equal():
    """nnU-Net's predictor (sliding window, Gaussian weighting) gives the same logits on both paths."""
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    net = tucker_unet()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=4)
    predictor.allowed_mirroring_axes = None
    image = torch.randn(1, 24, 20, 28)
    fast = predictor.predict_sliding_window_return_logits(image).float()
    with plain_inference():
        plain = predictor.predict_sliding_window_return_logits(image).float()
    # the predictor accumulates in float16: compare at that precision's resolution
    assert rel_err(fast, plain) < 2e-3
