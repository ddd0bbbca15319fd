"""The measured cost model of this machine: per-site fits (:mod:`.cost_model`) grown by timing the CPU engine
(:mod:`.timing`), and their cache.

The model is kept per machine, engine (and its version) and thread count in the user's cache directory
(``$NNUNET_COMPRESS_CACHE_DIR/latency``, next to the converted models), grown by the sites a new network needs. A
cache file that cannot be read, or that was measured elsewhere, is rebuilt with one notice line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch import nn

from nnunet_compress.budgets.cost_model import ChannelRange, ConvSite, SiteFit
from nnunet_compress.budgets.timing import engine_version, time_conv
from nnunet_compress.inference.settings import from_environment

FORMAT = 1


def machine_id() -> str:
    """What makes timings of one machine invalid on another: CPU model, core count, architecture."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cpus | {platform.machine()}"


@dataclass
class LatencyModel:
    """Fitted per-site models of one machine, engine and thread count."""

    engine: str
    engine_version: str
    machine: str
    threads: int
    sites: dict[str, SiteFit] = field(default_factory=dict)
    kind = "measured"

    def conv_seconds(self, site: ConvSite, c_in: int, c_out: int) -> float:
        fit = self.sites.get(site.key())
        if fit is None:
            raise KeyError(f"no timings for {site.key()}; measure it first (LatencyModel.ensure)")
        return fit.seconds(c_in, c_out)

    def layer_seconds(self, conv: nn.Module, in_spatial: Sequence[int], out_spatial: Sequence[int],
                      ranks: tuple[int, int] | None = None, channels: tuple[int, int] | None = None) -> float:
        """Seconds of `conv` (ranks None) or of its Tucker factorisation with ranks (out, in); `channels`
        (c_in, c_out) overrides the conv's own counts (a pruned layer)."""
        c_in, c_out = channels or (conv.in_channels, conv.out_channels)
        site = ConvSite.of(conv, in_spatial)
        if ranks is None:
            return self.conv_seconds(site, c_in, c_out)
        rank_out, rank_in = ranks
        return (self.conv_seconds(ConvSite.pointwise(in_spatial), c_in, rank_in)
                + self.conv_seconds(site, rank_in, rank_out)
                + self.conv_seconds(ConvSite.pointwise(out_spatial), rank_out, c_out))

    def ensure(self, needed: Mapping[ConvSite, ChannelRange], progress: Callable[[str], None] | None = None) -> int:
        """Time the grid points of `needed` not sampled yet and refit those sites; returns how many were timed."""
        todo = []
        for site, wanted in needed.items():
            fit = self.sites.setdefault(site.key(), SiteFit())
            missing = [p for p in wanted.points() if p not in fit.sampled()]
            todo += [(site, fit, p) for p in missing]
        if todo and progress:
            progress(f"timing {len(todo)} convolutions on {self.engine} ({self.threads} threads) for the latency "
                     f"model of this machine")
        touched = set()
        for site, fit, (c_in, c_out) in todo:
            fit.samples.append((c_in, c_out, time_conv(site, c_in, c_out, self.engine, self.threads)))
            touched.add(site.key())
        for key in touched:
            self.sites[key].refit()
        return len(todo)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "engine": self.engine, "engine_version": self.engine_version,
                "machine": self.machine, "threads": self.threads,
                "sites": {k: {"samples": [list(s) for s in f.samples], "coefficients": list(f.coefficients)}
                          for k, f in self.sites.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
        sites = {}
        for key, entry in d["sites"].items():
            ConvSite.from_key(key)  # a key that does not parse makes the whole file suspect
            samples = [(int(ci), int(co), float(s)) for ci, co, s in entry["samples"]]
            coefficients = tuple(float(v) for v in entry["coefficients"])
            if len(coefficients) != 4 or not all(math.isfinite(v) and v >= 0 for v in coefficients) or \
                    not all(math.isfinite(s) and s >= 0 for _, _, s in samples):
                raise ValueError(f"site {key!r} has invalid coefficients or samples")
            sites[key] = SiteFit(samples, coefficients)
        return cls(str(d["engine"]), str(d["engine_version"]), str(d["machine"]), int(d["threads"]), sites)


def cache_file(cache_dir: Path, engine: str, threads: int) -> Path:
    machine = hashlib.sha256(machine_id().encode()).hexdigest()[:12]
    return Path(cache_dir) / "latency" / f"{engine}-{threads}threads-{machine}.json"


def load_latency_model(engine: str, threads: int, cache_dir: Path | None = None,
                       notice: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> LatencyModel:
    """The cached model of this machine/engine/thread count, or an empty one (rebuilt with a notice when the
    cache is unreadable or was measured on another machine or engine version)."""
    fresh = LatencyModel(engine, engine_version(engine), machine_id(), threads)
    cache_dir = cache_dir or from_environment().cache_dir
    path = cache_file(cache_dir, engine, threads)
    if not path.exists():
        return fresh
    try:
        cached = LatencyModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        notice(f"nnunet-compress: the latency cache {path} is unreadable ({e}); measuring again")
        return fresh
    if (cached.engine, cached.engine_version, cached.machine, cached.threads) != \
            (fresh.engine, fresh.engine_version, fresh.machine, fresh.threads):
        notice(f"nnunet-compress: the latency cache {path} was measured with {cached.engine_version} on "
               f"'{cached.machine}', {cached.threads} threads; this is {fresh.engine_version} on '{fresh.machine}', "
               f"{fresh.threads} threads: measuring again")
        return fresh
    return cached


def save_latency_model(model: LatencyModel, cache_dir: Path | None = None) -> Path | None:
    """Write the model atomically; an unwritable cache only costs the next run the measurements (a notice)."""
    cache_dir = cache_dir or from_environment().cache_dir
    path = cache_file(cache_dir, model.engine, model.threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(model.to_dict(), f)
        os.replace(f.name, path)
    except OSError as e:
        print(f"nnunet-compress: cannot write the latency cache {path} ({e.strerror or e}); set "
              f"NNUNET_COMPRESS_CACHE_DIR to a writable folder", file=sys.stderr)
        return None
    return path


def measured_model(needed: Mapping[ConvSite, ChannelRange], engine: str, threads: int,
                   cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> LatencyModel:
    """The cached latency model, completed with the sites in `needed` (timed now where missing) and saved."""
    model = load_latency_model(engine, threads, cache_dir, notice=progress)
    if model.ensure(needed, progress):
        save_latency_model(model, cache_dir)
    return model

