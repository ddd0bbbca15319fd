"""Converted models on disk, keyed by what they were converted from: architecture, weights and input shape.

Why a disk cache: converting a TotalSegmentator-sized network with OpenVINO's PyTorch frontend takes tens of
seconds (it traces the network), compiling the converted model takes well under one. With the converted model
kept on disk, the second CT — and every later run, in any process — starts at once. The key is a digest of

* the architecture: the module tree as torch prints it (layer types, channels, kernels, strides, norms) and every
  state-dict name with its shape and dtype;
* the weights: every parameter's and buffer's bytes (so fold 1 never reuses fold 0's model, and re-trained
  weights never reuse stale ones);
* the input shape and the engine's version.

Hashing 31 M float32 weights takes about 0.2 s, far below a conversion; it is done once per weights version (see
:func:`weights_signature`). Entries are written to a temporary sibling and renamed into place, so a killed run
never leaves a half-written model that a later run would read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def state_tensors(net: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in net.state_dict(keep_vars=True).items()]


def weights_signature(net: nn.Module) -> tuple:
    """A cheap identity of the weights as they are now: storage address and in-place version of each tensor.

    ``load_state_dict`` copies into the parameters in place (bumping ``_version``) and pruning replaces them (a new
    address), so any change of the weights changes the signature; computing it costs microseconds, unlike hashing.
    """
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in state_tensors(net))


def architecture_description(net: nn.Module) -> str:
    """Module tree with each layer's settings.

    Leaf modules print their settings (channels, kernel, stride, eps, slope); containers print their class, which
    fixes how children connect (encoder, decoder with skips, stacked blocks).
    """
    lines = []
    for name, m in net.named_modules():
        cls = f"{type(m).__module__}.{type(m).__qualname__}"
        lines.append(f"{name}:{cls}:{m.extra_repr() if not list(m.children()) else ''}")
    return "\n".join(lines)


def model_key(net: nn.Module, input_shape: tuple[int, ...], engine_version: str) -> str:
    """The cache key: digest of architecture, weights, input shape and engine version (hex, 32 characters)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(engine_version.encode())
    h.update(repr(tuple(input_shape)).encode())
    h.update(architecture_description(net).encode())
    for name, t in net.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        data = t.detach().cpu().contiguous()
        if data.numel():
            h.update(data.view(torch.uint8).numpy() if data.dtype != torch.bool else data.numpy().tobytes())
    return h.hexdigest()


class ModelCache:
    """A folder of converted models, one sub-folder per key."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str, filename: str) -> Path | None:
        path = self.entry(key) / filename
        return path if path.is_file() else None

    def store(self, key: str, write: Callable[[Path], None]) -> Path:
        """Write an entry through ``write(tmp_folder)`` and rename it into place; returns the entry folder.

        If another process stored the same key meanwhile, its entry is kept and ours is dropped (same content).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.partial-{os.getpid()}-", dir=self.root))
        try:
            write(tmp)
            try:
                os.rename(tmp, self.entry(key))
            except OSError:
                if not self.entry(key).is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.entry(key)

    def remove(self, key: str) -> None:
        shutil.rmtree(self.entry(key), ignore_errors=True)
