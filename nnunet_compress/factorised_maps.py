"""Full-width feature maps held in factorised form, and 1×1 convolutions applied to them chunk by chunk.

Why: in a Tucker-factorised U-Net every normalised activation is a = act(A z + b) per voxel, with z the thin core
output (r ≪ C channels; InstanceNorm folded into A and b, see :mod:`nnunet_compress.norm_folding`), and every
consumer of a starts with a linear 1×1 map: the next layer's first factor, the decoder's 1×1 after the skip
concatenation, the segmentation head. Written out, a is C channels at full resolution — the one tensor size that
compression does not shrink — and writing, activating and re-reading it was most of a compressed network's CPU
time (a 32-channel map at 96³ is 113 MB; expand → LeakyReLU → reduce 8→32→8 took 244 ms that way and 9 ms as
below, measured side by side on 2 cores). So the activation is kept as (z, A) and a consumer's 1×1 map W is
applied as W · act(A z) over blocks of voxels small enough to stay in cache: the full-width block is formed,
activated and reduced while it is hot, and only the thin result reaches memory.

:class:`FactorisedMap` is act(A z) with the bias folded into A (z carries a row of ones, so one GEMM does both);
:class:`AffineMap` is act(s ⊙ y + t) for a dense y (a plain conv followed by InstanceNorm, e.g. the stem), whose
normalisation is likewise done block by block inside its consumer. Both offer ``project`` (a 1×1 map applied to
the activation) and ``materialize`` (the ordinary dense tensor, for any other consumer). No library provides
lazy, cache-blocked producer/consumer fusion for these tensors on the CPU (torch.compile's inductor can fuse
elementwise chains but not a GEMM → activation → GEMM chain), hence the hand-written block loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# voxels per block: 16384 × 32 channels × 4 bytes = 2 MB stays in cache; 4096–65536 measured within 20% of it
BLOCK_VOXELS = 16384


def _activate_(y: torch.Tensor, negative_slope: float | None) -> None:
    if negative_slope is None:
        return
    if negative_slope == 0.0:
        torch.relu_(y)
    else:
        F.leaky_relu_(y, negative_slope)


def _blocks(voxels: int):
    for start in range(0, voxels, BLOCK_VOXELS):
        yield start, min(voxels, start + BLOCK_VOXELS)


@dataclass
class FactorisedMap:
    """The activation act(A_b z_b) of every sample b, kept factorised.

    z: (B, r + 1, V), its last row all ones; weight: (B, C, r + 1), its last column the bias (per sample, because
    InstanceNorm's statistics are); negative_slope: LeakyReLU's (0.0 for ReLU, None for no activation).
    """

    z: torch.Tensor
    weight: torch.Tensor
    negative_slope: float | None
    spatial: tuple[int, ...]

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def _activation_into(self, b: int, start: int, stop: int, out: torch.Tensor) -> None:
        torch.mm(self.weight[b], self.z[b, :, start:stop], out=out)
        _activate_(out, self.negative_slope)

    def project(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """w (k, C) applied as a 1×1 conv to the activation, plus bias: (B, k, *spatial)."""
        return _project(self._activation_into, self.z.shape[0], self.channels, self.z.shape[2], self.spatial, w,
                        bias)

    def materialize(self) -> torch.Tensor:
        """The dense activation (B, C, *spatial), activated block by block while each block is in cache."""
        return _materialize(self._activation_into, self.z.shape[0], self.channels, self.z.shape[2], self.spatial,
                            self.z)


@dataclass
class AffineMap:
    """The activation act(scale ⊙ y + shift) of a dense y (B, C, *spatial), per-sample scale/shift (B, C)."""

    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    negative_slope: float | None

    @property
    def channels(self) -> int:
        return int(self.y.shape[1])

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.y.shape[2:])

    def _activation_into(self, b: int, start: int, stop: int, out: torch.Tensor) -> None:
        flat = self.y[b].reshape(self.channels, -1)
        torch.addcmul(self.shift[b][:, None].expand(-1, stop - start), flat[:, start:stop], self.scale[b][:, None],
                      out=out)
        _activate_(out, self.negative_slope)

    @property
    def _voxels(self) -> int:
        return self.y[0].numel() // self.channels

    def project(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """w (k, C) applied as a 1×1 conv to the activation, plus bias: (B, k, *spatial)."""
        return _project(self._activation_into, self.y.shape[0], self.channels, self._voxels, self.spatial, w, bias)

    def materialize(self) -> torch.Tensor:
        """The dense activation (B, C, *spatial)."""
        return _materialize(self._activation_into, self.y.shape[0], self.channels, self._voxels, self.spatial,
                            self.y)


def _materialize(fill, batch: int, channels: int, voxels: int, spatial, like: torch.Tensor) -> torch.Tensor:
    """The dense activation, `fill(b, start, stop, block)` writing each block of it in place."""
    out = torch.empty((batch, channels, voxels), dtype=like.dtype, device=like.device)
    for b in range(batch):
        for start, stop in _blocks(voxels):
            fill(b, start, stop, out[b, :, start:stop])
    return out.view(batch, -1, *spatial)


def apply_pointwise(x, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """w (k, C) as a 1×1 conv on x: a dense tensor (one GEMM) or a factorised/affine map (block by block)."""
    if isinstance(x, (FactorisedMap, AffineMap)):
        return x.project(w, bias)
    from nnunet_compress.fast_inference import pointwise_gemm
    return pointwise_gemm(x, w, bias)


def _project(fill, batch: int, channels: int, voxels: int, spatial, w: torch.Tensor, bias: torch.Tensor | None
             ) -> torch.Tensor:
    """w · a + bias over blocks of voxels, `fill(b, start, stop, block)` writing the activation a of each block.

    The block buffer carries a row of ones under the C activation rows and w the bias as an extra column, so each
    block is one GEMM straight into the output (``addmm`` would first copy the broadcast bias into it).
    """
    out = torch.empty((batch, w.shape[0], voxels), dtype=w.dtype, device=w.device)
    block = torch.empty((channels + 1, min(voxels, BLOCK_VOXELS)), dtype=w.dtype, device=w.device)
    rows = channels
    if bias is not None:
        block[channels] = 1.0
        w = torch.cat((w, bias[:, None].to(w.dtype)), dim=1)
        rows += 1
    for b in range(batch):
        for start, stop in _blocks(voxels):
            fill(b, start, stop, block[:channels, :stop - start])
            torch.mm(w, block[:rows, :stop - start], out=out[b, :, start:stop])
    return out.view(batch, -1, *spatial)


def factorised_instance_norm(z: torch.Tensor, expansion_weight: torch.Tensor, norm, negative_slope: float | None
                             ) -> FactorisedMap:
    """act(InstanceNorm(U z + c)) as a FactorisedMap, from the thin z (B, r, *spatial) and U (C, r[, 1, 1, 1]).

    The maths (README, "Performance", and norm_folding.py): IN(U z + c) = (diag(s) U)(z − mean z) + β with
    s = γ / sqrt(diag(U Cov(z) Uᵀ) + ε); the conv bias c cancels. z is centred first (one pass over the thin z),
    so float32 loses nothing to cancellation however large z's mean is; the r×r and C×r algebra is in float64.
    """
    batch, rank, spatial = z.shape[0], z.shape[1], tuple(z.shape[2:])
    out_channels = expansion_weight.shape[0]
    u = expansion_weight.reshape(out_channels, rank).double()
    flat = z.reshape(batch, rank, -1)
    voxels = flat.shape[-1]
    centred = torch.empty((batch, rank + 1, voxels), dtype=z.dtype, device=z.device)
    centred[:, rank] = 1.0
    weight = torch.empty((batch, out_channels, rank + 1), dtype=z.dtype, device=z.device)
    gamma, beta = norm.weight.double(), norm.bias.double()
    for b in range(batch):
        mean = flat[b].mean(dim=1, keepdim=True)
        torch.sub(flat[b], mean, out=centred[b, :rank])
        c = centred[b, :rank]
        covariance = (c @ c.T).double() / voxels
        variance = ((u @ covariance) * u).sum(dim=1).clamp_min(0.0)
        weight[b, :, :rank] = ((gamma / torch.sqrt(variance + norm.eps))[:, None] * u).to(z.dtype)
        weight[b, :, rank] = beta.to(z.dtype)
    return FactorisedMap(centred, weight, negative_slope, spatial)


def affine_instance_norm(y: torch.Tensor, norm, negative_slope: float | None) -> AffineMap:
    """act(InstanceNorm(y)) as an AffineMap: one statistics pass over y, the normalisation left to the consumer."""
    batch, channels = y.shape[:2]
    variance, mean = channel_variance_mean(y.reshape(batch, channels, -1))
    scale = norm.weight.double() / torch.sqrt(variance + norm.eps)
    shift = norm.bias.double() - mean * scale
    return AffineMap(y, scale.to(y.dtype), shift.to(y.dtype), negative_slope)


def channel_variance_mean(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased) variance and mean of flat (B, C, V), in float64.

    ``torch.var_mean`` does the same but ran at a fifth of memory speed on the CPU (69 ms for 32 × 96³, more than
    InstanceNorm itself); the mean is one fast reduction, and the centred second moment is summed block by block
    (both float64-accumulated across blocks; the residual mean of the centred values is subtracted out).
    """
    batch, channels, voxels = flat.shape
    mean = flat.mean(dim=2, keepdim=True)
    moment1 = torch.zeros((batch, channels), dtype=torch.float64, device=flat.device)
    moment2 = torch.zeros_like(moment1)
    scratch = torch.empty((channels, min(voxels, BLOCK_VOXELS)), dtype=flat.dtype, device=flat.device)
    for b in range(batch):
        for start, stop in _blocks(voxels):
            d = torch.sub(flat[b, :, start:stop], mean[b], out=scratch[:, :stop - start])
            moment1[b] += d.sum(dim=1).double()  # a block's float32 sum is pairwise, hence accurate
            moment2[b] += d.square_().sum(dim=1).double()
    residual = moment1 / voxels
    return (moment2 / voxels - residual * residual).clamp_min(0.0), mean[..., 0].double() + residual
