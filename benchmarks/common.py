"""What several benchmarks share: where results and work files go, the device a figure was measured on, timing
rows interleaved, the deviation of logits, and nnU-Net's sliding window set up without a model folder."""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # summaries (Markdown, JSON, PNG): tracked, cited by the docs
WORK = REPO / "benchmarks" / "work"  # workspaces, homes, engine caches, logs: untracked


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() often says only 'x86_64')."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def device_name() -> str:
    """The CPU model and the threads torch runs on here."""
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def time_interleaved(rows, fn, runs, warmup=1):
    """Wall-clock and process-CPU seconds of fn(runner) per row, measured round-robin (A, B, C, A, B, C, ...)
    so that load spikes hit all rows alike. CPU time is reported too: on a shared machine it is far less
    disturbed by other processes than wall-clock time (it does not tick while we are descheduled)."""
    wall = {name: [] for name in rows}
    cpu = {name: [] for name in rows}
    for i in range(warmup + runs):
        for name, runner in rows.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(runner)
            w1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
            print(f"  {name}: {w1 - w0:.3f} s wall, {c1 - c0:.3f} s cpu", file=sys.stderr, flush=True)
    return wall, cpu


def relative_deviation(y: torch.Tensor, reference: torch.Tensor) -> float:
    """max |y − ref| / max |ref|: logits' deviation on the scale of the logits."""
    return float((y - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def make_predictor(net, patch, num_classes, device):
    """nnU-Net's predictor, initialised by hand: only what predict_sliding_window_return_logits reads."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=num_classes)
    predictor.allowed_mirroring_axes = None
    return predictor


def sliding_window_patches(volume, patch) -> int:
    """Patches nnU-Net's sliding window (step 0.5) runs; a volume smaller than the patch is padded to it first."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    padded = tuple(max(v, p) for v, p in zip(volume, patch))
    steps = compute_steps_for_sliding_window(padded, tuple(patch), 0.5)
    return math.prod(len(s) for s in steps)
