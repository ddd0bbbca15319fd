"""keep_freed_memory: a forward pass faults in fewer new pages, values are unchanged, limits are restored."""

import resource

import pytest
import torch

from nnunet_compress.inference import freed_memory as fm
from nnunet_compress.inference.settings import OPTIONS

# these tests are about torch's CPU paths, the fallback of the OpenVINO engine
pytestmark = pytest.mark.usefixtures("torch_engine")

needs_glibc = pytest.mark.skipif(not fm.available(), reason="glibc malloc only")
MB = 1 << 20


def forward_page_faults(net, x, keep: bool, monkeypatch) -> int:
    """Minor page faults of one inference forward pass (fewest of two, after a warm-up)."""
    monkeypatch.setattr(OPTIONS, "keep_freed_memory", keep)
    counts = []
    with torch.inference_mode():
        net(x)
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net(x)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts)


@needs_glibc
def test_a_forward_pass_reuses_freed_feature_maps_instead_of_faulting_in_new_pages(monkeypatch):
    # 96³ feature maps of 16 channels are 56 MB: above glibc's largest mmap threshold (32 MB), so without the block
    # every one of them is mapped afresh, page by page
    net = small_unet()
    x = torch.randn(1, 1, 96, 96, 96)
    without = forward_page_faults(net, x, False, monkeypatch)
    with_keep = forward_page_faults(net, x, True, monkeypatch)
    assert without > 56 * MB // resource.getpagesize()  # at least one full-size map was faulted in
    assert with_keep < 0.7 * without, (with_keep, without)
    assert fm.depth() == 0


def test_nesting_and_errors_leave_the_default_limits_restored():
    with fm.keep_freed_memory():
        with fm.keep_freed_memory():
            assert fm.depth() == (2 if fm.available() else 0)
        assert fm.depth() == (1 if fm.available() else 0)
    with pytest.raises(RuntimeError):
        with fm.keep_freed_memory():
            raise RuntimeError("boom")
    assert fm.depth() == 0


def test_forward_runs_inside_the_block_and_outputs_are_bit_identical(monkeypatch):
    net = small_unet()
    depths = []
    net.encoder.stages[0].register_forward_hook(lambda *_: depths.append(fm.depth()))
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = {}
    for keep in (True, False):
        monkeypatch.setattr(OPTIONS, "keep_freed_memory", keep)
        with torch.inference_mode():
            outputs[keep] = net(x)
    assert torch.equal(outputs[True], outputs[False])
    assert depths == ([1, 0] if fm.available() else [0, 0])
    assert fm.depth() == 0


def small_unet():
    from torch import nn

    from nnunet_compress.network import CompressedUNet
    torch.manual_seed(0)
    return CompressedUNet(1, 3, "dynamic_network_architectures.architectures.unet.PlainConvUNet", n_stages=3,
                          features_per_stage=[16, 16, 16], conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2],
                          n_conv_per_stage=1, n_conv_per_stage_decoder=1, conv_bias=True,
                          norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                          nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()
