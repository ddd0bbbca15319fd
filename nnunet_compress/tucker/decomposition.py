"""Post-training Tucker-2 decomposition of convolution kernels (Weber et al.), as pure tensor maths.

A kernel W of shape (out, in, *k) is approximated by a Tucker-2 decomposition over its two channel modes,
W ≈ G ×₀ U_out ×₁ U_in, with a core G of shape (rank_out, rank_in, *k). Since the channel factors act on channels
only, the convolution splits into three cheaper ones: a 1×1 conv that projects the input onto U_in's columns, a
thin conv with the core (it keeps the original kernel size, stride, padding and dilation) and a 1×1 conv that
expands back with U_out and adds the original bias. Transposed convolutions store their kernel as (in, out, *k),
so there the channel modes swap; the first and last factors are still ordinary 1×1 convolutions.

The decomposition itself is tensorly's ``partial_tucker`` (HOOI started from the truncated HOSVD), run in float64
numpy so that full ranks reconstruct the kernel to round-off; tensorly's global backend is left untouched.

Also here: parameter / multiply-accumulate counts of a conv and of its replacement (what rank policies trade
against reconstruction error), and the spatial input/output size of every conv of a network (those counts need
it, and a U-Net's resolution changes from stage to stage).
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np
import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.progress import bar

ConvLike = nn.modules.conv._ConvNd

_CONV_BY_DIM: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# Channel modes of a kernel tensor: (mode of the output channels, mode of the input channels).
_CONV_MODES = (0, 1)
_TRANSPOSED_MODES = (1, 0)


def channel_modes(conv: ConvLike) -> tuple[int, int]:
    """(out-channel mode, in-channel mode) of the kernel: ConvTranspose stores (in, out, *k), Conv (out, in, *k)."""
    return _TRANSPOSED_MODES if conv.transposed else _CONV_MODES


def _layer_label(name: str | None, conv: nn.Module) -> str:
    return f"layer '{name}'" if name else f"a {type(conv).__name__}"


def _check_decomposable(conv: nn.Module, name: str | None = None) -> None:
    """Only plain dense convolutions split into 1×1 → core → 1×1 with the same function."""
    label = _layer_label(name, conv)
    if not isinstance(conv, ConvLike):
        raise CompressError(f"{label} is a {type(conv).__name__}, not a convolution (or it is already factorised); "
                            f"Tucker ranks can only be given for Conv/ConvTranspose layers")
    if conv.groups != 1:
        raise CompressError(f"{label} is a grouped convolution (groups={conv.groups}); Tucker-2 needs dense "
                            f"channel mixing, so leave this layer out of the ranks")
    if len(conv.kernel_size) not in _CONV_BY_DIM:
        raise CompressError(f"{label} has a {len(conv.kernel_size)}-d kernel; only 1-d, 2-d and 3-d convolutions "
                            f"can be factorised")


def _check_ranks(conv: ConvLike, rank_out: int, rank_in: int, name: str | None = None) -> None:
    label = _layer_label(name, conv)
    for what, rank, channels in (("rank_out", rank_out, conv.out_channels), ("rank_in", rank_in, conv.in_channels)):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise CompressError(f"{label}: {what} must be an integer, got {rank!r}")
        if not 1 <= rank <= channels:
            side = "output" if what == "rank_out" else "input"
            raise CompressError(f"{label}: {what}={rank} is outside 1..{channels} (the layer has {channels} "
                                f"{side} channels); choose a rank between 1 and {channels}")


class TuckerConv(nn.Sequential):
    """A convolution replaced by 1×1 (in→rank_in) → core (rank_in→rank_out, original geometry) → 1×1 (→out).

    Children '0', '1', '2' (the names state dicts use). The core is the same class as the original layer
    (ConvNd or ConvTransposeNd), so stride, padding, dilation and output_padding keep their meaning; the 1×1
    factors are ordinary ConvNd because a 1×1 stride-1 transposed conv is the same map. Only the last factor has a
    bias, the original one: a bias anywhere earlier would be smeared by the following factor and, in the first
    factor, would also leak into the core's zero padding.
    """

    # what nnunet_compress.costs looks for: this module stands for one convolution (shapes, costs)
    factorises_conv = True

    def __init__(self, first: nn.Module, core: nn.Module, last: nn.Module, transposed: bool):
        super().__init__(first, core, last)
        self.rank_in = int(core.in_channels)
        self.rank_out = int(core.out_channels)
        self.in_channels = int(first.in_channels)
        self.out_channels = int(last.out_channels)
        self.transposed = bool(transposed)

    @classmethod
    def shaped_like(cls, conv: ConvLike, rank_out: int, rank_in: int, name: str | None = None) -> "TuckerConv":
        """The factorised structure for `conv` with default-initialised weights.

        Used to rebuild a compressed network from its plans before ``load_state_dict`` fills in the weights.
        """
        _check_decomposable(conv, name)
        _check_ranks(conv, rank_out, rank_in, name)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        pointwise = _CONV_BY_DIM[len(conv.kernel_size)]
        first = pointwise(conv.in_channels, int(rank_in), kernel_size=1, bias=False, **factory)
        core_kwargs = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=1, bias=False, padding_mode=conv.padding_mode, **factory)
        if conv.transposed:
            core_kwargs["output_padding"] = conv.output_padding
        core = type(conv)(int(rank_in), int(rank_out), **core_kwargs)
        last = pointwise(int(rank_out), conv.out_channels, kernel_size=1, bias=conv.bias is not None, **factory)
        return cls(first, core, last, transposed=conv.transposed)

    def reconstructed_weight(self) -> torch.Tensor:
        """The equivalent single kernel (in the original layer's layout); for checks and error reports."""
        u_in = self[0].weight.flatten(1)  # (rank_in, in)
        u_out = self[2].weight.flatten(1)  # (out, rank_out)
        core = self[1].weight
        if self.transposed:  # core (rank_in, rank_out, *k) -> kernel (in, out, *k)
            return torch.einsum("bi,ba...,oa->io...", u_in, core, u_out)
        return torch.einsum("ab...,bi,oa->oi...", core, u_in, u_out)  # core (rank_out, rank_in, *k)


def gram_svd(matrix: np.ndarray, n_eigenvecs: int | None = None, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD (U, S, Vᵀ) of a wide matrix from the eigenvectors of its small Gram matrix M Mᵀ.

    Given to tensorly as its ``svd`` function for the HOSVD that starts HOOI. Why by hand: a kernel unfolding is
    wide (320 × 8640 for a 320-channel 3×3×3 conv of TotalSegmentator); LAPACK's SVD of it takes about 1 s on two
    cores, an eigendecomposition of the 320 × 320 Gram matrix about 0.1 s, and tensorly 0.10's own
    ``symeig_svd`` eigendecomposes the *larger* Gram matrix of a wide matrix (8640 × 8640: minutes). Squaring
    loses the singular vectors of singular values below ~1e-8·σ_max in float64; such directions carry no energy,
    and any orthonormal completion of them reconstructs the kernel equally well. Tall matrices (fewer columns
    than rows, e.g. the 1-channel stem) go to tensorly's ordinary truncated SVD.
    """
    from tensorly.tenalg.svd import svd_checks, truncated_svd
    n_eigenvecs, _, _ = svd_checks(matrix, n_eigenvecs=n_eigenvecs)
    if matrix.shape[0] > matrix.shape[1]:
        return truncated_svd(matrix, n_eigenvecs=n_eigenvecs)
    eigenvalues, eigenvectors = np.linalg.eigh(matrix @ matrix.T)
    order = np.argsort(eigenvalues)[::-1][:n_eigenvecs]
    u = eigenvectors[:, order]
    s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    vt = (u.T @ matrix) / np.maximum(s, np.finfo(matrix.dtype).tiny)[:, None]
    return u, s, vt


def tucker2_factors(weight: np.ndarray, rank_mode0: int, rank_mode1: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of `weight` over its modes 0 and 1: (core, factor of mode 0, factor of mode 1).

    tensorly 0.10's partial_tucker returns ``((core, [factor per mode]), reconstruction_errors)``; the core keeps
    the tensor's mode order with modes 0 and 1 shrunk to their ranks, and factor i is (shape[i], rank i). Modes are
    passed in ascending order because its multi-mode products assume that. The HOSVD that starts HOOI uses
    :func:`gram_svd`. A fixed random_state makes the completion of rank-deficient factors (more rank than the
    unfolding has singular vectors, e.g. the stem's 1 input channel × 27 taps < 32 outputs) reproducible.
    """
    # tensorly (and scipy behind it) is imported here, not at module top: rebuilding a compressed network from its
    # plans needs no decomposition, and nnU-Net's predictor and TotalSegmentator should not pay for the import
    import tensorly as tl
    from tensorly.decomposition import partial_tucker
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # rank-deficient unfoldings are expected (see above) and completed; tensorly warns about each of them
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        (core, factors), _ = partial_tucker(np.ascontiguousarray(weight, dtype=np.float64),
                                            rank=[int(rank_mode0), int(rank_mode1)], modes=[0, 1], init="svd",
                                            svd=gram_svd, random_state=0)
    return np.asarray(core), np.asarray(factors[0]), np.asarray(factors[1])


def relative_error(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """||W - Ŵ|| / ||W|| in float64 (0 for an all-zero kernel approximated by zeros)."""
    original, approximation = original.detach().double().cpu(), approximation.detach().double().cpu()
    norm = torch.linalg.vector_norm(original).item()
    diff = torch.linalg.vector_norm(original - approximation).item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def decompose_conv(conv: ConvLike, rank_out: int, rank_in: int, name: str | None = None
                   ) -> tuple[TuckerConv, float]:
    """Factorise a trained conv; returns the replacement and its relative kernel reconstruction error.

    The error is measured on the weights the module actually holds (after the cast back to the layer's dtype),
    so it is what the network will see.
    """
    module = TuckerConv.shaped_like(conv, rank_out, rank_in, name=name)
    weight = conv.weight.detach().double().cpu().numpy()
    if conv.transposed:  # kernel (in, out, *k)
        core, u_in, u_out = tucker2_factors(weight, rank_in, rank_out)
    else:  # kernel (out, in, *k)
        core, u_out, u_in = tucker2_factors(weight, rank_out, rank_in)
    # partial_tucker keeps the kernel's mode order, so the core already has the layout its conv class stores:
    # (rank_out, rank_in, *k) for a Conv, (rank_in, rank_out, *k) for a ConvTranspose.
    spatial_ones = (1,) * len(conv.kernel_size)
    with torch.no_grad():
        _set_weight(module[0], u_in.T.reshape(rank_in, conv.in_channels, *spatial_ones))
        _set_weight(module[1], core)
        _set_weight(module[2], u_out.reshape(conv.out_channels, rank_out, *spatial_ones))
        if conv.bias is not None:
            module[2].bias.copy_(conv.bias.detach())
    return module, relative_error(conv.weight, module.reconstructed_weight())


def _set_weight(module: nn.Module, value: np.ndarray) -> None:
    weight = module.weight
    weight.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(device=weight.device, dtype=weight.dtype))


def _replace_everywhere(net: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Swap every reference to `old` inside `net` for `new`; returns how many references there were.

    nnU-Net's blocks register the same conv twice (``ConvDropoutNormReLU.conv`` and ``.all_modules[0]``, the
    latter being what ``forward`` runs), so replacing only the attribute named in ``named_modules`` would leave the
    network computing with the old conv.
    """
    count = 0
    for parent in net.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new
                count += 1
    return count


def replace_convs(net: nn.Module, ranks: Mapping[str, tuple[int, int]], decompose: bool = True
                  ) -> dict[str, float]:
    """Replace the named convs of `net` in place by TuckerConv modules; returns name → relative error.

    decompose=False builds the factorised structure only (its weights come later from a state dict); its error
    is nan. All names and ranks are validated before anything is changed, so a bad entry leaves `net` intact.
    """
    targets: dict[str, tuple[ConvLike, int, int]] = {}
    seen: dict[int, str] = {}
    for name, layer_ranks in ranks.items():
        conv = _get_layer(net, name)
        if id(conv) in seen:  # e.g. '...convs.0.conv' and its alias '...convs.0.all_modules.0'
            raise CompressError(f"'{name}' and '{seen[id(conv)]}' are the same layer; give its ranks once")
        seen[id(conv)] = name
        rank_out, rank_in = _unpack_ranks(name, layer_ranks)
        _check_decomposable(conv, name)
        _check_ranks(conv, rank_out, rank_in, name)
        targets[name] = (conv, rank_out, rank_in)
    errors: dict[str, float] = {}
    # decomposing a TotalSegmentator-sized network takes minutes: a bar per layer where someone watches
    layers = bar(targets.items(), "Tucker decomposition", "layer", total=len(targets)) if decompose else targets.items()
    for name, (conv, rank_out, rank_in) in layers:
        if decompose:
            module, error = decompose_conv(conv, rank_out, rank_in, name=name)
        else:
            module, error = TuckerConv.shaped_like(conv, rank_out, rank_in, name=name), math.nan
        module.train(conv.training)
        _replace_everywhere(net, conv, module)
        errors[name] = error
    return errors


def _get_layer(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        convs = [n for n, m in net.named_modules() if isinstance(m, ConvLike)]
        hint = ", ".join(convs[:3]) + (", ..." if len(convs) > 3 else "")
        raise CompressError(f"the network has no layer '{name}'; layer names are as in named_modules(), e.g. "
                            f"{hint}") from None


def _unpack_ranks(name: str, layer_ranks) -> tuple[int, int]:
    try:
        rank_out, rank_in = layer_ranks
    except (TypeError, ValueError):
        raise CompressError(f"layer '{name}': ranks must be a pair [rank_out, rank_in], got {layer_ranks!r}") \
            from None
    return rank_out, rank_in


# ---- costs ---------------------------------------------------------------------------------------------------


# ---- shapes --------------------------------------------------------------------------------------------------


