"""InstanceNorm folded into a factorised conv's last 1×1 factor: the same numbers as conv → norm → act."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_compress import fast_inference as fi
from nnunet_compress import norm_folding
from nnunet_compress.tucker import TuckerConv

from test_fast_inference import TOL, rel_err, tucker_unet, unet

# these tests are about torch's CPU paths, the fallback of the OpenVINO engine
pytestmark = pytest.mark.usefixtures("torch_engine")


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_normalized_expansion_equals_instance_norm_of_the_expansion(offset):
    torch.manual_seed(0)
    z = torch.randn(2, 5, 6, 7, 8) * torch.rand(1, 5, 1, 1, 1) * 3 + offset  # a large mean tests cancellation
    weight, bias = torch.randn(12, 5, 1, 1, 1), torch.randn(12)
    norm = nn.InstanceNorm3d(12, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        expected = F.instance_norm(F.conv3d(z.double(), weight.double(), bias.double()),
                                   weight=norm.weight.double(), bias=norm.bias.double(), eps=1e-5)
        folded = norm_folding.normalized_expansion(z, weight, norm)
        plain = F.instance_norm(F.conv3d(z, weight, bias), weight=norm.weight, bias=norm.bias, eps=1e-5)
    assert folded.shape == expected.shape and folded.dtype == torch.float32
    # as exact as float32 allows: never worse than conv → InstanceNorm computed in float32 the ordinary way
    plain_error = rel_err(plain.double(), expected)
    assert rel_err(folded.double(), expected) <= max(1e-5, plain_error), plain_error


def test_install_swaps_exactly_the_factorised_conv_norm_chains_and_keeps_the_state_dict():
    net = tucker_unet()
    keys = list(net.state_dict())
    eligible = [m for m in net.modules() if hasattr(m, "all_modules") and isinstance(m.all_modules[0], TuckerConv)]
    assert eligible
    assert norm_folding.install(net) == len(eligible)
    assert norm_folding.install(net) == len(eligible)  # idempotent
    assert all(isinstance(m.all_modules, norm_folding.FoldableConvNormAct) for m in eligible)
    assert list(net.state_dict()) == keys
    assert norm_folding.install(unet()) == 0  # nothing factorised: nothing to fold


def test_chains_with_dropout_or_without_affine_norm_are_not_folded():
    tucker = TuckerConv.shaped_like(nn.Conv3d(8, 8, 3, padding=1), 4, 4)
    assert norm_folding.foldable(nn.Sequential(tucker, nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU()))
    assert not norm_folding.foldable(nn.Sequential(tucker, nn.Dropout3d(), nn.InstanceNorm3d(8, affine=True)))
    assert not norm_folding.foldable(nn.Sequential(tucker, nn.InstanceNorm3d(8, affine=False)))
    assert not norm_folding.foldable(nn.Sequential(tucker, nn.BatchNorm3d(8)))
    assert not norm_folding.foldable(nn.Sequential(nn.Conv3d(8, 8, 3), nn.InstanceNorm3d(8, affine=True)))


def test_folded_network_skips_the_norms_at_inference_and_matches_the_plain_path(monkeypatch):
    # the module-by-module forward (factorised activations would also fold the unfactorised stem's norm)
    monkeypatch.setattr(fi.OPTIONS, "factorised_activations", False)
    net = tucker_unet()
    with torch.no_grad():  # factors with non-trivial values, so that a wrong fold would show
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.normal_(0, 0.3)
    calls = []
    for m in net.modules():
        if isinstance(m, nn.InstanceNorm3d):
            m.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        folded = net(x)
        norms_run_folded = len(calls)
        with fi.plain_inference():
            plain = net(x)
    norms_total = len(calls) - norms_run_folded
    folded_blocks = norm_folding.install(net)
    assert norms_run_folded == norms_total - folded_blocks and folded_blocks > 0
    assert rel_err(folded, plain) < TOL
    monkeypatch.setattr(fi.OPTIONS, "fold_instance_norm", False)
    with torch.inference_mode():
        unfolded = net(x)
    assert rel_err(unfolded, plain) < TOL and not torch.equal(unfolded, folded)
