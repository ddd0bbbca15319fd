"""Seconds of one convolution, and of one whole network patch, on the CPU engine that will run them.

Why measure at all: FLOPs are not what a user buys. A 1×1 factor at 128³ moves more bytes than it computes and a
3×3×3 core with 8 channels runs at a fraction of the engine's peak, so two allocations with the same FLOPs can
differ by 2× in time (issue: ``--target-flops 0.11`` cut FLOPs 9× but a patch only 2.8×). The latency budget
(:mod:`.latency_model`) therefore asks the engine itself.

How one convolution is timed:

* **OpenVINO**: a one-node model (Parameter → Convolution / ConvolutionBackpropData with constant weights) built
  with OpenVINO's opset — milliseconds to build and compile, where tracing a torch module through the PyTorch
  frontend takes a second — compiled as :mod:`nnunet_compress.inference.openvino_engine` compiles networks (threads, LATENCY, f32), and
  timed with the plugin's own per-node counters (``PERF_COUNT``): only the convolution node's ``real_time``
  counts, not the layout reorders at the model's edges that a one-node model adds and a whole network does not.
* **torch**: the convolution module under :func:`nnunet_compress.inference.torch_paths.fast_convolutions` (what the torch path of
  ``CompressedUNet`` runs), wall time.

Each is the median of a few runs after one warm-up. :func:`patch_seconds` times whole networks the way
nnU-Net's predictor calls them (eval, no autograd, one patch), interleaved so that load on a shared machine hits
every network alike.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Sequence

import torch
from torch import nn

from nnunet_compress.budgets.cost_model import ConvSite
from nnunet_compress.errors import first_line
from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.settings import compile_properties, from_environment
from nnunet_compress.inference.torch_paths import fast_convolutions

ENGINES = ("openvino", "torch")
# OpenVINO's node types that a convolution becomes after the CPU plugin's fusions
_OPENVINO_CONV_TYPES = ("Convolution", "ConvolutionBackpropData", "Deconvolution", "FullyConnected")


def engine_in_use() -> str:
    """The engine nnU-Net's predictor would use for a compressed network here: OpenVINO unless it is switched
    off (``NNUNET_COMPRESS_CPU_ENGINE=torch``) or not installed."""
    if from_environment().engine == "openvino" and openvino_engine.available():
        return "openvino"
    return "torch"


def engine_version(engine: str) -> str:
    if engine == "openvino":
        import openvino as ov
        return f"openvino {ov.__version__}"
    return f"torch {torch.__version__}"


def time_conv(site: ConvSite, c_in: int, c_out: int, engine: str, threads: int, runs: int = 3) -> float:
    """Median seconds of one forward of the convolution at `site` with these channel counts, batch 1."""
    if engine == "openvino":
        return _time_openvino(site, c_in, c_out, threads, runs)
    if engine == "torch":
        return _time_torch(site, c_in, c_out, threads, runs)
    raise ValueError(f"unknown engine {engine!r}")


def _time_torch(site: ConvSite, c_in: int, c_out: int, threads: int, runs: int) -> float:
    conv = site.module(c_in, c_out).eval()
    x = torch.randn((1, c_in, *site.in_spatial))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), fast_convolutions(x):
            conv(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def _time_openvino(site: ConvSite, c_in: int, c_out: int, threads: int, runs: int) -> float:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    generator = np.random.default_rng(0)
    x = ops.parameter([1, c_in, *site.in_spatial], ov.Type.f32)
    dims = len(site.kernel)
    strides, pads, dilations = list(site.stride), list(site.padding), [1] * dims
    if site.transposed:  # OpenVINO's weight layout for transposed convs is (in, out, *k), torch's too
        weight = generator.standard_normal((c_in, c_out, *site.kernel), dtype=np.float32)
        node = ops.convolution_backprop_data(x, ops.constant(weight), strides, pads, pads, dilations)
    else:
        weight = generator.standard_normal((c_out, c_in, *site.kernel), dtype=np.float32)
        node = ops.convolution(x, ops.constant(weight), strides, pads, pads, dilations)
    model = ov.Model([node], [x], "conv")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    data = generator.standard_normal((1, c_in, *site.in_spatial), dtype=np.float32)
    request.infer({0: data})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer({0: data})
        wall = time.perf_counter() - t0
        conv = sum(node.real_time.total_seconds() for node in request.profiling_info
                   if node.status == node.Status.EXECUTED and node.node_type in _OPENVINO_CONV_TYPES)
        times.append(conv if conv > 0 else wall)  # no counter for the node (a plugin change): the wall time
    return statistics.median(times)


@torch.no_grad()
def patch_seconds(nets: Sequence[nn.Module], input_shape: Sequence[int], engine: str, threads: int | None = None,
                  runs: int = 3, min_seconds: float = 1.0, prepared: dict | None = None) -> list[float]:
    """Median seconds per patch of each network, measured interleaved (a, b, c, a, b, c, ...) after a warm-up;
    at least `runs` runs, more for fast networks (until each has run about `min_seconds`).

    Each network runs as nnU-Net's predictor runs it: eval mode, deep supervision off, no autograd, batch 1 of
    `input_shape` (channels first, no batch dimension). On OpenVINO each network is converted and compiled here;
    `prepared` (id(net) -> callable, filled in by this function) lets a caller that times the same network again
    (the original, against every candidate of a budget search) skip its conversion. A network the engine cannot
    take runs on torch.
    """
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn((1, *input_shape))
    states = [_prediction_mode(net) for net in nets]
    prepared = {} if prepared is None else prepared
    try:
        calls = []
        for net in nets:
            key = (id(net), tuple(input_shape), engine, threads)
            if key not in prepared:
                prepared[key] = _forward_on(net, engine, x, threads)
            calls.append(prepared[key])
        warm = []
        for call in calls:
            call(x)
            t0 = time.perf_counter()
            call(x)
            warm.append(time.perf_counter() - t0)
        # small networks run in milliseconds, where the spread of single runs is tens of percent: repeat until each
        # network has run about `min_seconds` (at most 100 runs)
        runs = max(runs, min(100, math.ceil(min_seconds / max(min(warm), 1e-6))))
        times: list[list[float]] = [[] for _ in nets]
        for _ in range(runs):
            for i, call in enumerate(calls):
                t0 = time.perf_counter()
                call(x)
                times[i].append(time.perf_counter() - t0)
    finally:
        for net, state in zip(nets, states):
            _restore_mode(net, state)
        torch.set_num_threads(previous)
    return [statistics.median(t) for t in times]


def _forward_on(net: nn.Module, engine: str, x: torch.Tensor, threads: int):
    """A callable running `net` on `engine`. OpenVINO: converted and compiled here, not through the engine's disk
    cache (the candidates a budget search times are throwaway networks, and a 1.5 mm TotalSegmentator network is
    120 MB). torch: the torch path of CompressedUNet (fast convolutions), whatever the network's class."""
    if engine == "openvino":
        compiled = _compile_openvino(net, x, threads)
        if compiled is not None:
            return compiled.infer

    def call_torch(inputs):
        with fast_convolutions(inputs):
            if hasattr(net, "encoder") and hasattr(net, "decoder"):
                return net.decoder(net.encoder(inputs))  # never CompressedUNet's engine dispatch
            return net(inputs)
    return call_torch


def _compile_openvino(net: nn.Module, x: torch.Tensor, threads: int):
    import openvino as ov
    try:
        model = openvino_engine.convert(net, x)
        compiled = ov.Core().compile_model(model, "CPU", compile_properties(threads))
    except Exception as e:  # what the engine cannot take runs on torch, as in prediction
        print(f"nnunet-compress: OpenVINO cannot run {type(net).__name__} ({first_line(e)}); timing torch's path",
              file=sys.stderr)
        return None
    return openvino_engine.CompiledModel(compiled)


def _prediction_mode(net: nn.Module) -> tuple[bool, bool | None]:
    decoder = getattr(net, "decoder", None)
    deep = getattr(decoder, "deep_supervision", None)
    if deep is not None:
        decoder.deep_supervision = False
    was_training = net.training
    net.eval()
    return was_training, deep


def _restore_mode(net: nn.Module, state: tuple[bool, bool | None]) -> None:
    was_training, deep = state
    net.train(was_training)
    if deep is not None:
        net.decoder.deep_supervision = deep
