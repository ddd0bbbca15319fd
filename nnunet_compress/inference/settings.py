"""The CPU engine's settings, read from the environment.

Why environment variables and not flags: the engine runs inside nnU-Net's predictor (``nnUNetv2_predict``,
``nnUNetv2_predict_from_modelfolder``) and inside TotalSegmentator, whose command lines we do not own. An
environment variable reaches all of them, and their worker processes, unchanged.

* ``NNUNET_COMPRESS_CPU_ENGINE``: ``openvino`` (default) or ``torch``.
* ``NNUNET_COMPRESS_CPU_PRECISION``: ``auto`` (default) runs a model folder's INT8 model where it has one
  (``nnunet-compress quantize``) and f32 otherwise; ``f32`` runs every folder in f32, INT8 folders included (to
  compare the two); ``int8`` is ``auto`` said explicitly; ``bf16`` or ``f16`` run the f32 model at OpenVINO's
  reduced inference precision. OpenVINO would otherwise pick bf16 by itself on CPUs that have it; we keep f32 so
  that a model predicts what the torch path predicts unless the user asks for less exact arithmetic.
* ``NNUNET_COMPRESS_CACHE_DIR``: where converted models are kept (default ``$XDG_CACHE_HOME/nnunet_compress``,
  i.e. ``~/.cache/nnunet_compress``). Never a model folder: those stay read-only.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.settings import Settings

ENGINES = ("openvino", "torch")
PRECISIONS = ("auto", "f32", "int8", "bf16", "f16")
ENGINE_VARIABLE = "NNUNET_COMPRESS_CPU_ENGINE"
PRECISION_VARIABLE = "NNUNET_COMPRESS_CPU_PRECISION"
CACHE_VARIABLE = "NNUNET_COMPRESS_CACHE_DIR"


@dataclass(frozen=True)
class EngineSettings(Settings):
    """The CPU engine in force, from the environment (see :func:`from_environment`)."""

    label = "CPU engine"

    engine: str = "openvino"
    precision: str = "auto"
    cache_dir: Path | None = None

    def validate(self) -> "EngineSettings":
        if self.engine not in ENGINES:
            raise CompressError(f"{ENGINE_VARIABLE}={self.engine!r} is not an engine; use one of "
                                f"{', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise CompressError(f"{PRECISION_VARIABLE}={self.precision!r} is not a precision; use one of "
                                f"{', '.join(PRECISIONS)} (auto: a folder's INT8 model where it has one; f32 "
                                f"reproduces the torch path)")
        return self

    @property
    def wants_int8(self) -> bool:
        """Whether a folder's INT8 model, where it has one, is the one to run."""
        return self.precision in ("auto", "int8")

    @property
    def float_precision(self) -> str:
        """OpenVINO's inference precision hint for float models (and the float parts of INT8 ones)."""
        return "f32" if self.precision in ("auto", "int8") else self.precision


def compile_properties(threads: int, precision: str = "f32") -> dict:
    """The CPU plugin's properties for every model the engine compiles (f32 folders, INT8 folders, timing references):
    torch's thread count, latency over throughput (one patch at a time), and the float precision in force."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnunet_compress"


def from_environment() -> EngineSettings:
    """The settings in force now (read at every call, so a test or a user can change them in-process)."""
    cache = os.environ.get(CACHE_VARIABLE)
    return EngineSettings(engine=os.environ.get(ENGINE_VARIABLE, "openvino").strip().lower(),
                          precision=os.environ.get(PRECISION_VARIABLE, "auto").strip().lower(),
                          cache_dir=Path(cache) if cache else default_cache_dir()).validate()


# ---- switches of the torch fallback (inference/torch_paths.py), process-wide, and the per-thread "plain" switch --


@dataclass
class FastOptions:
    """Process-wide switches (both on by default; measured to help on the CPU, see README, "Performance")."""

    pointwise_gemm: bool = True  # 1×1(×1) convolutions as one matrix product
    force_onednn: bool = True  # all other float32 CPU convolutions through oneDNN, bypassing torch's size heuristic
    keep_freed_memory: bool = True  # reuse freed feature-map memory within a forward (see freed_memory.py)

OPTIONS = FastOptions()

_local = threading.local()


@contextlib.contextmanager
def plain_inference():
    """Run the enclosed code on torch's plain paths in this thread (for comparisons and tests)."""
    previous = getattr(_local, "plain", False)
    _local.plain = True
    try:
        yield
    finally:
        _local.plain = previous


def plain_requested() -> bool:
    """Whether this thread is inside :func:`plain_inference` (which also keeps the CPU engine off)."""
    return getattr(_local, "plain", False)
