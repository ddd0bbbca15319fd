"""What a network costs: parameters, FLOPs, multiply-accumulates and the input/output shape of every convolution.

One module for every count the package makes, so that a budget, a pruning target, a report and a profile all
count alike. FLOPs of a run come from torch's own ``FlopCounterMode`` (a multiply-add counts as two FLOPs; the
Tucker paper's fvcore counts one, so divide by two to compare). The closed-form :func:`conv_costs` counts what the
counter would count for one convolution or its Tucker factorisation without running anything, which the rank
allocators need for thousands of candidate ranks; tests check the two against each other.

Pure torch, no nnU-Net: a factorised convolution is recognised by its ``factorises_conv`` attribute (see
:class:`nnunet_compress.tucker.decomposition.TuckerConv`), so this module sits below the methods that use it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_compress.errors import CompressError

# how a latency budget (--target-latency) predicts a layer's seconds: timings of this machine's engine, fitted
# (nnunet_compress.budgets.cost_model), or its MACs times the network's measured seconds per MAC
COST_MODELS = ("measured", "flops")


def _is_conv_like(module: nn.Module) -> bool:
    """A convolution, or a module that stands for one (a Tucker factorisation of it)."""
    return isinstance(module, nn.modules.conv._ConvNd) or bool(getattr(module, "factorises_conv", False))


def is_pointwise(kernel_size) -> bool:
    """1×1(×1) kernels: a Tucker-2 of them only adds a layer, and on the CPU they are one matrix product."""
    return all(int(k) == 1 for k in kernel_size)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def leaf_modules(net: nn.Module) -> dict[str, nn.Module]:
    """Modules with no children: the rows of the per-layer table (a Tucker layer shows as its three convs)."""
    return {name: m for name, m in net.named_modules() if name and not list(m.children())}


def count_flops(net: nn.Module, example_input: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward pass and FLOPs per leaf module, from torch's FlopCounterMode.

    nnU-Net registers some modules under two names (``convs.0.conv`` and ``convs.0.all_modules.0``) and the
    counter books the FLOPs under whichever name forward() went through, so every alias of a module is looked up.
    """
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        net(example_input)
    by_module = counter.get_flop_counts()
    root = type(net).__name__
    aliases: dict[int, list[str]] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    per_leaf = {}
    for name, module in leaf_modules(net).items():
        per_leaf[name] = max(int(sum(by_module.get(f"{root}.{alias}", {}).values())) for alias in aliases[id(module)])
    return int(counter.get_total_flops()), per_leaf


def patch_flops(net: nn.Module, input_channels: int, patch_size) -> int:
    """FLOPs of one patch, counted by torch's FlopCounterMode on a meta-device copy (no real compute); a network
    already on the meta device (a candidate step being costed) is counted as it is, without a second copy."""
    on_meta = all(t.is_meta for t in (*net.parameters(), *net.buffers()))
    meta = net if on_meta else copy.deepcopy(net).to("meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.zeros((1, input_channels, *patch_size), device="meta"))
    return int(counter.get_total_flops())


def _voxels(spatial: tuple[int, ...]) -> int:
    return math.prod(int(s) for s in spatial)


def conv_costs(conv: nn.Module, in_spatial: tuple[int, ...], out_spatial: tuple[int, ...],
               ranks: tuple[int, int] | None = None) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of `conv` (ranks None) or of its TuckerConv with ranks (out, in).

    Counted as torch's FlopCounterMode counts convolutions (its FLOPs = 2 × these MACs; biases are not counted):
    a conv does out_ch·in_ch·prod(k)/groups MACs at every OUTPUT voxel, a transposed conv the same at every INPUT
    voxel. In the replacement the first 1×1 factor runs at the input resolution and the last at the output
    resolution.
    """
    kernel_taps = math.prod(conv.kernel_size)
    in_vox, out_vox = _voxels(tuple(in_spatial)), _voxels(tuple(out_spatial))
    bias = conv.out_channels if conv.bias is not None else 0
    core_vox = in_vox if conv.transposed else out_vox
    if ranks is None:
        dense = conv.out_channels * (conv.in_channels // conv.groups) * kernel_taps
        return dense + bias, core_vox * dense
    rank_out, rank_in = ranks
    first = conv.in_channels * rank_in
    core = rank_in * rank_out * kernel_taps
    last = rank_out * conv.out_channels
    params = first + core + last + bias
    macs = in_vox * first + core_vox * core + out_vox * last
    return params, macs


def layer_io_shapes(net: nn.Module, input_shape: tuple[int, ...]
                    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Spatial (input, output) size of every conv (and TuckerConv) of `net` for an input patch of `input_shape`.

    Runs a copy of the network on the 'meta' device (shapes only, no memory, no arithmetic; works for nnU-Net's
    InstanceNorm/LeakyReLU U-Nets), falling back to a real forward pass of zeros on a CPU copy for modules that
    meta tensors do not support. `net` itself is never run, so running statistics and hooks stay untouched.
    """
    input_shape = tuple(int(s) for s in input_shape)
    channels = input_channels(net)
    try:
        return _record_io_shapes(copy.deepcopy(net).to("meta"), (1, channels, *input_shape), torch.device("meta"))
    except Exception:  # an op without a meta kernel: pay for a real pass instead
        return _record_io_shapes(copy.deepcopy(net).cpu().float(), (1, channels, *input_shape), torch.device("cpu"))


def input_channels(net: nn.Module) -> int:
    """Channels the network consumes: those of its first conv in module order (the stem)."""
    for module in net.modules():
        if _is_conv_like(module):
            return int(module.in_channels)
    raise CompressError("the network has no convolution; is this an nnU-Net network?")


def _record_io_shapes(net: nn.Module, shape: tuple[int, ...], device: torch.device
                      ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook_for(name: str):
        def record(_module, inputs, output):
            shapes.setdefault(name, (tuple(inputs[0].shape[2:]), tuple(output.shape[2:])))
        return record

    handles = [m.register_forward_hook(hook_for(n)) for n, m in net.named_modules()
               if _is_conv_like(m)]
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def total_macs(net: nn.Module, io_shapes: dict) -> int:
    """Multiply-accumulates of all convolutions (what the FLOP budget is measured against)."""
    total = 0
    for name, module in net.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd,)) and name in io_shapes:
            total += conv_costs(module, *io_shapes[name])[1]
    return total
