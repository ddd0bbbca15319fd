"""Taylor scores against a brute-force reference (gradients from torch.autograd.grad), L1 by hand, selection rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.dependency import ChannelGroup, channel_groups
from nnunet_compress.pruning.importance import (
    TaylorImportance,
    l1_importance,
    normalize_per_layer,
    output_normalized_backward,
    select_channels_to_keep,
)


def plain_unet() -> PlainConvUNet:
    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[3, 4, 6], conv_op=nn.Conv2d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=2, num_classes=2,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def residual_unet() -> ResidualEncoderUNet:
    return ResidualEncoderUNet(input_channels=1, n_stages=3, features_per_stage=[3, 4, 6], conv_op=nn.Conv2d,
                               kernel_sizes=3, strides=[1, 2, 2], n_blocks_per_stage=[1, 2, 2], num_classes=2,
                               n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True}, deep_supervision=True)


def prepared(make) -> nn.Module:
    torch.manual_seed(0)
    net = make().double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net


def batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.double) for _ in range(n)]


def loss_of(output) -> torch.Tensor:
    return sum((o ** 2).mean() * w for o, w in zip(output, (1.0, 0.5))) + output[0][:, 1].sum() * 0.1


def class_weights_by_hand(labels: torch.Tensor) -> torch.Tensor:
    """1 / (voxels of the same label in the same sample), counted with numpy's bincount."""
    weights = torch.empty(labels.shape, dtype=torch.double)
    for b in range(labels.shape[0]):
        flat = labels[b].flatten().numpy()
        counts = np.bincount(flat)
        weights[b] = torch.from_numpy(1.0 / counts[flat]).view(labels.shape[1:])
    return weights


def normalized_ce_gradient(logits: torch.Tensor, balance_classes: bool = True) -> torch.Tensor:
    """d CE(logits, argmax logits) / d logits = softmax - one-hot (times the voxel's class weight), per sample
    scaled to unit norm (by hand)."""
    probs = torch.softmax(logits, 1)
    labels = logits.argmax(1)
    onehot = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), 1.0)
    g = probs - onehot
    if balance_classes:
        g = g * class_weights_by_hand(labels).unsqueeze(1)
    return g / g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))


def brute_force_taylor(net: nn.Module, xs: list[torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """score_c = mean over batches of Σ_b (Σ_pos a_bc ∂y/∂a_bc)², summed over the group's activations; the gradients
    come from torch.autograd.grad on the captured activation tensors, y = Σ_b <G_b, out_b> with G_b the analytic
    cross-entropy gradient (softmax - one-hot of the argmax) scaled to unit norm, or y = the loss."""
    groups = [g for g in channel_groups(net) if g.prunable]
    scores = {g.name: torch.zeros(g.size, dtype=torch.double) for g in groups}
    for x in xs:
        captured: dict[str, torch.Tensor] = {}
        handles = [net.get_submodule(a).register_forward_hook(
            lambda m, i, o, a=a: captured.__setitem__(a, o)) for g in groups for a in g.activations]
        out = net(x)
        for h in handles:
            h.remove()
        names = list(captured)
        if mode == "output_normalized":
            y = (normalized_ce_gradient(out[0].detach()) * out[0]).sum()
        else:
            y = loss_of(out)
        grads = dict(zip(names, torch.autograd.grad(y, [captured[n] for n in names])))
        for g in groups:
            for a in g.activations:
                scores[g.name] += ((captured[a] * grads[a]).flatten(2).sum(-1) ** 2).sum(0).detach()
    return {name: s / len(xs) for name, s in scores.items()}


@pytest.mark.parametrize("make", [plain_unet, residual_unet])
def test_output_normalized_taylor_equals_brute_force(make):
    net, xs = prepared(make), batches()
    expected = brute_force_taylor(net, xs, "output_normalized")
    with TaylorImportance(net, channel_groups(net)) as taylor:
        for x in xs:
            net.zero_grad()
            taylor.output_normalized_backward(net(x))
        scores = taylor.scores()
    assert taylor.num_batches == 2
    assert scores.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(scores[name].double(), expected[name], rtol=1e-5, atol=1e-12)
    assert all(bool((s > 0).any()) for s in scores.values())


def test_loss_mode_taylor_equals_brute_force_and_undoes_the_grad_scale():
    net, xs = prepared(residual_unet), batches()
    expected = brute_force_taylor(net, xs, "loss")
    taylor = TaylorImportance(net, channel_groups(net), mode="loss")
    taylor.grad_scale = 8.0
    for x in xs:
        (loss_of(net(x)) * 8.0).backward()
    scores = taylor.scores()
    taylor.remove()
    for name in expected:
        torch.testing.assert_close(scores[name].double(), expected[name], rtol=1e-5, atol=1e-12)
    with pytest.raises(CompressError, match="loss"):
        taylor.output_normalized_backward(net(xs[0]))


def test_modes_give_different_scores():
    net, xs = prepared(plain_unet), batches(1)
    a = brute_force_taylor(net, xs, "output_normalized")
    b = brute_force_taylor(net, xs, "loss")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_output_normalized_backward_sends_unit_norm_per_sample_gradient_from_full_resolution_output():
    net = prepared(plain_unet)
    out = net(batches(1)[0] * torch.tensor([1.0, 50.0], dtype=torch.double).view(2, 1, 1, 1))
    seen = {}
    out[0].register_hook(lambda g: seen.__setitem__("full", g))
    out[1].register_hook(lambda g: seen.__setitem__("low", g))
    output_normalized_backward(out)
    g = seen["full"]
    assert "low" not in seen  # deep-supervision heads at lower resolution get no gradient
    torch.testing.assert_close(g.flatten(1).norm(dim=1), torch.ones(2, dtype=torch.double))
    torch.testing.assert_close(g, normalized_ce_gradient(out[0].detach()))


def test_class_balance_gives_a_small_class_the_same_gradient_share_as_a_large_one():
    # 3 classes: label 2 covers 4 voxels of 256, label 1 a quarter, label 0 the rest
    labels = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    labels[..., :4, :] = 1
    labels[..., 10:12, 10:12] = 2
    logits = torch.zeros(1, 3, 16, 16, dtype=torch.double, requires_grad=True)
    shares = {}
    for balance in (True, False):
        logits.grad = None
        output_normalized_backward(logits * 1.0, labels, balance_classes=balance)
        g = logits.grad[0]
        # Taylor scores are linear in the output gradient, so a class's share is the L1 mass of its voxels'
        # gradients; with uniform logits every voxel's gradient has the same size, so that share is its voxel
        # count without balancing, and equal for every class with it
        mass = torch.stack([g[:, labels[0, 0] == k].abs().sum() for k in range(3)])
        shares[balance] = mass / mass.sum()
    torch.testing.assert_close(shares[True], torch.full((3,), 1 / 3, dtype=torch.double))
    torch.testing.assert_close(shares[False], torch.tensor([188, 64, 4], dtype=torch.double) / 256)


def test_output_normalized_backward_rejects_outputs_without_graph():
    net = prepared(plain_unet)
    with torch.no_grad():
        out = net(batches(1)[0])
    with pytest.raises(CompressError, match="gradients enabled"):
        output_normalized_backward(out)


def test_reset_remove_and_errors():
    net, xs = prepared(plain_unet), batches(1)
    taylor = TaylorImportance(net, channel_groups(net))
    with pytest.raises(CompressError, match="no backward pass"):
        taylor.scores()
    taylor.output_normalized_backward(net(xs[0]))
    first = taylor.scores()
    taylor.output_normalized_backward(net(xs[0]))
    for k, v in taylor.scores().items():  # same batch twice: the mean is unchanged
        torch.testing.assert_close(v, first[k])
    taylor.reset()
    assert taylor.num_batches == 0
    taylor.remove()
    taylor.output_normalized_backward(net(xs[0]))
    assert taylor.num_batches == 0
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(CompressError, match="Taylor mode"):
        TaylorImportance(net, channel_groups(net), mode="hessian")


def test_only_prunable_groups_are_scored():
    net = prepared(plain_unet)
    with TaylorImportance(net, channel_groups(net)) as taylor:
        taylor.output_normalized_backward(net(batches(1)[0]))
        names = set(taylor.scores())
    assert names == {g.name for g in channel_groups(net) if g.prunable}
    assert set(l1_importance(net, channel_groups(net))) == names


def test_l1_importance_equals_hand_computation():
    net = prepared(residual_unet)
    scores = l1_importance(net, channel_groups(net))
    conv = net.encoder.stages[1].blocks[1].conv1.conv.weight.detach()
    torch.testing.assert_close(scores["encoder.stages.1.blocks.1.conv1.conv"],
                               conv.abs().sum(dim=(1, 2, 3)).float())
    transp = net.decoder.transpconvs[0].weight.detach()  # (in, out, k, k): filters along dim 1
    torch.testing.assert_close(scores["decoder.transpconvs.0"], transp.abs().sum(dim=(0, 2, 3)).float())
    stage0 = sum(m.weight.detach().abs().sum(dim=(1, 2, 3))
                 for m in (net.encoder.stem.convs[0].conv, net.encoder.stages[0].blocks[0].conv2.conv))
    torch.testing.assert_close(scores["encoder.stem.convs.0.conv"], stage0.float())


def test_normalize_per_layer_gives_unit_l2_norm_and_keeps_zero_layers():
    scores = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.0]), "c": torch.tensor([1e-9, 2e-9, 2e-9])}
    normalized = normalize_per_layer(scores)
    torch.testing.assert_close(normalized["a"], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(normalized["b"], torch.zeros(2))
    torch.testing.assert_close(normalized["c"], torch.tensor([1 / 3, 2 / 3, 2 / 3]))
    torch.testing.assert_close(scores["a"], torch.tensor([3.0, 4.0]))  # input untouched


SCORES = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([0.5, 4.0]), "c": torch.tensor([2.0])}


def test_global_selection_removes_the_lowest_scores():
    assert select_channels_to_keep(SCORES, 2) == {"a": [0, 2], "b": [1]}
    assert select_channels_to_keep(SCORES, 0) == {}


def test_global_selection_respects_min_channels():
    # c's 2.0 is the third-lowest score but c has only one channel: a's 3.0 goes instead
    assert select_channels_to_keep(SCORES, 3) == {"a": [0], "b": [1]}
    assert select_channels_to_keep(SCORES, 1, min_channels=2) == {"a": [0, 2]}
    with pytest.raises(CompressError, match="at most 3"):
        select_channels_to_keep(SCORES, 4)


def test_per_group_floors():
    # a keeps at least 3 (all of it), so b's 0.5 and c's... c has 1 channel (floor 1): only b can lose one
    assert select_channels_to_keep(SCORES, 1, min_channels={"a": 3}) == {"b": [1]}
    # a floor of 2 on a: its 1.0 goes first, then 3.0 is protected and b's 0.5 goes
    assert select_channels_to_keep(SCORES, 2, min_channels={"a": 2, "b": 1}) == {"a": [0, 2], "b": [1]}
    with pytest.raises(CompressError, match="at most 1"):
        select_channels_to_keep(SCORES, 2, min_channels={"a": 3})


def test_layer_scope_splits_removal_in_proportion_to_size():
    scores = {"small": torch.tensor([4.0, 3.0, 2.0, 1.0]), "big": torch.arange(8.0, 0.0, -1.0) * 100}
    keep = select_channels_to_keep(scores, 3, scope="layer")  # shares 1 and 2
    assert keep == {"small": [0, 1, 2], "big": [0, 1, 2, 3, 4, 5]}
    keep = select_channels_to_keep(scores, 9, scope="layer", min_channels=1)  # small caps at 3, big takes the rest
    assert keep == {"small": [0], "big": [0, 1]}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("seed", range(5))
def test_selection_removes_exactly_n_and_never_below_min_channels(scope, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 12, (6,), generator=gen).tolist()
    scores = {f"g{i}": torch.rand(n, generator=gen) for i, n in enumerate(sizes)}
    min_channels = 2
    capacity = sum(max(0, n - min_channels) for n in sizes)
    n_remove = int(torch.randint(0, capacity + 1, (1,), generator=gen))
    keep = select_channels_to_keep(scores, n_remove, min_channels=min_channels, scope=scope)
    removed = sum(len(scores[k]) - len(v) for k, v in keep.items())
    assert removed == n_remove
    assert all(len(v) >= min(min_channels, len(scores[k])) and v == sorted(set(v)) for k, v in keep.items())
    if scope == "global":  # nothing kept scores lower than anything removed, among groups above their minimum
        for name, kept in keep.items():
            gone = set(range(len(scores[name]))) - set(kept)
            assert max(scores[name][list(gone)]) <= min(scores[name][kept]) or len(kept) == min_channels


def test_selection_with_groups_skips_heads_and_checks_sizes():
    groups = [ChannelGroup("a", ("a",), (), (), ("a",), 3), ChannelGroup("b", ("b",), (), (), ("b",), 2),
              ChannelGroup("head", ("head",), (), (), ("head",), 2, prunable=False)]
    scores = {"a": SCORES["a"], "b": SCORES["b"], "head": torch.tensor([0.0, 0.0])}
    assert select_channels_to_keep(scores, 2, groups=groups) == {"a": [0, 2], "b": [1]}
    with pytest.raises(CompressError, match="stale"):
        select_channels_to_keep({"a": torch.ones(4)}, 1, groups=groups)
    with pytest.raises(CompressError, match="unknown channel group"):
        select_channels_to_keep({"zz": torch.ones(4)}, 1, groups=groups)


@pytest.mark.parametrize("kwargs,message", [
    (dict(scores={"a": torch.tensor([1.0, float("nan")])}, n_remove=1), "NaN"),
    (dict(scores=SCORES, n_remove=-1), "negative"),
    (dict(scores=SCORES, n_remove=1, scope="stage"), "scope"),
    (dict(scores=SCORES, n_remove=1, min_channels=0), "at least 1"),
    (dict(scores={}, n_remove=0), "no prunable"),
])
def test_bad_selection_input_raises(kwargs, message):
    with pytest.raises(CompressError, match=message):
        select_channels_to_keep(**kwargs)
