"""Sauron's feature maps come from forward hooks; they must give the same loss and gradients under torch.compile."""

import pytest
import torch
from torch import nn

from nnunet_compress.network import CompressedUNet
from nnunet_compress.pruning.dependency import channel_groups
from nnunet_compress.pruning.feature_maps import FeatureMapRecorder
from nnunet_compress.pruning.sauron import sauron_regulariser
from nnunet_compress.pruning.surgery import prune_channels

KWARGS = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
              conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


def make_net():
    torch.manual_seed(0)
    return CompressedUNet(1, 3, "dynamic_network_architectures.architectures.unet.PlainConvUNet", **KWARGS)


def loss_and_grads(net, model, recorder, x):
    net.zero_grad()
    out = model(x)
    maps = recorder.take()
    reg = sauron_regulariser([f for fs in maps.values() for f in fs], 0.5)
    (sum(o.mean() for o in out) + reg).backward()
    return reg.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}, maps


def test_recorder_sees_every_prunable_group_once_per_forward():
    net = make_net().train()
    groups = [g for g in channel_groups(net) if g.prunable]
    recorder = FeatureMapRecorder().attach(net, groups)
    net(torch.randn(1, 1, 16, 16, 16))
    maps = recorder.take()
    assert set(maps) == {g.name for g in groups}
    for g in groups:
        assert all(f.shape[1] == g.size for f in maps[g.name])
    with torch.no_grad():  # validation / inference: nothing recorded
        net(torch.randn(1, 1, 16, 16, 16))
    assert recorder.take() == {}


@pytest.mark.parametrize("prune_first", [False, True])
def test_same_regulariser_and_gradients_under_torch_compile(prune_first):
    net = make_net().train()
    if prune_first:  # after channel surgery the recorder is re-attached, as the trainer does
        group = [g for g in channel_groups(net) if g.prunable][1]
        prune_channels(net, {group.name: [0, 2, 3]})
    groups = [g for g in channel_groups(net) if g.prunable]
    recorder = FeatureMapRecorder().attach(net, groups)
    x = torch.randn(2, 1, 16, 16, 16)
    reg_eager, grads_eager, maps_eager = loss_and_grads(net, net, recorder, x)
    compiled = torch.compile(net, backend="aot_eager")  # dynamo's tracing of the hooks, without codegen time
    reg_compiled, grads_compiled, maps_compiled = loss_and_grads(net, compiled, recorder, x)
    torch._dynamo.reset()
    assert reg_eager > 0
    assert set(maps_compiled) == set(maps_eager)
    torch.testing.assert_close(reg_compiled, reg_eager, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads_eager.keys()
    for k in grads_eager:
        torch.testing.assert_close(grads_compiled[k], grads_eager[k], rtol=1e-4, atol=1e-6)
