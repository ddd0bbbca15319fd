"""The CPU engines the benchmarks compare, each behind one call: ``runner(x) -> logits``.

* ``torch``: torch's plain forward pass (``plain_inference``): what nnU-Net runs for an uncompressed model.
* ``torch+paths``: this package's torch CPU paths (``NNUNET_COMPRESS_CPU_ENGINE=torch``): the fallback when
  OpenVINO is absent or cannot take a network.
* ``openvino``: the product path: ``CompressedUNet.forward`` with ``NNUNET_COMPRESS_CPU_ENGINE=openvino`` (the
  default), i.e. exactly what ``nnUNetv2_predict`` runs for a compressed or ``convert``-ed model folder.
* ``openvino-int8``: the same graph quantised to INT8 by NNCF (``openvino_engine.int8_reference``, no accuracy
  control, calibrated on two random patches: INT8 speed does not depend on the calibration values), compiled as the
  engine compiles a folder's INT8 model; what ``nnunet-compress quantize`` gives the engine.
* ``onnxruntime``: the network exported with ``torch.onnx.export`` and run by ONNX Runtime (benchmark only: a second
  well-kept engine a user might deploy; install with ``pip install -e ".[bench]"``).

Every runner is built for one input shape (the engines compile static shapes) and reports how long its
preparation took (conversion/export + compilation), so tables can show start-up costs beside steady-state times.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.settings import ENGINE_VARIABLE, plain_inference
from nnunet_compress.inference.torch_paths import fast_convolutions

ENGINES = ("torch", "torch+paths", "openvino", "openvino-int8", "onnxruntime")
INT8_CALIBRATION_PATCHES = 2


@contextlib.contextmanager
def engine_variable(value: str):
    """NNUNET_COMPRESS_CPU_ENGINE=value inside the block (the engine reads it at every forward pass)."""
    previous = os.environ.get(ENGINE_VARIABLE)
    os.environ[ENGINE_VARIABLE] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENGINE_VARIABLE, None)
        else:
            os.environ[ENGINE_VARIABLE] = previous


@dataclass
class Runner:
    """One network on one engine at one input shape."""

    engine: str
    call: Callable[[torch.Tensor], torch.Tensor]
    prepare_s: float = 0.0  # first call (conversion/export + compilation + one inference)
    details: dict = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.call(x)

    def module(self) -> nn.Module:
        """The runner as an nn.Module (nnU-Net's predictor calls ``network(x)``)."""
        return _RunnerModule(self)


class _RunnerModule(nn.Module):
    def __init__(self, runner: Runner):
        super().__init__()
        self.runner = runner

    def forward(self, x):
        return self.runner.call(x)


def make_runner(engine: str, net: nn.Module, shape: tuple[int, ...], compressed_net: nn.Module | None = None
                ) -> Runner:
    """A prepared runner. `net` is the module to run; `compressed_net` the same weights as a CompressedUNet
    (what the ``openvino`` and ``torch+paths`` engines need; defaults to `net`)."""
    product = compressed_net if compressed_net is not None else net
    x = torch.randn(shape)
    if engine == "torch":
        def call(x):
            with plain_inference():
                return net(x)
        runner = Runner(engine, call)
    elif engine == "torch+paths":
        def call(x):
            with engine_variable("torch"):
                if type(product).__name__ == "CompressedUNet":
                    return product(x)
                with fast_convolutions(x):
                    return product(x)
        runner = Runner(engine, call)
    elif engine == "openvino":
        def call(x):
            with engine_variable("openvino"):
                return product(x)
        runner = Runner(engine, call)
        before = (len(openvino_engine.STATS.conversions), len(openvino_engine.STATS.cache_loads))
    elif engine == "openvino-int8":
        t0 = time.perf_counter()
        infer = openvino_engine.int8_reference(product, [torch.randn(shape) for _ in range(INT8_CALIBRATION_PATCHES)])
        if infer is None:
            raise RuntimeError(f"OpenVINO/NNCF cannot quantise {type(product).__name__}")
        runner = Runner(engine, infer, details={"quantize_s": time.perf_counter() - t0})
    elif engine == "onnxruntime":
        runner = _onnxruntime_runner(net, shape)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    runner(x)
    runner.prepare_s = time.perf_counter() - t0 + runner.details.get("quantize_s", 0.0)
    if engine == "openvino":
        stats = openvino_engine.STATS
        if stats.fallbacks:
            raise RuntimeError(f"OpenVINO fell back to torch: {stats.fallbacks[-1]}")
        runner.details = {"conversion_s": sum(stats.conversions[before[0]:]),
                          "cache_load_s": sum(stats.cache_loads[before[1]:]),
                          "compile_s": stats.compilations[-1] if stats.compilations else None}
    return runner


def cached_start_up(runner: Runner, shape: tuple[int, ...]) -> float:
    """Seconds of the first OpenVINO call once the converted model is on disk: what the second CT, and every later
    process, pays (read the cached model + compile + one inference). Forgets this process's compiled models."""
    openvino_engine.clear()
    t0 = time.perf_counter()
    runner(torch.randn(shape))
    return time.perf_counter() - t0


def _onnxruntime_runner(net: nn.Module, shape: tuple[int, ...]) -> Runner:
    import onnxruntime as ort
    folder = Path(tempfile.mkdtemp(prefix="nnunet_compress_onnx_"))
    path = folder / "model.onnx"
    t0 = time.perf_counter()
    example = torch.zeros(shape)
    with plain_inference(), torch.no_grad():
        try:  # the TorchScript exporter converts these networks in seconds; the dynamo exporter is the fallback
            torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
        except Exception:
            torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    export_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def call(x):
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    runner = Runner("onnxruntime", call)
    runner.details = {"export_s": export_s}
    return runner
