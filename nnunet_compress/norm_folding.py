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

from nnunet_compress.tucker import TuckerConv


class FoldableConvNormAct(nn.Sequential):
    """conv (TuckerConv) → InstanceNorm → [LeakyReLU | ReLU], with the norm folded into the conv at CPU inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (folding_applies(x) and foldable(self)):
            return super().forward(x)
        conv, norm = self[0], self[1]
        act = self[2] if len(self) > 2 else None
        z = conv[1](conv[0](x))  # the thin core output; conv[0] and conv[1] run through the fast paths
        y = normalized_expansion(z, conv[2].weight, norm)
        if isinstance(act, nn.LeakyReLU):
            torch.nn.functional.leaky_relu_(y, act.negative_slope)
        elif isinstance(act, nn.ReLU):
            torch.relu_(y)
        return y


def folding_applies(x: torch.Tensor) -> bool:
    from nnunet_compress.fast_inference import OPTIONS, fast_paths_apply
    return OPTIONS.fold_instance_norm and fast_paths_apply(x)


def normalized_expansion(z: torch.Tensor, expansion_weight: torch.Tensor, norm: _InstanceNorm) -> torch.Tensor:
    """InstanceNorm(U z + c) computed as one GEMM from z (see the module docstring); z is (B, r, *spatial)."""
    batch, rank, spatial = z.shape[0], z.shape[1], z.shape[2:]
    out_channels = expansion_weight.shape[0]
    u = expansion_weight.reshape(out_channels, rank).double()
    flat = z.reshape(batch, rank, -1)
    voxels = flat.shape[-1]
    out = torch.empty((batch, out_channels, voxels), dtype=z.dtype, device=z.device)
    gamma, beta = norm.weight.double(), norm.bias.double()
    for b in range(batch):
        # centre z first (one pass over the thin z): the covariance and the GEMM below then work on values of the
        # size of z's spread, so float32 loses nothing to cancellation however large z's mean is; the r×r and
        # C×r algebra is done in float64
        mean = flat[b].mean(dim=1, keepdim=True)
        centered = flat[b] - mean
        covariance = (centered @ centered.T).double() / voxels
        variance = ((u @ covariance) * u).sum(dim=1).clamp_min(0.0)
        weight = (gamma / torch.sqrt(variance + norm.eps))[:, None] * u
        torch.addmm(beta.to(z.dtype)[:, None], weight.to(z.dtype), centered, out=out[b])
    return out.view(batch, out_channels, *spatial)


def foldable(chain: nn.Sequential) -> bool:
    """Whether an nnU-Net conv block's module chain is TuckerConv → affine InstanceNorm → [LeakyReLU | ReLU]."""
    modules = list(chain)
    if len(modules) not in (2, 3):
        return False
    conv, norm = modules[0], modules[1]
    if not (isinstance(conv, TuckerConv) and not conv.transposed and conv[2].groups == 1):
        return False
    if not (isinstance(norm, _InstanceNorm) and norm.affine and not norm.track_running_stats
            and norm.num_features == conv.out_channels):
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
