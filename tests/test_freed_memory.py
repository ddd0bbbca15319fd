"""keep_freed_memory: large freed blocks are reused without new page faults, values unchanged, limits restored."""

import resource

import pytest
import torch

from nnunet_compress import fast_inference as fi
from nnunet_compress import freed_memory as fm

needs_glibc = pytest.mark.skipif(not fm.available(), reason="glibc malloc only")
MB = 1 << 20


def faults_of_fresh_block(n_bytes: int) -> int:
    """Minor page faults taken to allocate and fill a new float32 tensor of n_bytes, then free it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(n_bytes // 4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del t
    return after - before


@needs_glibc
def test_freed_blocks_are_reused_without_page_faults_inside_and_returned_after():
    pages = 64 * MB // resource.getpagesize()
    faults_of_fresh_block(64 * MB)
    # outside: glibc maps every 64 MB block afresh, so filling it faults in (nearly) every page
    assert faults_of_fresh_block(64 * MB) > 0.5 * pages
    with fm.keep_freed_memory():
        faults_of_fresh_block(64 * MB)  # the first block inside comes from the heap and is kept when freed
        assert faults_of_fresh_block(64 * MB) < 0.05 * pages
    assert fm.depth() == 0
    assert faults_of_fresh_block(64 * MB) > 0.5 * pages  # default limits are back


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
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn
    from nnunet_compress.network import CompressedUNet
    torch.manual_seed(0)
    net = CompressedUNet(1, 3, "dynamic_network_architectures.architectures.unet.PlainConvUNet", n_stages=3,
                         features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2],
                         n_conv_per_stage=2, n_conv_per_stage_decoder=1, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()
    depths = []
    net.encoder.stages[0].register_forward_hook(lambda *_: depths.append(fm.depth()))
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = {}
    for keep in (True, False):
        monkeypatch.setattr(fi.OPTIONS, "keep_freed_memory", keep)
        with torch.inference_mode():
            outputs[keep] = net(x)
    assert torch.equal(outputs[True], outputs[False])
    assert depths == ([1, 0] if fm.available() else [0, 0])
    assert fm.depth() == 0
