"""The channel dependency map against group structures written out by hand from DNA's source."""

from __future__ import annotations

import pytest
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet
from dynamic_network_architectures.building_blocks.residual import BottleneckD
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import ChannelGroup, channel_groups


def plain_unet(**overrides) -> PlainConvUNet:
    kwargs = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=[1, 2, 2], n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs.update(overrides)
    return PlainConvUNet(**kwargs)


def residual_unet(**overrides) -> ResidualEncoderUNet:
    kwargs = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=[1, 2, 2], n_blocks_per_stage=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1,
                  conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs.update(overrides)
    return ResidualEncoderUNet(**kwargs)


def by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def test_plain_unet_groups_match_hand_written_map():
    groups = by_name(channel_groups(plain_unet()))
    e = "encoder.stages"
    expected = {
        # name: (size, consumers, prunable)
        f"{e}.0.0.convs.0.conv": (4, ((f"{e}.0.0.convs.1.conv", 0),), True),
        f"{e}.0.0.convs.1.conv": (4, ((f"{e}.1.0.convs.0.conv", 0), ("decoder.stages.1.convs.0.conv", 4)), True),
        f"{e}.1.0.convs.0.conv": (8, ((f"{e}.1.0.convs.1.conv", 0),), True),
        f"{e}.1.0.convs.1.conv": (8, ((f"{e}.2.0.convs.0.conv", 0), ("decoder.stages.0.convs.0.conv", 8)), True),
        f"{e}.2.0.convs.0.conv": (16, ((f"{e}.2.0.convs.1.conv", 0),), True),
        f"{e}.2.0.convs.1.conv": (16, (("decoder.transpconvs.0", 0),), True),
        "decoder.transpconvs.0": (8, (("decoder.stages.0.convs.0.conv", 0),), True),
        "decoder.stages.0.convs.0.conv": (8, (("decoder.stages.0.convs.1.conv", 0),), True),
        "decoder.stages.0.convs.1.conv": (8, (("decoder.seg_layers.0", 0), ("decoder.transpconvs.1", 0)), True),
        "decoder.seg_layers.0": (3, (), False),
        "decoder.transpconvs.1": (4, (("decoder.stages.1.convs.0.conv", 0),), True),
        "decoder.stages.1.convs.0.conv": (4, (("decoder.stages.1.convs.1.conv", 0),), True),
        "decoder.stages.1.convs.1.conv": (4, (("decoder.seg_layers.1", 0),), True),
        "decoder.seg_layers.1": (3, (), False),
    }
    assert set(groups) == set(expected)
    for name, (size, consumers, prunable) in expected.items():
        g = groups[name]
        assert (g.size, set(g.consumers), g.prunable) == (size, set(consumers), prunable), name
        assert g.producers == (name,)
    block = "encoder.stages.1.0.convs.1"
    assert groups[f"{block}.conv"].norms == (f"{block}.norm",)
    assert groups[f"{block}.conv"].activations == (block,)
    assert groups["decoder.transpconvs.0"].norms == ()
    assert groups["decoder.transpconvs.0"].activations == ("decoder.transpconvs.0",)


def test_residual_unet_groups_merge_summed_tensors_stage_wide():
    groups = by_name(channel_groups(residual_unet()))
    s0 = groups["encoder.stem.convs.0.conv"]  # stage 0: stem + identity-skip block share channels
    assert s0.producers == ("encoder.stem.convs.0.conv", "encoder.stages.0.blocks.0.conv2.conv")
    assert s0.norms == ("encoder.stem.convs.0.norm", "encoder.stages.0.blocks.0.conv2.norm")
    assert s0.activations == ("encoder.stem.convs.0", "encoder.stages.0.blocks.0")
    assert set(s0.consumers) == {("encoder.stages.0.blocks.0.conv1.conv", 0),
                                 ("encoder.stages.1.blocks.0.conv1.conv", 0),
                                 ("encoder.stages.1.blocks.0.skip.1.conv", 0), ("decoder.stages.1.convs.0.conv", 4)}
    b = "encoder.stages.1.blocks"
    s1 = groups[f"{b}.0.conv2.conv"]  # stage 1: projection starts a new group, block 1 adds into it
    assert s1.producers == (f"{b}.0.conv2.conv", f"{b}.0.skip.1.conv", f"{b}.1.conv2.conv")
    assert s1.norms == (f"{b}.0.conv2.norm", f"{b}.0.skip.1.norm", f"{b}.1.conv2.norm")
    assert s1.activations == (f"{b}.0", f"{b}.1")
    assert set(s1.consumers) == {(f"{b}.1.conv1.conv", 0), ("encoder.stages.2.blocks.0.conv1.conv", 0),
                                 ("encoder.stages.2.blocks.0.skip.1.conv", 0), ("decoder.stages.0.convs.0.conv", 8)}
    inner = groups[f"{b}.1.conv1.conv"]
    assert inner.consumers == ((f"{b}.1.conv2.conv", 0),) and inner.activations == (f"{b}.1.conv1",)
    s2 = groups["encoder.stages.2.blocks.0.conv2.conv"]
    assert set(s2.consumers) == {("encoder.stages.2.blocks.1.conv1.conv", 0), ("decoder.transpconvs.0", 0)}
    # 3 residual groups + 5 inner conv1 groups + 2 x (transpconv, conv, seg) in the decoder
    assert len(groups) == 3 + 5 + 6
    assert [g.prunable for g in groups.values()].count(False) == 2


def test_pooling_only_skip_merges_groups_across_stages():
    """Equal widths in consecutive stages: the strided block's skip is an AvgPool, so both stages share channels."""
    net = residual_unet(conv_op=nn.Conv2d, norm_op=nn.BatchNorm2d, features_per_stage=[8, 8, 16],
                        block=BottleneckD, bottleneck_channels=[2, 4, 4], deep_supervision=False)
    groups = by_name(channel_groups(net))
    merged = groups["encoder.stem.convs.0.conv"]
    assert "encoder.stages.1.blocks.1.conv3.conv" in merged.producers
    assert ("decoder.stages.0.convs.0.conv", 8) in merged.consumers
    assert ("decoder.stages.1.convs.0.conv", 8) in merged.consumers
    assert groups["encoder.stages.0.blocks.0.conv2.conv"].size == 2  # bottleneck inner groups


def test_order_is_deterministic_and_names_survive_a_rebuild():
    names = [g.name for g in channel_groups(plain_unet())]
    assert names == [g.name for g in channel_groups(plain_unet())]
    assert names[0] == "encoder.stages.0.0.convs.0.conv" and names[-1] == "decoder.seg_layers.1"


def test_wrapper_module_with_encoder_and_decoder_is_supported():
    base = plain_unet(conv_op=nn.Conv2d, norm_op=nn.InstanceNorm2d)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = base.encoder, base.decoder

        def forward(self, x):
            return self.decoder(self.encoder(x))

    assert [g.name for g in channel_groups(Wrapper())] == [g.name for g in channel_groups(base)]


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3)),
    lambda: ResidualUNet(1, 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], 1, 2, 1, True, nn.BatchNorm2d),
    lambda: residual_unet(conv_op=nn.Conv2d, norm_op=nn.BatchNorm2d, n_blocks_per_stage=1),  # patched below
])
def test_unsupported_networks_raise_compress_error(make):
    net = make()
    if isinstance(net, ResidualEncoderUNet):
        net.encoder.stages[1].blocks[0].apply_se = True  # squeeze-excitation couples channels across the map
    with pytest.raises(CompressError, match="supports"):
        channel_groups(net)


def test_group_norm_is_rejected():
    net = plain_unet(conv_op=nn.Conv2d, norm_op=lambda channels: nn.GroupNorm(2, channels), norm_op_kwargs=None)
    with pytest.raises(CompressError, match="GroupNorm"):
        channel_groups(net)


def test_inconsistent_network_is_detected():
    net = plain_unet()
    net.decoder.stages[0].convs[0].conv.in_channels += 1
    with pytest.raises(CompressError, match="rebuild it from its plans"):
        channel_groups(net)
