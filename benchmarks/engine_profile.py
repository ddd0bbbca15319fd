"""Where OpenVINO spends a patch: per-operation time of the original and the Tucker network, from its own profiler.

    python -m benchmarks.engine_profile --arch 1.5mm --patch 96 96 96 --ratios 0.25 0.125 --runs 3

Why: a Tucker network at channel ratio 0.25 does ~9x fewer convolution FLOPs, yet runs ~3.9x faster than the
original on the engine. The convolutions shrink; the operations around them (InstanceNorm as MVN, LeakyReLU,
concatenation of skip connections, the result's copy) work on the same full-width feature maps in both networks
and are memory-bound. This script measures that split with OpenVINO's own per-node counters
(``PERF_COUNT``: ``real_time`` of every executed node, after the plugin's fusions), grouped by node type and
summed over the network, median over ``--runs`` inferences. From the split an Amdahl bound follows: even with free
convolutions the speed-up cannot exceed (original total) / (compressed non-convolution time).

Compiled exactly as the product compiles (``INFERENCE_NUM_THREADS`` = torch's threads, ``PERFORMANCE_HINT``
LATENCY, f32), plus the counters, which add a little overhead to every node alike. ``--precision int8`` profiles
each network quantised by NNCF as ``nnunet-compress quantize`` does (no accuracy control, calibrated on two random
patches: the node times do not depend on the calibration values), so that the INT8 split between convolutions,
(de)quantisation, normalisation and reorders can be read the same way. Output: a table per network on stdout,
JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from benchmarks.archs import ARCHITECTURES, as_compressed_unet, build_original, flops, tucker
from benchmarks.common import RESULTS
from nnunet_compress.inference import int8
from nnunet_compress.inference.openvino_engine import convert

# OpenVINO's node types of convolutions (ConvolutionBackpropData = the transposed 2x2x2 upsampling convs)
CONV_TYPES = ("Convolution", "ConvolutionBackpropData", "Deconvolution", "GroupConvolution", "FullyConnected")


def profile(net: torch.nn.Module, shape: tuple[int, ...], runs: int, precision: str = "f32") -> dict:
    """Median seconds per node type (and in all) over `runs` inferences of `net` at `shape` on OpenVINO."""
    import openvino as ov
    x = torch.randn(shape)
    core = ov.Core()
    model = convert(net, x)
    if precision == "int8":
        model = int8.quantize(model, [torch.randn(shape).numpy() for _ in range(2)], None, [], max_drop=None).model
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    per_type: dict[str, list[float]] = defaultdict(list)
    request.infer({0: x.numpy()})  # warm-up
    for _ in range(runs):
        request.infer({0: x.numpy()})
        sums: dict[str, float] = defaultdict(float)
        for node in request.profiling_info:
            if node.status == node.Status.EXECUTED:
                sums[node.node_type] += node.real_time.total_seconds()
        for kind in set(sums) | set(per_type):
            per_type[kind].append(sums.get(kind, 0.0))
    medians = {kind: statistics.median(values) for kind, values in per_type.items()}
    conv = sum(v for k, v in medians.items() if k in CONV_TYPES)
    return {"by_type": dict(sorted(medians.items(), key=lambda kv: -kv[1])), "conv_s": conv,
            "other_s": sum(medians.values()) - conv, "total_s": sum(medians.values())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="1.5mm")
    ap.add_argument("--patch", type=int, nargs=3, help="patch size (default: the architecture's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25])
    ap.add_argument("--rank-multiples", type=int, nargs="+", default=[1],
                    help="Tucker networks with ranks rounded up to each multiple (16 = the AVX-512 channel block)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precision", choices=("f32", "int8"), default="f32")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    arch = ARCHITECTURES[args.arch]
    patch = tuple(args.patch) if args.patch else arch.patch
    shape = (1, 1, *patch)
    original = as_compressed_unet(arch, build_original(arch))
    networks = {"original": original}
    for r in args.ratios:
        for m in args.rank_multiples:
            networks[f"tucker {r}" + (f" m{m}" if m > 1 else "")] = tucker(original, r, patch, multiple=m)
    rows = {}
    for name, net in networks.items():
        with torch.inference_mode():
            rows[name] = {**profile(net, shape, args.runs, args.precision), "gflops": flops(net, patch) / 1e9}
        r = rows[name]
        print(f"\n{name}: {r['gflops']:.1f} GFLOPs, {r['total_s']:.3f} s per patch (sum of node times), "
              f"convolutions {r['conv_s']:.3f} s, everything else {r['other_s']:.3f} s")
        for kind, seconds in list(r["by_type"].items())[:8]:
            print(f"  {kind:<22s} {seconds:8.3f} s  {seconds / r['total_s']:6.1%}")
    base = rows["original"]
    print("\n| network | GFLOPs | conv s | other s | total s | x vs original | bound with free convs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['gflops']:.1f} | {r['conv_s']:.3f} | {r['other_s']:.3f} | {r['total_s']:.3f} | "
              f"{base['total_s'] / r['total_s']:.2f} | {base['total_s'] / r['other_s']:.2f} |")
    result = {"arch": args.arch, "patch": list(patch), "threads": torch.get_num_threads(), "precision": args.precision,
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"engine_profile_{args.arch}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
