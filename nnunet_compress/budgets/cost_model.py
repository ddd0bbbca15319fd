"""The per-convolution cost model of a budget in seconds: pure maths, no engine.

Why a fitted model and not one timing per candidate: a budget search weighs every rank pair of every layer (a
320-channel layer alone has 320² pairs), and pruning every channel count; timing each would take hours. Per
:class:`ConvSite` (kind, kernel, stride, input size) a 3×3 grid of channel counts spanning what the search may
choose is timed (:mod:`.latency_model`) and

    t(c_in, c_out) = a + b·c_in·c_out + c·c_in + d·c_out

fitted with non-negative least squares (:class:`SiteFit`): fixed cost per call, arithmetic (∝ c_in·c_out at a
fixed site), reading the input and writing the output. Non-negative coefficients make the prediction grow with
every channel count, which the greedy allocators rely on (a lower rank is never predicted slower). A Tucker layer
is predicted as its three convolutions: 1×1 at the input size, the core at the layer's site, 1×1 at the output
size.

:func:`tucker_requirements` and :func:`channel_requirements` say which sites and channel ranges a rank or a
channel search may visit, i.e. what must be timed. :class:`FlopsCostModel` is the ``--cost-model flops``
alternative: every layer's seconds taken as its MACs times the measured network's seconds per MAC, i.e. FLOPs as
the currency, for comparison and for machines where measuring is not wanted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import nnls
from torch import nn

from nnunet_compress.costs import conv_costs

GRID_POINTS = 3  # per channel axis; 3×3 timings per site


@dataclass(frozen=True)
class ConvSite:
    """Everything that fixes a convolution's time except its channel counts: kind, geometry, input size.

    Tucker factors and pruned layers differ from the original only in channels, so one site covers every
    candidate of a layer (and the 1×1 factors of all layers at one resolution share a site).
    """

    transposed: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    in_spatial: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Module, in_spatial: Sequence[int]) -> "ConvSite":
        return cls(bool(getattr(conv, "transposed", False)), tuple(int(k) for k in conv.kernel_size),
                   tuple(int(s) for s in conv.stride), tuple(int(p) for p in conv.padding),
                   tuple(int(s) for s in in_spatial))

    @classmethod
    def pointwise(cls, in_spatial: Sequence[int]) -> "ConvSite":
        """The site of a 1×1(×1) stride-1 convolution (a Tucker factor) at `in_spatial`."""
        dims = len(in_spatial)
        return cls(False, (1,) * dims, (1,) * dims, (0,) * dims, tuple(int(s) for s in in_spatial))

    def key(self) -> str:
        def j(values):
            return "x".join(map(str, values))
        kind = "tconv" if self.transposed else "conv"
        return f"{kind} k{j(self.kernel)} s{j(self.stride)} p{j(self.padding)} @ {j(self.in_spatial)}"

    @classmethod
    def from_key(cls, key: str) -> "ConvSite":
        kind, kernel, stride, padding, _, spatial = key.split(" ")

        def ints(text: str) -> tuple[int, ...]:
            return tuple(int(v) for v in text.split("x"))
        return cls(kind == "tconv", ints(kernel[1:]), ints(stride[1:]), ints(padding[1:]), ints(spatial))

    def module(self, c_in: int, c_out: int) -> nn.Module:
        dims = len(self.kernel)
        if self.transposed:
            cls = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        else:
            cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        return cls(c_in, c_out, self.kernel, stride=self.stride, padding=self.padding, bias=False)


@dataclass
class SiteFit:
    """The measured (c_in, c_out, seconds) samples of one site and the fitted coefficients (a, b, c, d)."""

    samples: list[tuple[int, int, float]] = field(default_factory=list)
    coefficients: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def seconds(self, c_in: int, c_out: int) -> float:
        a, b, c, d = self.coefficients
        return a + b * c_in * c_out + c * c_in + d * c_out

    def refit(self) -> None:
        design = np.array([[1.0, ci * co, ci, co] for ci, co, _ in self.samples])
        seconds = np.array([s for _, _, s in self.samples])
        scale = np.maximum(np.abs(design).max(axis=0), 1e-12)  # columns of very different size: NNLS on scaled
        solution, _ = nnls(design / scale, seconds)
        self.coefficients = tuple(float(v) for v in solution / scale)

    def sampled(self) -> set[tuple[int, int]]:
        return {(ci, co) for ci, co, _ in self.samples}


def grid(lo: int, hi: int, points: int = GRID_POINTS) -> list[int]:
    """`points` channel counts from lo to hi, geometrically spaced (time varies most at few channels)."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    if hi <= lo:
        return [hi]
    values = {int(round(lo * (hi / lo) ** (i / (points - 1)))) for i in range(points)}
    return sorted(values | {lo, hi})


@dataclass
class ChannelRange:
    """Channel counts the search may give a site: [c_in_lo, c_in_hi] × [c_out_lo, c_out_hi]."""

    c_in: tuple[int, int]
    c_out: tuple[int, int]

    def merged(self, other: "ChannelRange") -> "ChannelRange":
        return ChannelRange((min(self.c_in[0], other.c_in[0]), max(self.c_in[1], other.c_in[1])),
                            (min(self.c_out[0], other.c_out[0]), max(self.c_out[1], other.c_out[1])))

    def points(self) -> list[tuple[int, int]]:
        return [(ci, co) for ci in grid(*self.c_in) for co in grid(*self.c_out)]


def add_requirement(needed: dict[ConvSite, ChannelRange], site: ConvSite, c_in: tuple[int, int],
                    c_out: tuple[int, int]) -> None:
    wanted = ChannelRange(c_in, c_out)
    needed[site] = needed[site].merged(wanted) if site in needed else wanted


@dataclass
class FlopsCostModel:
    """``--cost-model flops``: a layer's seconds = its MACs × (the network's measured seconds / its MACs)."""

    seconds_per_mac: float
    engine: str = "flops"
    kind = "flops"

    def layer_seconds(self, conv: nn.Module, in_spatial: Sequence[int], out_spatial: Sequence[int],
                      ranks: tuple[int, int] | None = None, channels: tuple[int, int] | None = None) -> float:
        if channels is not None:
            c_in, c_out = channels
            macs = conv_costs(conv, in_spatial, out_spatial)[1] * c_in * c_out / (conv.in_channels * conv.out_channels)
        else:
            macs = conv_costs(conv, in_spatial, out_spatial, ranks=ranks)[1]
        return macs * self.seconds_per_mac


def tucker_requirements(layers: Mapping[str, nn.Module], io_shapes: Mapping, floors: Mapping[str, tuple[int, int]]
                        ) -> dict[ConvSite, ChannelRange]:
    """Sites and channel ranges a Tucker rank search may visit: each layer's own site (ranks from the floors to
    full, and the full layer itself) and the 1×1 factors at its input and output sizes."""
    needed: dict[ConvSite, ChannelRange] = {}
    for name, conv in layers.items():
        if name not in io_shapes:
            continue
        in_spatial, out_spatial = io_shapes[name]
        floor_out, floor_in = floors[name]
        c_in, c_out = conv.in_channels, conv.out_channels
        add_requirement(needed, ConvSite.of(conv, in_spatial), (floor_in, c_in), (floor_out, c_out))
        add_requirement(needed, ConvSite.pointwise(in_spatial), (c_in, c_in), (floor_in, c_in))
        add_requirement(needed, ConvSite.pointwise(out_spatial), (floor_out, c_out), (c_out, c_out))
    return needed


def channel_requirements(convs: Iterable[tuple[nn.Module, Sequence[int], tuple[int, int], tuple[int, int]]]
                         ) -> dict[ConvSite, ChannelRange]:
    """Sites and ranges for pruning: (conv, input size, c_in range, c_out range) per convolution."""
    needed: dict[ConvSite, ChannelRange] = {}
    for conv, in_spatial, c_in, c_out in convs:
        add_requirement(needed, ConvSite.of(conv, in_spatial), c_in, c_out)
    return needed

