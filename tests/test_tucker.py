"""Tucker-2 factorisation of conv kernels, checked against independent references.

* Kernels: the factors held by a TuckerConv are multiplied back with tensorly's multi_mode_dot and with an
  explicit einsum and compared with the trained kernel (exact at full rank); at reduced rank the reported error
  is recomputed as ||W - Ŵ|| / ||W|| and bracketed by the Eckart-Young lower bound and the truncated-HOSVD
  upper bound, both computed here with numpy SVDs.
* Modules: the three-conv replacement computes exactly F.convNd / F.conv_transposeNd with the reconstructed
  kernel and the original geometry; whole nnU-Net networks (PlainConvUNet 3d and 2d, ResidualEncoderUNet)
  factorised at full rank give the original outputs.
* Costs: parameters = sum of p.numel() of the built modules, MACs = torch's FlopCounterMode count / 2.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.costs import conv_costs, layer_io_shapes
from nnunet_compress.errors import CompressError
from nnunet_compress.tucker.decomposition import TuckerConv, decompose_conv, gram_svd, replace_convs

torch.set_num_threads(1)


# ---- networks ----------------------------------------------------------------------------------------------

def plain_unet_3d() -> PlainConvUNet:
    return PlainConvUNet(1, 3, [8, 16, 32], nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, True, nn.InstanceNorm3d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def plain_unet_2d() -> PlainConvUNet:
    return PlainConvUNet(2, 3, [8, 16, 32], nn.Conv2d, 3, [1, 2, 2], 2, 4, 2, True, nn.InstanceNorm2d,
                         {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def residual_unet_3d() -> ResidualEncoderUNet:
    return ResidualEncoderUNet(1, 3, [8, 16, 32], nn.Conv3d, 3, [1, 2, 2], [1, 2, 2], 3, [1, 1], True,
                               nn.InstanceNorm3d, {"affine": True, "eps": 1e-5}, None, None, nn.LeakyReLU,
                               {"inplace": True}, deep_supervision=True)


NETWORKS = {"plain3d": (plain_unet_3d, (1, 16, 16, 16)),
            "plain2d": (plain_unet_2d, (2, 32, 32)),
            "resenc3d": (residual_unet_3d, (1, 16, 16, 16))}


def build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A network with random (not nnU-Net-initialised) weights, norms included, and an input for it."""
    factory, shape = NETWORKS[kind]
    torch.manual_seed(0)
    net = factory().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net, torch.randn(1, *shape)


def conv_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# ---- independent references --------------------------------------------------------------------------------

def factors_of(module: TuckerConv) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(core, U_out, U_in) as the module holds them, in float64 numpy."""
    u_in = module[0].weight.detach().double().flatten(1).T.numpy()  # (in, rank_in)
    u_out = module[2].weight.detach().double().flatten(1).numpy()  # (out, rank_out)
    return module[1].weight.detach().double().numpy(), u_out, u_in


def kernel_from_factors_tensorly(module: TuckerConv) -> np.ndarray:
    core, u_out, u_in = factors_of(module)
    if module.transposed:  # kernel (in, out, *k): mode 0 carries U_in
        return tl.tenalg.multi_mode_dot(core, [u_in, u_out], modes=[0, 1])
    return tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1])


def kernel_from_factors_einsum(module: TuckerConv) -> np.ndarray:
    core, u_out, u_in = factors_of(module)
    if module.transposed:
        return np.einsum("ba...,ib,oa->io...", core, u_in, u_out)
    return np.einsum("ab...,oa,ib->oi...", core, u_out, u_in)


def mode_unfolding_tails(weight: np.ndarray, out_mode: int, rank_out: int, in_mode: int, rank_in: int
                         ) -> tuple[float, float]:
    """Energy each truncated mode discards: sum of the squared singular values beyond the rank."""
    tails = []
    for mode, rank in ((out_mode, rank_out), (in_mode, rank_in)):
        unfolding = np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)
        s = np.linalg.svd(unfolding, compute_uv=False)
        tails.append(float(np.sum(s[rank:] ** 2)))
    return tails[0], tails[1]


def hosvd_error(weight: np.ndarray, out_mode: int, rank_out: int, in_mode: int, rank_in: int) -> float:
    """||W - Ŵ|| of the truncated HOSVD (leading singular vectors of each unfolding, projected)."""
    projected = weight
    for mode, rank in ((out_mode, rank_out), (in_mode, rank_in)):
        unfolding = np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)
        u = np.linalg.svd(unfolding, full_matrices=False)[0][:, :rank]
        projected = np.moveaxis(np.tensordot(u @ u.T, np.moveaxis(projected, mode, 0), axes=1), 0, mode)
    return float(np.linalg.norm(weight - projected))


# layers of every kind nnU-Net uses, with non-trivial geometry
LAYERS = {
    "conv3d": lambda: nn.Conv3d(6, 10, 3, padding=1),
    "conv3d_strided": lambda: nn.Conv3d(5, 7, 3, stride=2, padding=1, dilation=1),
    "conv3d_dilated_nobias": lambda: nn.Conv3d(4, 6, (3, 1, 3), padding=(2, 0, 2), dilation=2, bias=False),
    "conv2d": lambda: nn.Conv2d(9, 5, 3, stride=(2, 1), padding=1),
    "transposed3d": lambda: nn.ConvTranspose3d(12, 6, 2, stride=2),
    "transposed2d_outpad": lambda: nn.ConvTranspose2d(5, 8, 3, stride=2, padding=1, output_padding=1),
    "stem": lambda: nn.Conv3d(1, 8, 3, padding=1),
}


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    layer = LAYERS[kind]()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def input_for(layer: nn.Module, side: int = 7) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, layer.in_channels, *(side,) * len(layer.kernel_size))


def functional_conv(layer: nn.Module, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The original layer's geometry applied with another kernel."""
    dims = len(layer.kernel_size)
    if layer.transposed:
        fn = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        return fn(x, kernel, layer.bias, layer.stride, layer.padding, layer.output_padding, 1, layer.dilation)
    fn = {2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation)


# ---- single layers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_full_rank_reconstructs_kernel_and_output(kind):
    layer = make_layer(kind)
    module, error = decompose_conv(layer, layer.out_channels, layer.in_channels)
    weight = layer.weight.detach().double().numpy()
    assert error < 1e-6
    np.testing.assert_allclose(kernel_from_factors_tensorly(module), weight, atol=1e-5)
    np.testing.assert_allclose(kernel_from_factors_einsum(module), weight, atol=1e-5)
    x = input_for(layer)
    with torch.no_grad():
        assert relative_difference(module(x), layer(x)) < 1e-5


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_structure_of_replacement(kind):
    layer = make_layer(kind)
    rank_out, rank_in = max(1, layer.out_channels // 2), max(1, layer.in_channels // 2)
    module, _ = decompose_conv(layer, rank_out, rank_in)
    first, core, last = module[0], module[1], module[2]
    pointwise = nn.Conv3d if len(layer.kernel_size) == 3 else nn.Conv2d
    assert type(first) is pointwise and type(last) is pointwise and type(core) is type(layer)
    assert [n for n, _ in module.named_children()] == ["0", "1", "2"]
    assert first.kernel_size == (1,) * len(layer.kernel_size) == last.kernel_size
    assert (first.in_channels, first.out_channels) == (layer.in_channels, rank_in)
    assert (core.in_channels, core.out_channels) == (rank_in, rank_out)
    assert (last.in_channels, last.out_channels) == (rank_out, layer.out_channels)
    assert first.bias is None and core.bias is None
    assert (last.bias is None) == (layer.bias is None)
    if layer.bias is not None:
        assert torch.equal(last.bias, layer.bias)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(core, attr) == getattr(layer, attr)
    if layer.transposed:
        assert core.output_padding == layer.output_padding
    assert (module.rank_out, module.rank_in, module.transposed) == (rank_out, rank_in, layer.transposed)
    assert (module.in_channels, module.out_channels) == (layer.in_channels, layer.out_channels)


@pytest.mark.parametrize("kind", ["conv3d", "conv3d_strided", "conv3d_dilated_nobias", "conv2d", "transposed3d",
                                  "transposed2d_outpad"])
def test_reduced_rank_error_and_output(kind):
    layer = make_layer(kind)
    rank_out, rank_in = max(1, layer.out_channels // 2), max(1, layer.in_channels // 3)
    module, error = decompose_conv(layer, rank_out, rank_in)
    weight = layer.weight.detach().double().numpy()
    approx = kernel_from_factors_einsum(module)
    norm = np.linalg.norm(weight)
    assert error == pytest.approx(np.linalg.norm(weight - approx) / norm, rel=1e-6)
    out_mode, in_mode = (1, 0) if layer.transposed else (0, 1)
    tail_out, tail_in = mode_unfolding_tails(weight, out_mode, rank_out, in_mode, rank_in)
    # no rank-(r_out, r_in) approximation beats the best one of either unfolding (Eckart-Young) ...
    assert error * norm >= math.sqrt(max(tail_out, tail_in)) * (1 - 1e-6)
    # ... and HOOI starts from the truncated HOSVD and only improves on it
    assert error * norm <= hosvd_error(weight, out_mode, rank_out, in_mode, rank_in) * (1 + 1e-6)
    assert error > 1e-3  # a random kernel is not low rank: the test would notice a no-op
    x = input_for(layer)
    with torch.no_grad():
        expected = functional_conv(layer, x, torch.from_numpy(approx).float())
        assert relative_difference(module(x), expected) < 1e-5


def test_exactly_low_rank_kernel_is_recovered():
    torch.manual_seed(3)
    core = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    u_out, u_in = torch.randn(10, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    layer = nn.Conv3d(6, 10, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in))
    _, error = decompose_conv(layer, 3, 2)
    assert error < 1e-6
    _, error_too_small = decompose_conv(layer, 2, 2)
    assert error_too_small > 1e-2


def test_shaped_like_builds_structure_with_fresh_weights():
    layer = make_layer("transposed3d")
    module = TuckerConv.shaped_like(layer, 3, 4)
    assert isinstance(module, nn.Sequential)
    assert [tuple(p.shape) for p in module.parameters()] == [(4, 12, 1, 1, 1), (4, 3, 2, 2, 2), (6, 3, 1, 1, 1),
                                                             (6,)]
    assert module(torch.zeros(1, 12, 3, 3, 3)).shape == layer(torch.zeros(1, 12, 3, 3, 3)).shape


@pytest.mark.parametrize("ranks, message", [((0, 2), "rank_out=0"), ((11, 2), "1..10"), ((2, 7), "rank_in=7"),
                                            ((2.5, 2), "integer")])
def test_bad_ranks_are_refused_naming_the_layer(ranks, message):
    layer = make_layer("conv3d")
    with pytest.raises(CompressError, match=message) as info:
        decompose_conv(layer, *ranks, name="decoder.stages.0.convs.0.conv")
    assert "decoder.stages.0.convs.0.conv" in str(info.value)


def test_grouped_conv_is_refused():
    with pytest.raises(CompressError, match="groups=2"):
        decompose_conv(nn.Conv3d(4, 4, 3, groups=2), 2, 2, name="grouped")
    with pytest.raises(CompressError, match="groups=2"):
        TuckerConv.shaped_like(nn.Conv3d(4, 4, 3, groups=2), 2, 2)


# ---- costs -------------------------------------------------------------------------------------------------

def flop_count(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("ranks", [None, (1, 1), (3, 2), "full"])
def test_conv_costs_match_built_modules_and_flop_counter(kind, ranks):
    layer = make_layer(kind)
    x = input_for(layer, side=6)
    with torch.no_grad():
        out = layer(x)
    io = (tuple(x.shape[2:]), tuple(out.shape[2:]))
    if ranks == "full":
        ranks = (layer.out_channels, layer.in_channels)
    if ranks is None:
        module = layer
    else:
        ranks = (min(ranks[0], layer.out_channels), min(ranks[1], layer.in_channels))
        module = TuckerConv.shaped_like(layer, *ranks)
    params, macs = conv_costs(layer, *io, ranks=ranks)
    assert params == sum(p.numel() for p in module.parameters())
    assert 2 * macs * x.shape[0] == flop_count(module, x)  # conv_costs is per sample, the batch holds two


def test_conv_costs_by_hand():
    conv = nn.Conv3d(32, 64, 3, stride=2, padding=1)
    assert conv_costs(conv, (16, 16, 16), (8, 8, 8)) == (64 * 32 * 27 + 64, 512 * 64 * 32 * 27)
    # first factor at the input resolution (4096 voxels), core and last factor at the output resolution (512)
    assert conv_costs(conv, (16, 16, 16), (8, 8, 8), ranks=(16, 8)) == (
        32 * 8 + 8 * 16 * 27 + 16 * 64 + 64, 4096 * 32 * 8 + 512 * 8 * 16 * 27 + 512 * 16 * 64)
    up = nn.ConvTranspose3d(64, 32, 2, stride=2, bias=False)
    assert conv_costs(up, (4, 4, 4), (8, 8, 8)) == (64 * 32 * 8, 64 * 64 * 32 * 8)
    # the transposed core runs at the input resolution
    assert conv_costs(up, (4, 4, 4), (8, 8, 8), ranks=(8, 16)) == (
        64 * 16 + 16 * 8 * 8 + 8 * 32, 64 * 64 * 16 + 64 * 16 * 8 * 8 + 512 * 8 * 32)


# ---- whole networks ----------------------------------------------------------------------------------------

def full_ranks(net: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.out_channels, m.in_channels) for n, m in net.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)}


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_full_rank_network_matches_original(kind):
    net, x = build(kind)
    compressed = copy.deepcopy(net)
    ranks = full_ranks(net)
    errors = replace_convs(compressed, ranks)
    assert set(errors) == set(ranks) and max(errors.values()) < 1e-6
    # every conv is gone from the network, including the aliases nnU-Net's blocks hold (.all_modules.0)
    assert not any(isinstance(m, nn.modules.conv._ConvNd) and not isinstance(parent, TuckerConv)
                   for parent in compressed.modules() for m in parent.children())
    assert sum(isinstance(m, TuckerConv) for m in compressed.modules()) == len(ranks)
    with torch.no_grad():
        expected, got = net(x), compressed(x)
    assert isinstance(expected, (list, tuple)) and len(expected) == len(got) == 2  # deep supervision
    for e, g in zip(expected, got):
        assert relative_difference(g, e) < 1e-4


def test_reduced_ranks_reach_the_forward_pass():
    net, x = build("plain3d")
    name = "encoder.stages.1.0.convs.1.conv"
    compressed = copy.deepcopy(net)
    replace_convs(compressed, {name: (4, 4)})
    block = compressed.get_submodule("encoder.stages.1.0.convs.1")
    assert block.conv is block.all_modules[0] and isinstance(block.conv, TuckerConv)
    with torch.no_grad():
        assert relative_difference(compressed(x)[0], net(x)[0]) > 1e-3


def test_rebuilt_structure_loads_decomposed_weights():
    net, x = build("resenc3d")
    ranks = {"encoder.stages.1.blocks.0.conv1.conv": (8, 4), "decoder.transpconvs.0": (8, 8),
             "encoder.stages.2.blocks.1.conv2.conv": (16, 12)}
    decomposed = copy.deepcopy(net)
    errors = replace_convs(decomposed, ranks)
    assert all(0 < e < 1 for e in errors.values())
    torch.manual_seed(5)
    rebuilt = copy.deepcopy(net)
    nan_errors = replace_convs(rebuilt, ranks, decompose=False)
    assert all(math.isnan(e) for e in nan_errors.values())
    rebuilt.load_state_dict(decomposed.state_dict())  # strict: keys and shapes fit
    with torch.no_grad():
        for a, b in zip(rebuilt(x), decomposed(x)):
            assert torch.allclose(a, b)


def test_replace_convs_validates_before_changing_anything():
    net, _ = build("plain3d")
    before = copy.deepcopy(net.state_dict())
    good = "encoder.stages.1.0.convs.1.conv"
    with pytest.raises(CompressError, match="no layer 'encoder.nope'"):
        replace_convs(net, {good: (4, 4), "encoder.nope": (2, 2)})
    with pytest.raises(CompressError, match="rank_out=99"):
        replace_convs(net, {good: (4, 4), "decoder.transpconvs.0": (99, 2)})
    with pytest.raises(CompressError, match="not a convolution"):
        replace_convs(net, {good: (4, 4), "encoder.stages.1.0.convs.1": (2, 2)})
    with pytest.raises(CompressError, match="pair"):
        replace_convs(net, {good: 4})
    with pytest.raises(CompressError, match="same layer"):
        replace_convs(net, {good: (4, 4), "encoder.stages.1.0.convs.1.all_modules.0": (4, 4)})
    assert not any(isinstance(m, TuckerConv) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_layer_io_shapes_match_a_real_forward_pass(kind):
    net, x = build(kind)
    expected = {}

    def hook_for(name):
        def record(_module, inputs, output):  # returns None: a hook's return value would replace the output
            expected.setdefault(name, (tuple(inputs[0].shape[2:]), tuple(output.shape[2:])))
        return record

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in net.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    shapes = layer_io_shapes(net, tuple(x.shape[2:]))
    assert shapes == expected and set(shapes) == set(conv_names(net))
    assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())


def test_layer_io_shapes_by_hand_and_of_factorised_layers():
    net, _ = build("plain3d")
    replace_convs(net, {"decoder.transpconvs.0": (8, 8)})
    shapes = layer_io_shapes(net, (16, 16, 24))
    assert shapes["encoder.stages.0.0.convs.0.conv"] == ((16, 16, 24), (16, 16, 24))
    assert shapes["encoder.stages.2.0.convs.0.conv"] == ((8, 8, 12), (4, 4, 6))
    assert shapes["decoder.transpconvs.0"] == ((4, 4, 6), (8, 8, 12))  # the TuckerConv as a whole
    assert shapes["decoder.transpconvs.0.0"] == ((4, 4, 6), (4, 4, 6))  # its first factor: input resolution
    assert shapes["decoder.transpconvs.0.2"] == ((8, 8, 12), (8, 8, 12))  # its last factor: output resolution


def test_tensorly_global_backend_is_left_alone():
    layer = make_layer("conv3d")
    previous = tl.get_backend()
    tl.set_backend("pytorch")
    try:
        _, error = decompose_conv(layer, 4, 3)
        assert tl.get_backend() == "pytorch" and 0 < error < 1
    finally:
        tl.set_backend(previous)


@pytest.mark.parametrize("shape, n", [((12, 90), 5), ((12, 90), None), ((30, 8), 6)])
def test_gram_svd_matches_lapack_svd(shape, n):
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal(shape) * np.logspace(0, -3, shape[1])  # distinct, decaying singular values
    u, s, vt = gram_svd(matrix, n_eigenvecs=n)
    u_ref, s_ref, vt_ref = np.linalg.svd(matrix, full_matrices=False)
    k = len(s_ref) if n is None else n
    assert u.shape == (shape[0], k) and s.shape == (k,) and vt.shape == (k, shape[1])
    np.testing.assert_allclose(s, s_ref[:k], rtol=1e-9)
    # the same singular vectors up to sign
    np.testing.assert_allclose(np.abs(np.sum(u * u_ref[:, :k], axis=0)), np.ones(k), atol=1e-8)
    np.testing.assert_allclose(u @ np.diag(s) @ vt, u_ref[:, :k] @ np.diag(s_ref[:k]) @ vt_ref[:k], atol=1e-9)
