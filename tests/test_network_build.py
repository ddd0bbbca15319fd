"""CompressedUNet's constructor: the shapes recorded in compressed plans (channel counts, Tucker ranks) are rebuilt
exactly, whichever device the build runs on internally (meta for factorised networks, CPU for pruned ones)."""

from __future__ import annotations

import torch
from torch import nn

from nnunet_compress.network import CompressedUNet
from nnunet_compress.pruning.dependency import channel_groups
from nnunet_compress.pruning.surgery import channel_counts, prune_channels

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
KWARGS = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2],
              n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
              deep_supervision=False)


def test_pruned_channel_counts_are_rebuilt_and_load_strictly():
    torch.manual_seed(0)
    pruned = CompressedUNet(1, 3, PLAIN, **KWARGS)
    keep = {g.name: list(range(0, g.size, 2)) for g in channel_groups(pruned)[:3]}
    prune_channels(pruned, keep)
    counts = channel_counts(pruned)
    rebuilt = CompressedUNet(1, 3, PLAIN, channels=counts, **KWARGS)
    assert channel_counts(rebuilt) == counts
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every key and shape matches
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x))


def test_factorised_network_is_built_with_real_memory_and_initialised():
    ranks = {"encoder.stages.1.0.convs.0.conv": [8, 4]}
    net = CompressedUNet(1, 3, PLAIN, tucker_ranks=ranks, **KWARGS)
    tensors = list(net.parameters()) + list(net.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
    core = net.get_submodule("encoder.stages.1.0.convs.0.conv")[1]
    assert tuple(core.weight.shape[:2]) == (8, 4)
    assert float(core.weight.detach().std()) > 0  # initialised, not left as zeros
