"""What does a network cost to run? Parameters, FLOPs, latency and peak memory of one patch.

Seconds are compared side by side (:func:`side_by_side`): every network of a comparison on every engine and
precision it can run in — torch f32 (nnU-Net's own path), the CPU engine in f32, the engine in INT8 where the
network carries an INT8 model — timed in one process, round-robin, so that load on a shared machine hits every
variant alike. A compressed model on the engine is then compared with its base on the *same* engine and precision
as well as with the base on torch, and the engine's own gain is never printed as the compression's.

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
from typing import Callable

import torch
from torch import nn

from nnunet_compress.costs import count_flops, count_parameters, leaf_modules
from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.settings import from_environment, plain_inference

TORCH_F32, ENGINE_F32, ENGINE_INT8 = "torch f32", "engine f32", "engine int8"


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


# ---- side-by-side timing on several engines and precisions -------------------------------------------------------


def _on_torch(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def forward(x):
        with plain_inference():
            return net(x)
    return forward


def _on_engine(net: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    return lambda x: openvino_engine.run(net, x, precision)


def variants(net: nn.Module, engine: bool = True) -> dict[str, Callable[[torch.Tensor], torch.Tensor | None]]:
    """How `net` can run on the CPU: torch f32 always; the engine in f32, and in INT8 where it carries a model."""
    out = {TORCH_F32: _on_torch(net)}
    if engine and openvino_engine.available():
        out[ENGINE_F32] = _on_engine(net, "f32")
        if openvino_engine.int8_payload(net) is not None:
            out[ENGINE_INT8] = _on_engine(net, "int8")
    return out


def running_variant(net: nn.Module) -> str:
    """The variant nnU-Net's predictor runs `net` in on this machine's CPU, with the settings in force."""
    settings = from_environment()
    if not hasattr(net, "engine_int8") or settings.engine != "openvino" or not openvino_engine.available():
        return TORCH_F32  # nnU-Net's own classes, or the engine switched off
    if settings.wants_int8 and openvino_engine.int8_payload(net) is not None:
        return ENGINE_INT8
    return ENGINE_F32


def side_by_side(timed: dict[str, Callable[[torch.Tensor], torch.Tensor | None]], x: torch.Tensor, runs: int = 5,
                 warmup: int = 1) -> dict[str, float | None]:
    """Median seconds of each callable on `x`, timed round-robin in one process (None where the engine declined).

    Round-robin rather than one after the other: on a shared machine a burst of load then slows every variant's
    run of that round, not all runs of one variant, and the ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in timed}
    declined: set[str] = set()
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name, forward in timed.items():
                if name in declined:
                    continue
                start = time.perf_counter()
                out = forward(x)
                elapsed = time.perf_counter() - start
                if out is None:
                    declined.add(name)
                elif i >= warmup:
                    times[name].append(elapsed)
    return {name: (statistics.median(t) if t and name not in declined else None) for name, t in times.items()}


def speedup(reference: float | None, seconds: float | None) -> float | None:
    return reference / seconds if reference and seconds else None
