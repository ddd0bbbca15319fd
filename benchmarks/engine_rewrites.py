"""Do graph rewrites and the hand-written CPU paths pay once OpenVINO runs the network? A/B in one process, interleaved.

    python benchmarks/engine_rewrites.py [--patch 96 96 96] [--ratio 0.25] [--runs 5]

Why this script exists: before it had an engine, the package ran compressed networks through five hand-written
torch CPU modules. The engine took the plain graph faster than all of them together, so three were deleted (InstanceNorm
folded into a factorised conv's last 1×1, and activations kept factorised between layers; the README gives the
figures measured before the deletion). This script keeps the evidence for what stayed, and for the graph rewrites an
engine can take: it converts the Tucker-factorised 1.5 mm TotalSegmentator network four times — the graph the
product converts (the decoder's skip concatenations folded into the convolutions around them,
:mod:`nnunet_compress.inference.decoder_fold`), the plain graph without that fold, and the plain graph with
InstanceNorm folded into the factorised convs (written out of place here, as a tracer needs it) — plus the product
graph with its logits left in the engine's channels-last layout and transposed to NCDHW by torch (the engine's last
node, that transposition, is its largest single node in ``engine_profile.py``), and times the compiled models next
to the torch fallback, each of its two modules added in turn:

* engine rows: OpenVINO compiled exactly as the product compiles (threads = torch's, LATENCY, f32);
* torch rows: plain torch; + fast convolutions (``inference.torch_paths``); + kept freed memory (``freed_memory``) —
  the torch fallback as it runs by default.

Prints a Markdown table (median seconds per patch, wall and process CPU, ratio to the product's engine graph, max
relative deviation from plain torch) and writes JSON + Markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.archs import ARCHITECTURES, as_compressed_unet, build_original, tucker  # noqa: E402
from benchmarks.engines import engine_variable  # noqa: E402
from benchmarks.speed import RESULTS, device_name, relative_deviation, time_interleaved  # noqa: E402
from nnunet_compress.inference import settings as fi  # noqa: E402
from nnunet_compress.inference.decoder_fold import engine_graph  # noqa: E402

TORCH_STEPS = {  # FastOptions switched on per torch row, cumulatively
    "torch plain": None,
    "torch + fast convolutions": dict(pointwise_gemm=True, force_onednn=True),
    "torch + freed memory": dict(pointwise_gemm=True, force_onednn=True, keep_freed_memory=True),
}
PRODUCT = "product graph (concatenations folded)"
NORM_FOLDED = "norm folding (on the plain graph)"
CHANNELS_LAST = "product graph, logits channels-last, transposed by torch"
REWRITES = (PRODUCT, "plain graph (concatenations kept)", NORM_FOLDED, CHANNELS_LAST)
TRANSPOSE_CHUNK = 4096  # voxels per block of the transposing copy: ~400 KB read, ~400 KB written, inside L2
ALL_OFF = dict(pointwise_gemm=False, force_onednn=False, keep_freed_memory=False)


@contextlib.contextmanager
def options(**switches):
    """torch_paths.OPTIONS with the given switches, restored afterwards."""
    saved = dict(vars(fi.OPTIONS))
    vars(fi.OPTIONS).update({**ALL_OFF, **switches})
    try:
        yield
    finally:
        vars(fi.OPTIONS).update(saved)


def foldable(chain) -> bool:
    """A factorised (non-transposed) conv followed by an affine InstanceNorm without running statistics."""
    from nnunet_compress.tucker.decomposition import TuckerConv
    conv = chain[0] if len(chain) in (2, 3) else None
    norm = chain[1] if conv is not None else None
    return (isinstance(conv, TuckerConv) and not conv.transposed and conv[2].groups == 1
            and isinstance(norm, torch.nn.InstanceNorm3d) and norm.affine and not norm.track_running_stats)


def traceable_fold(chain, x):
    """InstanceNorm folded into the factorised conv's last 1×1, out of place (as a tracer needs it):
    IN(U z + c) = (diag(s) U)(z − mean z) + β with s = γ / sqrt(diag(U Cov(z) Uᵀ) + ε), then the activation."""
    conv, norm = chain[0], chain[1]
    z = conv[1](conv[0](x))
    batch, spatial = z.shape[0], z.shape[2:]
    zc = z.flatten(2) - z.flatten(2).mean(2, keepdim=True)
    cov = (zc @ zc.transpose(1, 2)) * (1.0 / float(zc.shape[2]))  # a constant: static shapes
    u = conv[2].weight.flatten(1)
    # rsqrt·γ: OpenVINO 2026.4 converted γ / sqrt(·) of this graph wrongly (checked against torch)
    scale = torch.rsqrt(((u @ cov) * u).sum(-1) + norm.eps) * norm.weight
    y = (scale[..., None] * u) @ zc + norm.bias[:, None]
    if len(chain) > 2:
        y = torch.nn.functional.leaky_relu(y, chain[2].negative_slope)  # out of place: the engine needs it
    return y.view(batch, -1, *spatial)


class _FoldedChain(torch.nn.Module):
    def __init__(self, chain):
        super().__init__()
        self.chain = chain

    def forward(self, x):
        return traceable_fold(self.chain, x)


class ChannelsLastLogits(torch.nn.Module):
    """`net`'s logits permuted to (N, *spatial, C): the layout the engine's last convolution writes, so the engine
    needs no final reorder."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).movedim(1, -1)


def transposed_to_ncdhw(logits) -> torch.Tensor:
    """(N, *spatial, C) engine output → a new (N, C, *spatial) tensor, copied block by block: one 2-d transposing
    copy per block of voxels keeps reads and writes in cache (a whole-tensor ``.contiguous()`` took ~3× longer in
    a trial at 128³)."""
    src = torch.from_numpy(logits)
    batch, *spatial, channels = src.shape
    out = torch.empty(batch, channels, *spatial)
    for b in range(batch):
        rows, cols = src[b].reshape(-1, channels), out[b].view(channels, -1)
        for start in range(0, rows.shape[0], TRANSPOSE_CHUNK):
            cols[:, start:start + TRANSPOSE_CHUNK].copy_(rows[start:start + TRANSPOSE_CHUNK].t())
    return out


class Rewritten(torch.nn.Module):
    """The network's forward pass as plain modules (no engine, no fast paths), for tracing."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.decoder(self.net.encoder(x))


@contextlib.contextmanager
def traceable_folding(net):
    """Every foldable conv block of `net` computes :func:`traceable_fold` inside the block."""
    swapped = []
    for module in net.modules():
        chain = getattr(module, "all_modules", None)
        if isinstance(chain, torch.nn.Sequential) and foldable(chain):
            swapped.append((module, chain))
            module.all_modules = _FoldedChain(chain)
    try:
        yield len(swapped)
    finally:
        for module, chain in swapped:
            module.all_modules = chain


def compiled_graph(net, rewrite: str, x: torch.Tensor):
    """OpenVINO model of `net` traced with `rewrite` active, compiled as the product compiles."""
    import openvino as ov
    if rewrite == PRODUCT:
        module = engine_graph(net)
    elif rewrite == CHANNELS_LAST:
        module = ChannelsLastLogits(engine_graph(net)).eval()
    else:
        module = Rewritten(net).eval()
    # oneDNN calls and malloc tuning are torch-runtime tricks: kept off while tracing
    folding = traceable_folding(net) if rewrite == NORM_FOLDED else contextlib.nullcontext()
    with options(), folding, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.zeros_like(x), check_trace=False)
        model = ov.convert_model(traced, example_input=torch.zeros_like(x), input=[tuple(x.shape)])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                      "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(inp):
        request.infer({0: inp.numpy()})
        if rewrite == CHANNELS_LAST:
            return transposed_to_ncdhw(request.get_output_tensor(0).data)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def torch_row(net, switches):
    def run(inp):
        with engine_variable("torch"), torch.inference_mode():
            if switches is None:
                with fi.plain_inference():
                    return net(inp)
            with options(**switches):
                return net(inp)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", nargs=3, type=int, default=[96, 96, 96])
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    arch, patch = ARCHITECTURES["1.5mm"], tuple(args.patch)
    net = tucker(as_compressed_unet(arch, build_original(arch)), args.ratio, patch)
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(1))
    with fi.plain_inference(), torch.inference_mode():
        reference = net(x)
    rows = {}
    for rewrite in REWRITES:
        print(f"converting: {rewrite}", file=sys.stderr, flush=True)
        try:
            rows[f"openvino, {rewrite}"] = compiled_graph(net, rewrite, x)
        except Exception as e:  # a rewrite the engine cannot take is a result too
            print(f"  OpenVINO cannot take the {rewrite} graph: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    rows.update({name: torch_row(net, switches) for name, switches in TORCH_STEPS.items()})
    deviation = {name: relative_deviation(run(x), reference) for name, run in rows.items()}
    wall, cpu = time_interleaved(rows, lambda run: run(x), args.runs)
    base = statistics.median(wall[f"openvino, {PRODUCT}"])
    base_cpu = statistics.median(cpu[f"openvino, {PRODUCT}"])
    table = [f"### Tucker {args.ratio}, 1.5 mm, patch {'×'.join(map(str, patch))} — {device_name()}\n",
             "| path | patch s | product-graph s / this | CPU-s | CPU ratio | max rel. dev. |",
             "|---|---:|---:|---:|---:|---:|"]
    result = {"patch": list(patch), "ratio": args.ratio, "device": device_name(), "rows": {}}
    for name in rows:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        result["rows"][name] = {"patch_s": w, "patch_cpu_s": c, "runs_s": wall[name], "max_rel_dev": deviation[name]}
        table.append(f"| {name} | {w:.3f} | {base / w:.2f} | {c:.3f} | {base_cpu / c:.2f} | {deviation[name]:.1e} |")
    text = "\n".join(table)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"engine_rewrites_{args.tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"engine_rewrites_{args.tag}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
