"""Profiling figures against hand-computed parameter and FLOP counts of a small nnU-Net U-Net."""

import json

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_compress.costs import count_parameters
from nnunet_compress.evaluation.profiling import format_profile, profile_network


def small_unet(deep_supervision: bool = False) -> PlainConvUNet:
    return PlainConvUNet(1, 2, [4, 8], nn.Conv3d, 3, [1, 2], 2, 3, 1, True, nn.InstanceNorm3d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=deep_supervision)


def conv_params(c_in, c_out, k):
    return c_out * c_in * k + c_out


# (name, params, FLOPs at 16^3) worked out by hand; FLOPs = 2 * output voxels * c_out * c_in * kernel volume
# (transposed conv: input voxels), the convention of torch's FlopCounterMode.
V0, V1 = 16 ** 3, 8 ** 3
EXPECTED = {
    "encoder.stages.0.0.convs.0.conv": (conv_params(1, 4, 27), 2 * V0 * 4 * 1 * 27),
    "encoder.stages.0.0.convs.1.conv": (conv_params(4, 4, 27), 2 * V0 * 4 * 4 * 27),
    "encoder.stages.1.0.convs.0.conv": (conv_params(4, 8, 27), 2 * V1 * 8 * 4 * 27),
    "encoder.stages.1.0.convs.1.conv": (conv_params(8, 8, 27), 2 * V1 * 8 * 8 * 27),
    "decoder.transpconvs.0": (8 * 4 * 8 + 4, 2 * V1 * 8 * 4 * 8),
    "decoder.stages.0.convs.0.conv": (conv_params(8, 4, 27), 2 * V0 * 4 * 8 * 27),
    "decoder.seg_layers.0": (conv_params(4, 3, 1), 2 * V0 * 3 * 4),
}
NORM_PARAMS = 2 * (4 + 4 + 8 + 8 + 4)


def test_profile_matches_hand_computed_counts():
    torch.manual_seed(0)
    prof = profile_network(small_unet(), 1, (16, 16, 16), runs=2, warmup=1)
    rows = {r.name: r for r in prof.layers}
    for name, (params, flops) in EXPECTED.items():
        assert rows[name].params == params, name
        assert rows[name].flops == flops, name
    assert prof.params == sum(p for p, _ in EXPECTED.values()) + NORM_PARAMS == 4355
    assert prof.flops == sum(f for _, f in EXPECTED.values())
    assert prof.latency_s > 0 and prof.latency_runs == 2
    assert prof.peak_memory_bytes is not None and prof.peak_memory_bytes >= 0
    text = format_profile(prof)
    assert "decoder.seg_layers.0" in text and "4,355" in text
    json.dumps(prof.to_dict())


def test_flops_scale_with_patch_volume():
    net = small_unet()
    small = profile_network(net, 1, (16, 16, 16), timing=False)
    large = profile_network(net, 1, (32, 32, 32), timing=False)
    assert large.flops == 8 * small.flops
    assert count_parameters(net) == small.params == large.params


def test_2d_network_profile():
    net = PlainConvUNet(3, 2, [4, 8], nn.Conv2d, 3, [1, 2], 1, 2, 1, False, nn.InstanceNorm2d, {"affine": True},
                        None, None, nn.ReLU, None)
    prof = profile_network(net, 3, (8, 8), timing=False)
    # stem conv 3->4 (no bias) at 8x8, then 4->8 stride 2 at 4x4, transposed 8->4, decoder 8->4, head 4->2
    expected = 2 * (64 * 4 * 3 * 9 + 16 * 8 * 4 * 9 + 16 * 8 * 4 * 4 + 64 * 4 * 8 * 9 + 64 * 2 * 4)
    assert prof.flops == expected
