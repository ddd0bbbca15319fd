"""torch's CPU fallback for compressed networks: same outputs, much less wall-clock time than plain torch.

CompressedUNet runs on OpenVINO on the CPU (:mod:`nnunet_compress.inference`); these paths serve where the engine
is switched off (``NNUNET_COMPRESS_CPU_ENGINE=torch``) or cannot take a network. Why they are needed: a Tucker-
factorised network does ~9× fewer FLOPs at channel ratio 0.25, yet runs only ~1.9× faster on plain torch. Profiling
shows where the time goes: torch's CPU convolution dispatch chooses oneDNN only when ``N·C·D·H > 20480`` (a
heuristic written for 2-d images that ignores the last spatial axis). Thin 3-d convolutions — a Tucker core with 16
channels at 32³, 32 at 16³ — fail it and fall onto the generic vol2col + GEMM kernel (``slow_conv3d_forward``),
which runs at 1–2 GMAC/s instead of oneDNN's 15–40; 1×1×1 convolutions pay for a generic conv path although they
are one matrix product. Pruned networks have the same thin layers. So, on the CPU and at inference time:

* every dense 1×1(×1) stride-1 convolution runs as one GEMM (``torch.addmm`` on the (C, voxels) view);
* every other float32 convolution goes straight to ``torch.mkldnn_convolution`` (oneDNN), whatever its size;
* memory freed during the forward pass is kept for the next layers instead of being unmapped and faulted in
  again (:mod:`nnunet_compress.inference.freed_memory`; glibc only, bit-identical results).

All three are applied by :func:`fast_convolutions`, a ``TorchFunctionMode`` that :class:`CompressedUNet` enters
around its forward pass; it re-routes ``conv2d``/``conv3d`` calls and leaves every other op alone. Modules,
parameters and state-dict keys are untouched, so checkpoints, nnU-Net's strict loading and training are unaffected.
All of it is off where it would not help or could not be exact: on CUDA (cuDNN has no such gap), while autograd
records (training), under another torch dispatch mode (e.g. FlopCounterMode, which must see ``aten.convolution`` to
count it) and inside torch.compile. Results differ from the plain path by float32 summation order only (~1e-6
relative). ``with plain_inference():`` switches it off, e.g. to compare. Why not ``channels_last_3d``: InstanceNorm
runs ~3× slower in it on the CPU and hands back NCDHW, so the layout cannot be kept through the network.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from nnunet_compress.costs import is_pointwise
from nnunet_compress.inference.freed_memory import keep_freed_memory
from nnunet_compress.inference.settings import OPTIONS, plain_requested


def fast_paths_apply(x: torch.Tensor) -> bool:
    """Whether :func:`fast_convolutions` would re-route convolutions for a network input `x` right now."""
    if plain_requested() or not (OPTIONS.pointwise_gemm or OPTIONS.force_onednn):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() not in (4, 5):
        return False
    if torch.is_grad_enabled():  # training or an autograd-recording evaluation: stay on the differentiable path
        return False
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return not _get_current_dispatch_mode_stack()  # FlopCounterMode & co. must see aten.convolution


@contextlib.contextmanager
def fast_convolutions(x: torch.Tensor):
    """Context manager for a forward pass on input `x`: the fast CPU paths where they apply, else nothing."""
    if not fast_paths_apply(x):
        yield
        return
    with (keep_freed_memory() if OPTIONS.keep_freed_memory else contextlib.nullcontext()), _FastConvMode():
        yield


class _FastConvMode(TorchFunctionMode):
    """Re-routes conv2d/conv3d (``F.convNd`` is ``torch.convNd``) to :func:`fast_conv`; all else passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv3d or func is torch.conv2d:
            out = fast_conv(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _tuple(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


def fast_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
              dilation=1, groups: int = 1) -> torch.Tensor | None:
    """The fast equivalent of ``F.convNd(...)``, or None where it has none (then the caller uses torch's own)."""
    if isinstance(padding, str) or input.device.type != "cpu" or input.dtype != torch.float32 \
            or weight.dtype != torch.float32 or input.dim() not in (4, 5) or input.dim() != weight.dim():
        return None
    n = input.dim() - 2
    stride, padding, dilation = _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n)
    if is_gemm(weight, stride, padding, groups) and OPTIONS.pointwise_gemm:
        return pointwise_gemm(input, weight, bias)
    if OPTIONS.force_onednn and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, padding, stride, dilation,
                                        groups)
    return None


def is_gemm(weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """Whether a convolution with these settings is one matrix product per sample: 1×1 kernel, stride 1, no padding."""
    return (groups == 1 and is_pointwise(weight.shape[2:]) and all(s == 1 for s in stride)
            and all(p == 0 for p in padding))


def pointwise_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1(×1) convolution as (out, in) @ (in, voxels), the bias fused into the GEMM (``addmm``)."""
    out_ch, in_ch = weight.shape[:2]
    w = weight.reshape(out_ch, in_ch)
    x = x.contiguous()
    batch, spatial = x.shape[0], x.shape[2:]
    flat = x.view(batch, in_ch, -1)
    outs = [torch.mm(w, flat[b]) if bias is None else torch.addmm(bias[:, None], w, flat[b]) for b in range(batch)]
    y = outs[0].unsqueeze(0) if batch == 1 else torch.stack(outs)
    return y.view(batch, out_ch, *spatial)
