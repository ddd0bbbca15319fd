"""Physical channel removal, checked against independent references.

* Equivalence: a pruned network computes exactly what the original computes when the removed channels' feature
  maps are zeroed (forward hooks on the activation modules). This holds exactly because every supported norm
  (InstanceNorm, BatchNorm in eval mode) normalises each channel on its own and dropout is the identity in eval
  mode; it would NOT hold for GroupNorm/LayerNorm (channels normalised together, hence unsupported) or for
  train-mode dropout (random masks drawn over a different number of channels).
* Parameter and FLOP counts: formulas written from DNA's architecture description, fed with the kept counts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BottleneckD
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import channel_groups
from nnunet_compress.pruning.surgery import channel_counts, prune_channels, set_channel_counts

SIDE = 16  # patch edge; 3 stages -> 16, 8, 4


def plain_unet(dim: int = 3, norm: str = "instance", dropout: bool = False, features=None, **overrides):
    conv, instance, batch, drop = {2: (nn.Conv2d, nn.InstanceNorm2d, nn.BatchNorm2d, nn.Dropout2d),
                                   3: (nn.Conv3d, nn.InstanceNorm3d, nn.BatchNorm3d, nn.Dropout3d)}[dim]
    kwargs = dict(input_channels=2, n_stages=3, features_per_stage=features or [4, 8, 16], conv_op=conv,
                  kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2,
                  conv_bias=True, norm_op=instance if norm == "instance" else batch,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=drop if dropout else None,
                  dropout_op_kwargs={"p": 0.5} if dropout else None, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs.update(overrides)
    return PlainConvUNet(**kwargs)


def residual_unet(dim: int = 3, norm: str = "instance", **overrides):
    conv, instance, batch = {2: (nn.Conv2d, nn.InstanceNorm2d, nn.BatchNorm2d),
                             3: (nn.Conv3d, nn.InstanceNorm3d, nn.BatchNorm3d)}[dim]
    kwargs = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
                  strides=[1, 2, 2], n_blocks_per_stage=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1,
                  conv_bias=True, norm_op=instance if norm == "instance" else batch,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs.update(overrides)
    return ResidualEncoderUNet(**kwargs)


NETWORKS = {
    "plain3d_instancenorm_dropout": lambda: plain_unet(3, "instance", dropout=True),
    "plain2d_batchnorm": lambda: plain_unet(2, "batch"),
    "residual3d_instancenorm": lambda: residual_unet(3, "instance"),
    "residual2d_batchnorm": lambda: residual_unet(2, "batch"),
    "bottleneck2d_batchnorm": lambda: residual_unet(2, "batch", block=BottleneckD, features_per_stage=[8, 8, 16],
                                                    bottleneck_channels=[2, 4, 4]),
}


def randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    """Double precision, eval mode, every parameter and running statistic random (so slicing errors show)."""
    gen = torch.Generator().manual_seed(seed)
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return net


def sample_input(net: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    conv = next(m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    dim = 3 if isinstance(conv, nn.Conv3d) else 2
    return torch.randn((batch, 2) + (SIDE,) * dim, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


def random_keep(net: nn.Module, seed: int) -> dict[str, list[int]]:
    """A random non-empty subset of channels for every prunable group (sometimes all of them)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for group in channel_groups(net):
        if group.prunable:
            n = int(torch.randint(1, group.size + 1, (1,), generator=gen))
            keep[group.name] = sorted(torch.randperm(group.size, generator=gen)[:n].tolist())
    return keep


def as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def output_with_channels_zeroed(net: nn.Module, x: torch.Tensor, keep: dict[str, list[int]]) -> list[torch.Tensor]:
    handles = []
    for group in channel_groups(net):
        if group.name not in keep:
            continue
        removed = sorted(set(range(group.size)) - set(keep[group.name]))

        def zero(module, inputs, output, removed=removed):
            output = output.clone()
            output[:, removed] = 0
            return output

        handles += [net.get_submodule(a).register_forward_hook(zero) for a in group.activations]
    try:
        with torch.no_grad():
            return as_list(net(x))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", list(NETWORKS))
def test_pruned_network_equals_original_with_removed_channels_zeroed(kind, seed):
    net = randomized(NETWORKS[kind]())
    x = sample_input(net)
    keep = random_keep(net, seed)
    expected = output_with_channels_zeroed(net, x, keep)
    with torch.no_grad():
        unpruned = as_list(net(x))
    prune_channels(net, keep)
    with torch.no_grad():
        actual = as_list(net(x))
    assert len(actual) == len(expected) == 2
    for a, e, u in zip(actual, expected, unpruned):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(a, u)  # the zeroing (hence the pruning) did change something
    assert channel_counts(net) == {name: len(k) for name, k in keep.items()}


def test_hooks_that_zero_nothing_change_nothing():
    """The reference itself must be sensitive: zeroing one channel of one group changes the output."""
    net = randomized(plain_unet(2))
    x = sample_input(net)
    with torch.no_grad():
        base = as_list(net(x))[0]
    name = "decoder.transpconvs.1"
    changed = output_with_channels_zeroed(net, x, {name: [0, 1, 2]})[0]
    same = output_with_channels_zeroed(net, x, {name: [0, 1, 2, 3]})[0]
    torch.testing.assert_close(same, base)
    assert not torch.allclose(changed, base)


# ---- hand-computed parameter and FLOP counts ---------------------------------------------------------------------

def plain_layers(counts: dict[str, int], cin: int, classes: int, dim: int, side: int = SIDE, n_stages: int = 3):
    """(kind, in, out, kernel volume, spatial volume that FlopCounterMode multiplies by, has norm) per layer.

    Written from the architecture: encoder stage s (side/2^s) = 2 convs 3^d; decoder stage s (lowest resolution
    first) = transpconv 2^d from the stage below, 2 convs on cat(upsampled, skip), 1x1 segmentation head.
    """
    e = lambda s, i: counts[f"encoder.stages.{s}.0.convs.{i}.conv"]
    layers, c = [], cin
    for s in range(n_stages):
        vol = (side // 2 ** s) ** dim
        for i in range(2):
            layers.append(("conv", c, e(s, i), 3 ** dim, vol, True))
            c = e(s, i)
    for s in range(n_stages - 1):
        up = counts[f"decoder.transpconvs.{s}"]
        vol = (side // 2 ** (n_stages - 2 - s)) ** dim
        layers.append(("transp", c, up, 2 ** dim, vol // 2 ** dim, False))  # counted over its INPUT positions
        c = up + e(n_stages - 2 - s, 1)
        for i in range(2):
            out = counts[f"decoder.stages.{s}.convs.{i}.conv"]
            layers.append(("conv", c, out, 3 ** dim, vol, True))
            c = out
        layers.append(("seg", c, classes, 1, vol, False))
    return layers


def residual_layers(counts: dict[str, int], cin: int, classes: int, dim: int, side: int = SIDE,
                    blocks=(1, 2, 2)):
    """Same for ResidualEncoderUNet with BasicBlockD: stem; per block conv1, conv2 (+ bias-free 1x1 projection in
    the first block of strided stages); decoder with one conv per stage."""
    res = lambda s: counts["encoder.stem.convs.0.conv" if s == 0 else f"encoder.stages.{s}.blocks.0.conv2.conv"]
    layers = [("conv", cin, res(0), 3 ** dim, side ** dim, True)]
    c = res(0)
    for s, n in enumerate(blocks):
        vol = (side // 2 ** s) ** dim
        for b in range(n):
            mid = counts[f"encoder.stages.{s}.blocks.{b}.conv1.conv"]
            layers += [("conv", c, mid, 3 ** dim, vol, True), ("conv", mid, res(s), 3 ** dim, vol, True)]
            if s > 0 and b == 0:
                layers.append(("proj", c, res(s), 1, vol, True))
            c = res(s)
    for s in range(len(blocks) - 1):
        up = counts[f"decoder.transpconvs.{s}"]
        vol = (side // 2 ** (len(blocks) - 2 - s)) ** dim
        layers.append(("transp", c, up, 2 ** dim, vol // 2 ** dim, False))
        out = counts[f"decoder.stages.{s}.convs.0.conv"]
        layers.append(("conv", up + res(len(blocks) - 2 - s), out, 3 ** dim, vol, True))
        c = out
        layers.append(("seg", c, classes, 1, vol, False))
    return layers


def reference_params(layers) -> int:
    total = 0
    for kind, cin, cout, kvol, _, has_norm in layers:
        total += cin * cout * kvol + (0 if kind == "proj" else cout)  # DNA's skip projections have no bias
        total += 2 * cout if has_norm else 0  # affine norm: weight + bias
    return total


def reference_flops(layers, batch: int = 1) -> int:
    return sum(2 * batch * cin * cout * kvol * vol for _, cin, cout, kvol, vol, _ in layers)


def measured_flops(net: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("kind,layers_of", [("plain3d", plain_layers), ("residual3d", residual_layers),
                                            ("plain2d", plain_layers)])
def test_parameter_and_flop_counts_drop_to_hand_computed_values(kind, layers_of):
    net = {"plain3d": lambda: plain_unet(3), "residual3d": lambda: residual_unet(3),
           "plain2d": lambda: plain_unet(2, "batch")}[kind]().eval()
    dim = 3 if kind.endswith("3d") else 2
    x = torch.randn((1, 2) + (SIDE,) * dim)
    full = channel_counts(net)
    # the reference formulas describe the unpruned network correctly (BatchNorm's buffers are not parameters)
    assert sum(p.numel() for p in net.parameters()) == reference_params(layers_of(full, 2, 3, dim))
    assert measured_flops(net, x) == reference_flops(layers_of(full, 2, 3, dim))
    keep = random_keep(net, seed=3)
    prune_channels(net, keep)
    kept = {name: len(k) for name, k in keep.items()}
    assert kept != full
    assert sum(p.numel() for p in net.parameters()) == reference_params(layers_of(kept, 2, 3, dim))
    assert measured_flops(net, x) == reference_flops(layers_of(kept, 2, 3, dim))


# ---- rebuilding a pruned shape, round trips, bookkeeping -------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain3d_instancenorm_dropout", "residual2d_batchnorm"])
def test_set_channel_counts_rebuilds_the_pruned_shape_for_strict_loading(kind):
    pruned = randomized(NETWORKS[kind]())
    prune_channels(pruned, random_keep(pruned, seed=5))
    counts = channel_counts(pruned)
    fresh = NETWORKS[kind]().double().eval()
    set_channel_counts(fresh, counts)
    assert channel_counts(fresh) == counts
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    x = sample_input(pruned)
    with torch.no_grad():
        for a, b in zip(as_list(fresh(x)), as_list(pruned(x))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_channel_counts_can_grow_a_pruned_network_back_to_a_larger_shape():
    original = randomized(plain_unet(2))
    smaller = copy.deepcopy(original)
    prune_channels(smaller, random_keep(smaller, seed=7))
    set_channel_counts(smaller, channel_counts(original))
    assert channel_counts(smaller) == channel_counts(original)
    smaller.load_state_dict(original.state_dict(), strict=True)
    x = sample_input(original)
    with torch.no_grad():
        torch.testing.assert_close(as_list(smaller(x))[0], as_list(original(x))[0], rtol=0, atol=0)


def test_channel_counts_round_trip_and_omit_segmentation_heads():
    net = residual_unet(2, "batch")
    counts = channel_counts(net)
    assert "decoder.seg_layers.0" not in counts and counts["encoder.stem.convs.0.conv"] == 4
    wanted = {name: max(1, size // 2) for name, size in counts.items()}
    set_channel_counts(net, wanted)
    assert channel_counts(net) == wanted
    set_channel_counts(net, wanted)  # idempotent
    assert channel_counts(net) == wanted


def test_bookkeeping_attributes_follow_and_callers_list_is_not_mutated():
    features = [4, 8, 16]
    net = plain_unet(3, features=features)
    keep = {"encoder.stages.0.0.convs.1.conv": [1, 3], "encoder.stages.2.0.convs.1.conv": list(range(5)),
            "decoder.transpconvs.1": [0]}
    prune_channels(net, keep)
    assert features == [4, 8, 16]
    assert net.encoder.output_channels == [2, 8, 5]
    block = net.encoder.stages[0][0].convs[1]
    assert (block.input_channels, block.output_channels) == (4, 2)
    assert net.encoder.stages[0][0].output_channels == 2
    assert net.decoder.stages[1].convs[0].input_channels == 1 + 2
    assert net.decoder.stages[1].convs[0].conv.in_channels == 3
    assert net.compute_conv_feature_map_size((SIDE,) * 3) > 0  # DNA's VRAM estimate still runs

    res = residual_unet(2, "batch")
    prune_channels(res, {"encoder.stages.1.blocks.0.conv2.conv": [0, 2, 4],
                         "encoder.stages.2.blocks.1.conv1.conv": [3]})
    stage = res.encoder.stages[1]
    assert res.encoder.output_channels == [4, 3, 16]
    assert stage.output_channels == 3
    assert [(b.input_channels, b.output_channels) for b in stage.blocks] == [(4, 3), (3, 3)]
    assert res.encoder.stages[2].blocks[0].input_channels == 3
    assert res.compute_conv_feature_map_size((SIDE, SIDE)) > 0


def test_batchnorm_running_statistics_are_sliced():
    net = randomized(plain_unet(2, "batch"))
    norm = net.encoder.stages[1][0].convs[0].norm
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    prune_channels(net, {"encoder.stages.1.0.convs.0.conv": [1, 6]})
    assert norm.num_features == 2
    torch.testing.assert_close(norm.running_mean, mean[[1, 6]])
    torch.testing.assert_close(norm.running_var, var[[1, 6]])


def test_decoder_alias_of_encoder_sees_the_pruning():
    net = plain_unet(2)
    prune_channels(net, {"encoder.stages.0.0.convs.0.conv": [0, 1]})
    state = net.state_dict()
    assert state["decoder.encoder.stages.0.0.convs.0.conv.weight"].shape[0] == 2


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep,message", [
    ({"encoder.nope": [0]}, "unknown channel group"),
    ({"decoder.seg_layers.0": [0, 1]}, "segmentation classes"),
    ({"encoder.stages.0.0.convs.0.conv": []}, "every channel"),
    ({"encoder.stages.0.0.convs.0.conv": [0, 4]}, "out of range"),
    ({"encoder.stages.0.0.convs.0.conv": [-1]}, "out of range"),
    ({"encoder.stages.0.0.convs.0.conv": [1, 1]}, "duplicate"),
    ({"encoder.stages.0.0.convs.0.conv": [0.5]}, "integers"),
])
def test_bad_keep_requests_raise_and_leave_the_network_untouched(keep, message):
    net = plain_unet(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    request = {"encoder.stages.1.0.convs.0.conv": [0, 1], **keep}  # a valid part that must not be applied
    with pytest.raises(CompressError, match=message):
        prune_channels(net, request)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("counts,message", [
    ({"decoder.nope": 2}, "unknown channel group"),
    ({"decoder.transpconvs.0": 0}, "at least 1"),
    ({"decoder.transpconvs.0": 2.5}, "integer"),
    ({"decoder.seg_layers.1": 2}, "segmentation classes"),
])
def test_bad_channel_counts_raise(counts, message):
    with pytest.raises(CompressError, match=message):
        set_channel_counts(plain_unet(2), counts)


def test_prune_with_unsorted_indices_keeps_original_channel_order():
    net = randomized(plain_unet(2))
    weight = net.decoder.transpconvs[0].weight.detach().clone()
    prune_channels(net, {"decoder.transpconvs.0": [5, 2]})
    torch.testing.assert_close(net.decoder.transpconvs[0].weight, weight[:, [2, 5]])
    assert math.prod(net.decoder.stages[0].convs[0].conv.weight.shape[:2]) == 8 * (2 + 8)
