"""OpenVINO as the CPU engine of nnU-Net networks, behind an ordinary ``forward`` call.

Why OpenVINO: measured side by side (docs/performance.md), it runs TotalSegmentator's original 1.5 mm network
about 2× faster than torch on the CPU, and the Tucker-compressed one faster than the torch paths of
:mod:`.torch_paths`. It fuses convolution, InstanceNorm and LeakyReLU into few passes over memory and picks kernels
per layer shape, for every layer, where the torch paths fuse the factorised layers only.

How: :func:`run` converts the network with OpenVINO's PyTorch frontend (it traces torch's plain forward pass, so
the graph is the module's computation; the decoder's concatenations are folded away first, an exact rewrite that
:mod:`.decoder_fold` explains), saves the converted model in the user's cache
(:mod:`.model_cache`), compiles it for the CPU with ``INFERENCE_NUM_THREADS`` = torch's thread count,
``PERFORMANCE_HINT`` = LATENCY and the precision of :mod:`.settings` (f32 by default), and keeps the compiled model
in memory for the identical patches of nnU-Net's sliding window. Input and output are copied into and out of the
engine's own buffers (faster than sharing memory: :class:`CompiledModel`). A network or input the engine cannot
take (conversion or compilation error) is remembered and runs on torch, with one warning line on stderr: the
engine never makes a prediction fail.

:func:`applies` says when the engine is used at all: CPU float32 input, no autograd (training and gradient-based
scoring stay on torch), the module in eval mode with one output (deep supervision off), not inside torch.compile,
a TorchScript trace or a dispatch mode such as FlopCounterMode (which must see torch's own ops), and not inside
:func:`nnunet_compress.inference.settings.plain_inference`.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.inference import int8
from nnunet_compress.inference.decoder_fold import GRAPH_VERSION, engine_graph
from nnunet_compress.inference.model_cache import ModelCache, model_key, weights_signature
from nnunet_compress.inference.settings import (
    EngineSettings,
    compile_properties,
    from_environment,
    plain_inference,
    plain_requested,
)

MODEL_FILE = "model.xml"
MAX_COMPILED = 2  # compiled models kept in memory, least recently used dropped (each holds its own buffers)


@dataclass
class EngineStats:
    """What the engine did in this process (for benchmarks, tests and the curious)."""

    conversions: list[float] = field(default_factory=list)  # seconds per conversion (trace + save)
    cache_loads: list[float] = field(default_factory=list)  # seconds per read of a cached converted model
    compilations: list[float] = field(default_factory=list)  # seconds per compile_model
    inferences: int = 0
    fallbacks: list[str] = field(default_factory=list)  # one message per network/input the engine could not take


STATS = EngineStats()
_lock = threading.RLock()
_signature_to_key: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_compiled: "OrderedDict[tuple, CompiledModel]" = OrderedDict()
_failed: set[tuple] = set()
_int8_failed: set[str] = set()  # keys whose INT8 model could not be used (their f32 model runs)
_local = threading.local()


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def applies(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether a forward pass of `net` on `x` goes to the engine (see the module docstring for why each test)."""
    if getattr(_local, "converting", False) or net.training:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() not in (4, 5):
        return False
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    decoder = getattr(net, "decoder", None)
    if getattr(decoder, "deep_supervision", False):
        return False
    if plain_requested():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    if _get_current_dispatch_mode_stack():
        return False
    return from_environment().engine == "openvino"


def run(net: nn.Module, x: torch.Tensor, precision: str | None = None) -> torch.Tensor | None:
    """``net(x)`` computed by OpenVINO, or None where the engine cannot take it (then run torch's path).

    A network that carries an INT8 model (:func:`int8_payload`) runs it unless the settings ask for f32; an INT8
    model that cannot be read or compiled runs in f32 instead, with one warning. `precision` overrides the
    environment's (side-by-side timings run one network at several precisions in one process).
    """
    settings = from_environment()
    if precision is not None:
        settings = dataclasses.replace(settings, precision=precision).validate()
    threads = torch.get_num_threads()
    shape = tuple(x.shape)
    with _lock:
        per_net = _signature_to_key.setdefault(net, {})
        signature = (weights_signature(net), shape)
        if signature not in per_net:
            if len(per_net) > MAX_COMPILED:
                per_net.clear()
            per_net[signature] = model_key(net, shape, _engine_version())
        key = per_net[signature]
        if (key, shape) in _failed:
            return None
        compiled, compiled_key = None, None
        payload = int8_payload(net) if settings.wants_int8 and key not in _int8_failed else None
        if payload is not None:
            compiled_key = (key, threads, "int8")
            compiled = _compiled.get(compiled_key) or _prepare_int8(net, payload, shape, key, threads, settings)
        if compiled is None:
            compiled_key = (key, threads, settings.float_precision)
            compiled = _compiled.get(compiled_key) or _prepare(net, x, key, threads, settings)
        if compiled is None:
            _failed.add((key, shape))
            return None
        _compiled[compiled_key] = compiled
        _compiled.move_to_end(compiled_key)
        while len(_compiled) > MAX_COMPILED:
            _compiled.popitem(last=False)
    try:
        out = compiled.infer(x)
    except Exception as e:  # an engine error must not fail the prediction: torch can still compute it
        _fallback(net, shape, f"inference failed ({first_line(e, with_type=True)})")
        with _lock:
            _failed.add((key, shape))
            _compiled.pop(compiled_key, None)
        return None
    STATS.inferences += 1
    return out


def int8_payload(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The INT8 model a network carries in its state dict (:mod:`.int8`), or None."""
    xml, weights = (getattr(net, key, None) for key in int8.PAYLOAD_KEYS)
    if xml is None or weights is None or not xml.numel():
        return None
    return xml, weights


_notified: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def int8_notice(net: nn.Module, x: torch.Tensor) -> None:
    """One line per network where its INT8 model cannot run (CUDA, the torch engine): its f32 weights run instead.

    Quiet where the engine is skipped on purpose (training is refused elsewhere; autograd, tracing, FLOP counting
    and plain_inference want torch's own ops).
    """
    if net in _notified or torch.is_grad_enabled() or torch.jit.is_tracing() or plain_requested():
        return
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    if _get_current_dispatch_mode_stack():
        return
    where = "CUDA" if x.device.type == "cuda" else f"the {from_environment().engine} engine"
    _notified.add(net)
    print(f"nnunet-compress: this model's INT8 weights run on OpenVINO's CPU engine only; running its f32 weights on "
          f"{where}", file=sys.stderr)


def _prepare_int8(net: nn.Module, payload, shape: tuple[int, ...], key: str, threads: int,
                  settings: EngineSettings) -> CompiledModel | None:
    """The network's INT8 model compiled for `shape`; None (after one warning) where it cannot be read or run."""
    try:
        import openvino as ov
        core = ov.Core()
        model = int8.deserialize(core, payload[0].numpy(), payload[1].numpy())
        if tuple(model.input(0).get_partial_shape().to_shape()) != shape:
            model.reshape(list(shape))  # quantised at the plans' patch size; other inputs take the same weights
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", compile_properties(threads, settings.float_precision))
        STATS.compilations.append(time.perf_counter() - t0)
        return CompiledModel(compiled)
    except Exception as e:  # a damaged or foreign INT8 model must not fail the prediction: f32 can compute it
        _int8_failed.add(key)
        message = (f"nnunet-compress: the INT8 model of this {type(net).__name__} cannot be used "
                   f"({first_line(e, with_type=True)}); running its f32 weights on the engine instead (quantise the "
                   "parent folder again with this version of OpenVINO)")
        STATS.fallbacks.append(message)
        print(message, file=sys.stderr)
        return None


class CompiledModel:
    """A compiled model with its own infer request.

    The input is copied into the request's own tensor and the output copied out of it, although both could share
    memory with torch tensors. Measured (TotalSegmentator's 3 mm network, Tucker 0.25, 2 threads, 9 interleaved
    runs), the copies made a patch 1.2× faster: with shared memory the engine's last node, a layout reorder of the
    whole logits map, writes straight into a fresh output tensor and pays a page fault for every page of it inside
    a strided kernel, while the request's own output buffer is reused from call to call and a plain copy out of it
    faults far more cheaply. Copying also means the returned tensor never aliases the engine's buffers.
    """

    def __init__(self, compiled_model):
        self.model = compiled_model
        self.request = compiled_model.create_infer_request()
        self.lock = threading.Lock()

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        with self.lock:
            result = self.request.infer({0: x.numpy()}, share_inputs=False, share_outputs=False)
            out = result[0]
        return torch.from_numpy(out)


def _prepare(net: nn.Module, x: torch.Tensor, key: str, threads: int, settings: EngineSettings) -> CompiledModel | None:
    """Converted model from the cache (converting it first if absent), compiled; None after a failure."""
    try:
        import openvino as ov
    except ImportError:
        _fallback(net, tuple(x.shape), "OpenVINO is not installed (pip install openvino, or set "
                                       "NNUNET_COMPRESS_CPU_ENGINE=torch)")
        return None
    core = ov.Core()
    try:
        model = _cached_or_converted(core, net, x, key, settings)
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", compile_properties(threads, settings.float_precision))
        STATS.compilations.append(time.perf_counter() - t0)
        return CompiledModel(compiled)
    except Exception as e:  # conversion/compilation of an unsupported network: torch runs it instead
        _fallback(net, tuple(x.shape), first_line(e, with_type=True))
        return None


def _cached_or_converted(core, net: nn.Module, x: torch.Tensor, key: str, settings: EngineSettings):
    import openvino as ov
    cache = ModelCache(settings.cache_dir / "openvino") if settings.cache_dir else None
    if cache is not None:
        path = cache.lookup(key, MODEL_FILE)
        if path is not None:
            t0 = time.perf_counter()
            try:
                model = core.read_model(str(path))
                STATS.cache_loads.append(time.perf_counter() - t0)
                return model
            except Exception as e:  # a damaged entry is rebuilt, never trusted
                print(f"nnunet-compress: the cached OpenVINO model {path.parent} is unreadable "
                      f"({first_line(e, with_type=True)}); converting again", file=sys.stderr)
                cache.remove(key)
    t0 = time.perf_counter()
    converted = convert(net, x)
    if cache is None:
        STATS.conversions.append(time.perf_counter() - t0)
        return converted
    try:
        entry = cache.store(key, lambda tmp: ov.save_model(converted, str(tmp / MODEL_FILE), compress_to_fp16=False))
    except OSError as e:
        print(f"nnunet-compress: cannot write the OpenVINO cache in {cache.root} ({e.strerror or e}); the "
              f"conversion is kept in memory only (set NNUNET_COMPRESS_CACHE_DIR to a writable folder)",
              file=sys.stderr)
        STATS.conversions.append(time.perf_counter() - t0)
        return converted
    elapsed = time.perf_counter() - t0
    STATS.conversions.append(elapsed)
    print(f"nnunet-compress: converted the network for OpenVINO (input {'x'.join(map(str, x.shape))}) in "
          f"{elapsed:.0f} s; cached in {entry}", file=sys.stderr)
    # read back from disk: the compiled model then owns its weights (the converted one shares torch's memory,
    # which the next fold's load_state_dict would overwrite)
    return core.read_model(str(entry / MODEL_FILE))


def int8_reference(net: nn.Module, calibration: list[torch.Tensor]):
    """`net` quantised in memory by NNCF (no accuracy control) and compiled as the engine compiles its models.

    A timing reference, never a model to predict with: it lets a compressed INT8 model be compared with its
    original in INT8 on the same engine when the original carries no INT8 model. Nothing is written anywhere.
    Returns a callable ``x -> logits`` (None where the engine cannot take the network).
    """
    import openvino as ov
    shape = tuple(calibration[0].shape)
    try:
        with plain_inference():
            model = convert(net.eval(), torch.zeros(shape))
        quantised = int8.quantize(model, [c.numpy() for c in calibration], None, [], max_drop=None).model
        compiled = ov.Core().compile_model(quantised, "CPU", compile_properties(torch.get_num_threads()))
    except Exception as e:  # the frontend's and NNCF's errors have many types; the caller goes without the row
        _fallback(net, shape, f"INT8 reference failed ({first_line(e, with_type=True)})")
        return None
    return CompiledModel(compiled).infer


def fill_cache(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[Path, float | None]:
    """Convert `net` for inputs of `input_shape` into the disk cache now, unless it is there already.

    Why: the first prediction of a model otherwise pays the conversion (7-17 s per TotalSegmentator 1.5 mm part
    network) inside the user's first run; done when a model folder or home is written, every run starts at once.
    The key is the one :func:`run` computes, so the predictor finds the entry. Returns (cache entry, seconds spent
    converting, or None where the entry existed). Raises CompressError where the engine cannot take the network.
    """
    settings = from_environment()
    if not available():
        raise CompressError("OpenVINO is not installed, so there is no engine cache to fill (pip install openvino)")
    if settings.cache_dir is None:
        raise CompressError("no engine cache directory is set; set NNUNET_COMPRESS_CACHE_DIR to a writable folder")
    import openvino as ov
    key = model_key(net, tuple(input_shape), _engine_version())
    cache = ModelCache(settings.cache_dir / "openvino")
    existing = cache.lookup(key, MODEL_FILE)
    if existing is not None:
        return existing.parent, None
    t0 = time.perf_counter()
    try:
        converted = convert(net, torch.zeros(input_shape))
        entry = cache.store(key, lambda tmp: ov.save_model(converted, str(tmp / MODEL_FILE), compress_to_fp16=False))
    except OSError as e:
        raise CompressError(f"cannot write the engine cache in {cache.root} ({e.strerror or e}); set "
                            "NNUNET_COMPRESS_CACHE_DIR to a writable folder") from None
    except Exception as e:  # the frontend's errors have many types; at run time torch would take over
        raise CompressError(f"OpenVINO cannot convert {type(net).__name__} for input "
                            f"{'x'.join(map(str, input_shape))} ({first_line(e, with_type=True)}); predictions "
                            "will run on torch's CPU path") from None
    elapsed = time.perf_counter() - t0
    STATS.conversions.append(elapsed)
    return entry, elapsed


def convert(net: nn.Module, x: torch.Tensor):
    """OpenVINO model of ``net``'s plain torch forward pass at x's shape (traced; warnings of the tracer muted),
    with the decoder's concatenations folded away where the network is factorised (:mod:`.decoder_fold`).

    The input shape is fixed (static): the sliding window feeds one patch size, and static shapes let the CPU
    plugin choose kernels and memory layout once, at compile time.
    """
    import openvino as ov
    _local.converting = True
    try:
        example = torch.zeros_like(x)
        with plain_inference(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # traced here rather than by the frontend, to skip torch's re-trace check (a third of the time)
            traced = torch.jit.trace(engine_graph(net), example, check_trace=False)
            return ov.convert_model(traced, example_input=example, input=[tuple(x.shape)], share_weights=False)
    finally:
        _local.converting = False


def _fallback(net: nn.Module, shape: tuple[int, ...], reason: str) -> None:
    message = (f"nnunet-compress: OpenVINO cannot run {type(net).__name__} on input {'x'.join(map(str, shape))} "
               f"({reason}); using torch's CPU path")
    STATS.fallbacks.append(message)
    print(message, file=sys.stderr)


def _engine_version() -> str:
    try:
        import openvino as ov
        return f"openvino {ov.__version__}, {GRAPH_VERSION}"
    except ImportError:
        return "openvino absent"


def forget(net: nn.Module) -> None:
    """Drop what the engine knows about `net`'s current weights (called when new weights are loaded into it)."""
    with _lock:
        _signature_to_key.pop(net, None)


def clear() -> None:
    """Forget compiled models and failures of this process (tests; the disk cache stays)."""
    with _lock:
        _compiled.clear()
        _failed.clear()
        _int8_failed.clear()
        _signature_to_key.clear()
