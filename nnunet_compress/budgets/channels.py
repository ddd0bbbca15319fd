"""Seconds per patch of a network as pruning removes channels, predicted from a per-convolution cost model.

Pruning to ``--target-latency`` ranks channels by importance per second saved, so it needs what removing one more
channel of each group would save (:meth:`PredictedSeconds.channel_seconds`). Whether the target is met is decided
by timing the whole network after every step (the callers do that); the prediction of the whole network —
the original's MEASURED seconds minus what each convolution's predicted time fell by since the start
(``layer_seconds(conv, in_spatial, out_spatial, channels=(c_in, c_out))``, e.g.
:meth:`.latency_model.LatencyModel.layer_seconds`), its saving scaled by ``k`` = measured
saving / predicted saving (:meth:`calibrate`) — is recorded beside each measurement in the reports.

Pure torch + a cost callable: nothing here runs an engine.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from torch import nn

from nnunet_compress.pruning.dependency import ChannelGroup

# (conv, input spatial size, output spatial size, ranks (always None here), channels (c_in, c_out)) -> seconds
ChannelCost = Callable[..., float]


class PredictedSeconds:
    """Predicted seconds per patch of `net` as its channels change (the network's convs keep their names)."""

    def __init__(self, net: nn.Module, io_shapes: Mapping[str, tuple], base_seconds: float,
                 layer_seconds: ChannelCost):
        self.io_shapes = dict(io_shapes)
        self.base_seconds = float(base_seconds)
        self.layer_seconds = layer_seconds
        self.k = 1.0  # measured saving / predicted saving (1 until calibrated)
        self.start = {name: self.seconds_of(name, conv) for name, conv in self._convs(net).items()}

    def _convs(self, net: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in net.named_modules()
                if isinstance(m, nn.modules.conv._ConvNd) and name in self.io_shapes}

    def predicted_saving(self, net: nn.Module) -> float:
        """Seconds per patch the per-convolution model says pruning has saved so far (before the k scaling)."""
        return sum(self.start[name] - self.seconds_of(name, conv) for name, conv in self._convs(net).items()
                   if name in self.start)

    def seconds_of(self, name: str, conv: nn.Module, c_in: int | None = None, c_out: int | None = None) -> float:
        channels = (c_in if c_in is not None else conv.in_channels, c_out if c_out is not None else conv.out_channels)
        return self.layer_seconds(conv, *self.io_shapes[name], None, channels)

    def fraction(self, net: nn.Module) -> float:
        """Predicted seconds of `net` now over the original's: 1 - k · predicted saving / base."""
        return 1.0 - self.k * self.predicted_saving(net) / self.base_seconds

    def calibrate(self, net: nn.Module, measured_fraction: float) -> None:
        """Set k from a whole-network measurement of `net` (kept when nothing was saved yet)."""
        predicted = self.predicted_saving(net)
        measured = (1.0 - measured_fraction) * self.base_seconds
        if predicted > 0 and measured > 0:
            self.k = measured / predicted

    def channel_seconds(self, net: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, float]:
        """Per prunable group, the predicted seconds saved by removing ONE of its channels (from every producer's
        outputs and every consumer's inputs)."""
        modules = dict(net.named_modules())
        saved: dict[str, float] = {}
        for group in groups:
            if not group.prunable:
                continue
            total = 0.0
            for name in group.producers:
                conv = modules[name]
                if name in self.io_shapes and conv.out_channels > 1:
                    total += self.seconds_of(name, conv) - self.seconds_of(name, conv, c_out=conv.out_channels - 1)
            for name, _offset in group.consumers:
                conv = modules.get(name)
                if isinstance(conv, nn.modules.conv._ConvNd) and name in self.io_shapes and conv.in_channels > 1:
                    total += self.seconds_of(name, conv) - self.seconds_of(name, conv, c_in=conv.in_channels - 1)
            saved[group.name] = self.k * total
        return saved
