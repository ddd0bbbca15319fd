"""Fold InstanceNorm into the last 1×1 factor of a Tucker-factorised conv at CPU inference.

Why: after the fast convolution paths, InstanceNorm was the largest single cost of a Tucker-factorised network on
the CPU (25% of a 96³ patch at channel ratio 0.25; README, "Performance"). It is memory-bound: it reads the
full-width output of the layer twice (statistics, then normalisation) and writes it once more, and compression
does not make that output any thinner. But the output of a factorised layer is y = U z + c with z the thin core
output (r channels, r ≪ C), so its per-channel statistics follow from z's: mean(y) = U mean(z) + c and
var(y_k) = u_kᵀ Cov(z) u_k with the r×r covariance of z. Hence

    IN(y) = γ ⊙ (y − mean y) / sqrt(var y + ε) + β = (diag(s) U) (z − mean z) + β,  s = γ / sqrt(var y + ε)

— one GEMM from the thin z straight to the normalised output, the conv bias c cancelling out. The r×r statistics
come from the centred z (no cancellation however large z's mean) and cost passes over the thin z only. The nonlinearity
that follows (LeakyReLU/ReLU) is applied in place on that output.

:class:`FoldableConvNormAct` is nnU-Net's ``ConvDropoutNormReLU.all_modules`` Sequential (the same child modules,
so the same state-dict keys) with this folded forward where :func:`folding_applies`; everywhere else (training,
autograd, CUDA, FLOP counting, ``plain_inference()``) it runs the ordinary Sequential. :func:`install` swaps it in
for every block whose chain is exactly TuckerConv → affine InstanceNorm without running statistics → optional
LeakyReLU/ReLU (a dropout in between, a 2×2×2 transposed conv or a BatchNorm are left alone). No library offers
this fusion for InstanceNorm (torch's conv-BN folding covers BatchNorm in eval mode, whose statistics are fixed).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from nnunet_compress.factorised_maps import FactorisedMap, apply_pointwise, factorised_instance_norm
from nnunet_compress.tucker import TuckerConv


class FoldableConvNormAct(nn.Sequential):
    """conv (TuckerConv) → InstanceNorm → [LeakyReLU | ReLU], with the norm folded into the conv at CPU inference."""

    canonical_class = "torch.nn.modules.container.Sequential"  # computes what nnU-Net's Sequential does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (folding_applies(x) and foldable(self)):
            return super().forward(x)
        return folded_block(self, x).materialize()


def folded_block(chain: nn.Sequential, x) -> FactorisedMap:
    """A foldable chain applied to x (a tensor, or a factorised map whose activation is the input), kept factorised.

    The first 1×1 factor is applied straight to a factorised input (never writing it out), the core runs through
    the fast convolution paths, and the norm and activation stay folded into the returned map.
    """
    return folded_core(chain, apply_pointwise(x, chain[0][0].weight.flatten(1)))


def folded_core(chain: nn.Sequential, reduced: torch.Tensor) -> FactorisedMap:
    """The rest of a foldable chain once its first 1×1 factor has been applied (`reduced`: rank_in channels)."""
    conv, norm = chain[0], chain[1]
    z = conv[1](reduced)  # the thin core output
    return factorised_instance_norm(z, conv[2].weight, norm, activation_slope(chain[2] if len(chain) > 2 else None))


def activation_slope(act: nn.Module | None) -> float | None:
    """LeakyReLU's negative slope, 0.0 for ReLU, None for no activation (the forms factorised maps apply)."""
    if act is None:
        return None
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return 0.0
    raise TypeError(f"no folded form for {type(act).__name__}")


def folding_applies(x: torch.Tensor) -> bool:
    from nnunet_compress.fast_inference import OPTIONS, fast_paths_apply
    return OPTIONS.fold_instance_norm and fast_paths_apply(x)


def normalized_expansion(z: torch.Tensor, expansion_weight: torch.Tensor, norm: _InstanceNorm) -> torch.Tensor:
    """InstanceNorm(U z + c) computed as one GEMM from z (see the module docstring); z is (B, r, *spatial)."""
    return factorised_instance_norm(z, expansion_weight, norm, None).materialize()


def foldable(chain: nn.Sequential) -> bool:
    """Whether an nnU-Net conv block's module chain is TuckerConv → affine InstanceNorm → [LeakyReLU | ReLU]."""
    conv = chain[0] if len(chain) else None
    if not (isinstance(conv, TuckerConv) and not conv.transposed and conv[2].groups == 1):
        return False
    return instance_norm_tail(chain, conv.out_channels)


def instance_norm_tail(chain: nn.Sequential, channels: int) -> bool:
    """Whether `chain` is conv → affine InstanceNorm (no running statistics, `channels` wide) → [LeakyReLU | ReLU]:
    the norm and activation forms that folding and factorised maps reproduce exactly."""
    modules = list(chain)
    if len(modules) not in (2, 3):
        return False
    norm = modules[1]
    if not (isinstance(norm, _InstanceNorm) and norm.affine and not norm.track_running_stats
            and norm.num_features == channels):
        return False
    return len(modules) == 2 or type(modules[2]) in (nn.LeakyReLU, nn.ReLU)


def install(net: nn.Module) -> int:
    """Swap every foldable ``all_modules`` chain of `net` for a FoldableConvNormAct; returns how many there are.

    Idempotent and cheap (a walk over the modules), so it can run before every forward pass: a network whose
    convs are factorised after it was built (``replace_convs``) is covered too. State-dict keys do not change.
    """
    count = 0
    for module in net.modules():
        chain = getattr(module, "all_modules", None)
        if isinstance(chain, FoldableConvNormAct):
            count += 1
        elif isinstance(chain, nn.Sequential) and foldable(chain):
            module.all_modules = FoldableConvNormAct(*chain)
            count += 1
    return count
