"""Factorised activations (factorised_maps.py, factorised_forward.py): same outputs as the plain path.

References are torch's own functions (F.instance_norm, F.leaky_relu, conv1x1 as F.conv3d, torch.var_mean in
float64) and the network's ordinary module-by-module forward under ``plain_inference()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_compress import factorised_forward, factorised_maps
from nnunet_compress import fast_inference as fi
from nnunet_compress.factorised_maps import (FactorisedMap, affine_instance_norm, channel_variance_mean,
                                             factorised_instance_norm)
from nnunet_compress.network import CompressedUNet
from nnunet_compress.tucker import replace_convs
from nnunet_compress.tucker_compress import RankPolicy, choose_ranks

from test_fast_inference import PLAIN, TOL, both, rel_err, tucker_unet, unet

# these tests are about torch's CPU paths, the fallback of the OpenVINO engine
pytestmark = pytest.mark.usefixtures("torch_engine")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 100 voxels, so that every map spans many blocks and a ragged last one (and no autograd)."""
    monkeypatch.setattr(factorised_maps, "BLOCK_VOXELS", 100)
    with torch.no_grad():
        yield


def activation(y: torch.Tensor, slope: float | None) -> torch.Tensor:
    return y if slope is None else F.leaky_relu(y, slope)


# ---- the maps on their own ---------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", [None, 0.0, 0.01])
@pytest.mark.parametrize("bias", [False, True])
def test_factorised_map_project_and_materialize(small_blocks, slope, bias):
    torch.manual_seed(0)
    batch, rank, channels, spatial = 2, 5, 12, (7, 9, 11)
    z = torch.randn(batch, rank + 1, 7 * 9 * 11)
    z[:, rank] = 1.0
    weight = torch.randn(batch, channels, rank + 1)
    m = FactorisedMap(z, weight, slope, spatial)
    dense = activation(torch.bmm(weight, z), slope).view(batch, channels, *spatial)
    assert rel_err(m.materialize(), dense) < 1e-6
    w, b = torch.randn(3, channels), (torch.randn(3) if bias else None)
    expected = F.conv3d(dense, w[:, :, None, None, None], b)
    assert m.project(w, b).shape == expected.shape
    assert rel_err(m.project(w, b), expected) < 1e-5


def test_factorised_instance_norm_equals_torch(small_blocks):
    """act(IN(U z + c)) from the thin z, against conv1x1 → F.instance_norm → leaky_relu (float64 reference).

    (Accuracy for z with a large mean: test_norm_folding.py, which uses the same maths.)"""
    torch.manual_seed(1)
    z = torch.randn(2, 4, 6, 8, 10)
    u, c = torch.randn(16, 4, 1, 1, 1), torch.randn(16)
    norm = nn.InstanceNorm3d(16, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    m = factorised_instance_norm(z, u, norm, 0.01)
    reference = F.leaky_relu(F.instance_norm(F.conv3d(z.double(), u.double(), c.double()),
                                             weight=norm.weight.double(), bias=norm.bias.double(), eps=norm.eps),
                             0.01)
    assert rel_err(m.materialize().double(), reference) < 1e-5
    w = torch.randn(3, 16)
    assert rel_err(m.project(w).double(), F.conv3d(reference, w.double()[:, :, None, None, None])) < 1e-5


def test_channel_statistics_and_affine_map_equal_torch(small_blocks):
    torch.manual_seed(2)
    y = torch.randn(2, 6, 9, 10, 11) * 5 + 300  # a large mean: the centred moments must not cancel
    variance, mean = channel_variance_mean(y.view(2, 6, -1))
    ref_var, ref_mean = torch.var_mean(y.double().view(2, 6, -1), dim=2, correction=0)
    assert rel_err(variance, ref_var) < 1e-5 and rel_err(mean, ref_mean) < 1e-7
    norm = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    m = affine_instance_norm(y, norm, 0.0)
    reference = F.relu(F.instance_norm(y.double(), weight=norm.weight.double(), bias=norm.bias.double(),
                                       eps=norm.eps))
    assert rel_err(m.materialize().double(), reference) < 1e-5
    w, b = torch.randn(4, 6), torch.randn(4)
    assert rel_err(m.project(w, b).double(), F.conv3d(reference, w.double()[:, :, None, None, None],
                                                      b.double())) < 1e-5


# ---- whole networks ----------------------------------------------------------------------------------------

def randomised(net: nn.Module) -> nn.Module:
    """Factors with non-trivial values, so that a wrong fold or a swapped skip half would show."""
    torch.manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0, 0.3)
    return net


def deep_supervised_tucker_unet() -> CompressedUNet:
    torch.manual_seed(0)
    net = CompressedUNet(1, 3, PLAIN, n_stages=3, features_per_stage=[16, 32, 48], conv_op=nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=1,
                         conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.ReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    replace_convs(net, choose_ranks(net, RankPolicy(ratio=0.25, min_rank=4), (16, 16, 16)), decompose=False)
    return net.eval()


def count_calls(net: nn.Module, kinds) -> list:
    calls = []
    for m in net.modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda module, *_: calls.append(module))
    return calls


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 1, 20, 16, 12)])
def test_factorised_forward_equals_plain_and_skips_full_width_work(small_blocks, shape):
    net = randomised(tucker_unet())
    assert factorised_forward.supported(net)
    x = torch.randn(shape)
    norms = count_calls(net, nn.InstanceNorm3d)
    upsampling_expansions = [t[2] for t in net.decoder.transpconvs]
    expansions = count_calls(net, nn.Conv3d)
    fast, plain = both(net, x)
    assert rel_err(fast, plain) < TOL
    plain_norms = len(norms)
    assert plain_norms > 0
    del norms[:], expansions[:]
    with torch.inference_mode():
        net(x)
    # no InstanceNorm ran as a module (all folded), and the transposed convs' expansions were merged away
    assert norms == [] and not any(e in expansions for e in upsampling_expansions)


def test_deep_supervision_relu_2d_and_switch(small_blocks, monkeypatch):
    net = randomised(deep_supervised_tucker_unet())
    x = torch.randn(1, 1, 16, 16, 16)
    fast, plain = both(net, x)
    assert isinstance(fast, list) and len(fast) == len(plain) == 2
    assert all(f.shape == p.shape and rel_err(f, p) < TOL for f, p in zip(fast, plain))

    net2d = randomised(tucker_unet(2))
    fast, plain = both(net2d, torch.randn(2, 1, 32, 32))
    assert rel_err(fast, plain) < TOL

    used = []
    monkeypatch.setattr(factorised_forward, "forward", lambda *a: used.append(1) or None)
    monkeypatch.setattr(fi.OPTIONS, "factorised_activations", False)
    with torch.inference_mode():
        assert net2d(torch.randn(1, 1, 32, 32)) is not None
    assert used == []


def test_blocks_it_cannot_fold_run_as_modules(small_blocks):
    """A dropout in a chain and an unfactorised conv fall back to the module, still exact."""
    net = randomised(tucker_unet())
    block = net.encoder.stages[1][0].convs[1]
    block.all_modules = nn.Sequential(block.all_modules[0], nn.Dropout3d(0.5), *list(block.all_modules)[1:])
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    fast, plain = both(net, x)
    assert rel_err(fast, plain) < TOL


def test_unsupported_structures_use_the_ordinary_forward():
    assert not factorised_forward.supported(unet())  # nothing factorised: nothing to gain
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    res = ResidualEncoderUNet(1, 2, [8, 16], nn.Conv3d, 3, [1, 2], [1, 1], 3, [1], conv_bias=True,
                              norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    assert not factorised_forward.supported(res)
