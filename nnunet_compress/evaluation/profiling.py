"""What does a network cost to run? Parameters, FLOPs, latency and peak memory of one patch.

FLOPs come from torch's own ``FlopCounterMode`` (it counts a multiply-add as two FLOPs; the Tucker paper's fvcore
counts it as one, so divide by two to compare). Latency is the median of several timed forward passes after
warm-up, because a shared machine is noisy and the median is robust to the occasional stall. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on the CPU torch keeps no allocator statistics, so we sample the
process's resident set size while the forward pass runs and report the rise above the level before it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from nnunet_compress.costs import count_flops, count_parameters, leaf_modules


@dataclass
class LayerCost:
    """Cost of one leaf module that owns parameters or performs counted operations."""

    name: str
    kind: str
    params: int
    flops: int


@dataclass
class NetworkProfile:
    """Whole-network figures for one input patch, plus the per-layer breakdown."""

    patch_size: tuple[int, ...]
    device: str
    params: int
    flops: int
    latency_s: float | None = None
    latency_runs: int = 0
    peak_memory_bytes: int | None = None
    layers: list[LayerCost] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_costs(net: nn.Module, example_input: torch.Tensor) -> tuple[int, list[LayerCost]]:
    total_flops, per_leaf = count_flops(net, example_input)
    rows = []
    for name, module in leaf_modules(net).items():
        params = sum(p.numel() for p in module.parameters(recurse=False))
        flops = per_leaf.get(name, 0)
        if params or flops:
            rows.append(LayerCost(name, type(module).__name__, params, flops))
    return total_flops, rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(net: nn.Module, example_input: torch.Tensor, runs: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of one forward pass (no autograd), after `warmup` untimed passes."""
    device = example_input.device
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            _synchronize(device)
            start = time.perf_counter()
            net(example_input)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler(threading.Thread):
    """Samples the resident set size every millisecond until stopped, keeping the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def measure_peak_memory(net: nn.Module, example_input: torch.Tensor) -> int | None:
    """Extra memory one forward pass needs above what is already held (bytes); None where unmeasurable."""
    device = example_input.device
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            net(example_input)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - before)
        if not os.path.exists("/proc/self/statm"):
            return None
        before = _rss_bytes()
        sampler = _RssSampler()
        sampler.start()
        try:
            net(example_input)
        finally:
            peak = sampler.stop()
        return max(0, peak - before)


def profile_network(net: nn.Module, input_channels: int, patch_size: tuple[int, ...], device: str = "cpu",
                    runs: int = 5, warmup: int = 2, timing: bool = True) -> NetworkProfile:
    """Profile `net` on one zero-filled patch of shape (1, input_channels, *patch_size)."""
    dev = torch.device(device)
    net = net.to(dev).eval()
    x = torch.zeros((1, input_channels, *patch_size), device=dev)
    flops, rows = layer_costs(net, x)
    profile = NetworkProfile(tuple(int(s) for s in patch_size), str(dev), count_parameters(net), flops, layers=rows)
    if timing:
        profile.peak_memory_bytes = measure_peak_memory(net, x)
        profile.latency_s = measure_latency(net, x, runs=runs, warmup=warmup)
        profile.latency_runs = runs
    return profile


def format_profile(profile: NetworkProfile, per_layer: bool = True) -> str:
    """A plain-text table: one row per layer, then the totals."""
    lines = []
    if per_layer:
        width = max([len(r.name) for r in profile.layers] + [5])
        lines.append(f"{'layer':<{width}}  {'type':<16} {'params':>12} {'MFLOPs':>12}")
        for r in profile.layers:
            lines.append(f"{r.name:<{width}}  {r.kind:<16} {r.params:>12,} {r.flops / 1e6:>12.2f}")
        lines.append("")
    lines.append(f"patch size       : {' x '.join(map(str, profile.patch_size))} on {profile.device}")
    lines.append(f"parameters       : {profile.params:,}")
    lines.append(f"GFLOPs per patch : {profile.flops / 1e9:.3f} (torch FlopCounterMode; 1 multiply-add = 2 FLOPs)")
    if profile.latency_s is not None:
        lines.append(f"latency (median) : {profile.latency_s * 1000:.1f} ms over {profile.latency_runs} runs")
    if profile.peak_memory_bytes is not None:
        lines.append(f"peak memory      : {profile.peak_memory_bytes / 2**20:.1f} MiB above baseline")
    return "\n".join(lines)
