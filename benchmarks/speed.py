"""Original vs compressed TotalSegmentator networks on several CPU engines, timed side by side in one process.

    python -m benchmarks.speed --arch 1.5mm --patch 128 128 128 --engine torch torch+paths openvino onnxruntime

Rows are (network, engine) pairs. Networks: the original PlainConvUNet, Tucker-factorised copies at each
``--ratios`` channel ratio, and L1-pruned copies with the FLOPs of each ``--prune-ratios`` Tucker ratio. Engines
(benchmarks/engines.py): ``torch`` (plain torch, what nnU-Net runs), ``torch+paths`` (this package's torch CPU
paths, the fallback), ``openvino`` (the default CPU engine of compressed and ``convert``-ed model folders) and
``onnxruntime`` (a second engine for comparison). All rows are timed in ONE process, interleaved (row A, B, C, A,
B, C, ...), and the median is reported: on a shared, noisy machine that is what keeps the ratios meaningful.

Three ratios per row: against the original on plain torch, against the original on the *same* engine and precision
(the compression's own gain), and against the original on its *best* engine and precision (the fastest original
row of this run, e.g. OpenVINO INT8) — what an informed user would deploy instead of compressing.
``--precision f32 int8`` picks the OpenVINO rows: ``openvino`` (f32) and ``openvino-int8``. Also: each row's
start-up (first call: conversion/export + compilation; for OpenVINO also the cached start-up a second process
pays) and its largest relative deviation from the same network's plain-torch logits.

FLOPs are torch's FlopCounterMode count (1 multiply-add = 2 FLOPs). Weights are random (nnU-Net's He init): speed
does not depend on their values. ``--volume`` adds nnU-Net's own sliding-window prediction
(``nnUNetPredictor.predict_sliding_window_return_logits``, step 0.5, Gaussian, no mirroring as TotalSegmentator
predicts) with the predictor's plans objects replaced by the two attributes that method reads.
Outputs: a Markdown table on stdout, JSON and the table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

from benchmarks.archs import ARCHITECTURES, as_compressed_unet, build_original, flops, params, prune_to_ratio, tucker
from benchmarks.common import (
    RESULTS,
    device_name,
    make_predictor,
    relative_deviation,
    sliding_window_patches,
    time_interleaved,
)
from benchmarks.engines import ENGINES, cached_start_up, make_runner
from nnunet_compress.inference import openvino_engine
from nnunet_compress.inference.settings import CACHE_VARIABLE


def build_networks(arch, patch, ratios, multiple, prune):
    """(name, plain network, the same as CompressedUNet) triples; pruned nets match each Tucker ratio's FLOPs."""
    original = build_original(arch)
    base = as_compressed_unet(arch, original)
    networks = [("original", original, base)]
    f0 = flops(original, patch)
    for r in ratios:
        t = tucker(base, r, patch, multiple=multiple)
        networks.append((f"tucker{r}", t, t))
        if r in prune:
            keep = match_prune_ratio(base, flops(t, patch) / f0, patch)
            p = prune_to_ratio(base, keep)
            networks.append((f"pruned{keep:.3f}", p, p))
    return networks


def match_prune_ratio(net, flop_target, patch, lo=0.05, hi=1.0) -> float:
    """Channel keep-ratio whose pruned net has about `flop_target` of the FLOPs (bisection on the real count)."""
    f0 = flops(net, patch)
    for _ in range(8):
        mid = (lo + hi) / 2
        if flops(prune_to_ratio(net, mid), patch) / f0 > flop_target:
            hi = mid
        else:
            lo = mid
    return round((lo + hi) / 2, 3)






def measure(arch, patch, args) -> dict:
    prune = args.ratios if args.prune_ratios is None else args.prune_ratios
    networks = build_networks(arch, patch, args.ratios, args.multiple, prune)
    shape = (1, 1, *patch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rows, info = {}, {}
    for name, net, compressed in networks:
        reference = None
        for engine in args.engine:
            row = f"{name} / {engine}"
            print(f"preparing {row}", file=sys.stderr, flush=True)
            runner = make_runner(engine, net, shape, compressed)
            entry = {"network": name, "engine": engine, "flops": flops(net, patch), "params": params(net),
                     "prepare_s": runner.prepare_s, **runner.details}
            if engine == "openvino":
                entry["cached_start_up_s"] = cached_start_up(runner, shape)
            y = runner(x)
            if reference is None:
                from nnunet_compress.inference.settings import plain_inference
                with plain_inference(), torch.inference_mode():
                    reference = net(x)
            entry["max_rel_dev"] = relative_deviation(y, reference)
            rows[row], info[row] = runner, entry
    patch_times, patch_cpu = time_interleaved(rows, lambda r: r(x), args.runs)
    for row in rows:
        info[row].update(patch_s=statistics.median(patch_times[row]), patch_cpu_s=statistics.median(patch_cpu[row]),
                         patch_runs_s=patch_times[row])
    result = {"patch": list(patch), "rows": info}
    if args.volume:
        image = torch.randn(1, *args.volume)
        device = torch.device("cpu")

        def sliding(runner):
            make_predictor(runner.module(), patch, arch.num_classes, device).predict_sliding_window_return_logits(image)

        sw_times, sw_cpu = time_interleaved(rows, sliding, args.sw_runs, warmup=0)
        result.update(volume=list(args.volume), volume_patches=sliding_window_patches(args.volume, patch))
        for row in rows:
            info[row].update(volume_s=statistics.median(sw_times[row]), volume_cpu_s=statistics.median(sw_cpu[row]))
    add_ratios(result)
    return result


def add_ratios(result) -> None:
    """Time ratios against the original on plain torch and against the original's fastest engine of this run."""
    rows = result["rows"]
    originals = {r: v for r, v in rows.items() if v["network"] == "original"}
    plain = next((v for v in originals.values() if v["engine"] == "torch"), None)
    best_row = min(originals, key=lambda r: originals[r]["patch_s"])
    result["best_original"] = best_row
    for v in rows.values():
        v["flop_ratio"] = (plain or originals[best_row])["flops"] / v["flops"]
        for key in ("patch_s", "patch_cpu_s", "volume_s", "volume_cpu_s"):
            if key not in v:
                continue
            if plain is not None:
                v[key[:-2] + "_vs_torch"] = plain[key] / v[key]
            v[key[:-2] + "_vs_best"] = originals[best_row][key] / v[key]
            same = next((o for o in originals.values() if o["engine"] == v["engine"]), None)
            if same is not None:
                v[key[:-2] + "_vs_same"] = same[key] / v[key]


def markdown(arch_name, result, device) -> str:
    has_volume = "volume" in result
    best = result["best_original"]
    head = (f"### {arch_name}: patch {'×'.join(map(str, result['patch']))}"
            + (f", sliding window over {'×'.join(map(str, result['volume']))} ({result['volume_patches']} patches)"
               if has_volume else "") + f" — {device}; best original: {best}\n\n")
    cols = ("| network | engine | params (M) | GFLOPs | patch s | × vs original torch | × vs original same engine "
            "| × vs best original | CPU-s | CPU × vs best | start-up s | cached start-up s | max rel. dev. |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_volume:
        cols += " volume s | × vs best |"
        rule += "---:|---:|"
    lines = [cols, rule]
    for v in result["rows"].values():
        cached = v.get("cached_start_up_s")
        line = (f"| {v['network']} | {v['engine']} | {v['params'] / 1e6:.2f} | {v['flops'] / 1e9:.1f} | "
                f"{v['patch_s']:.3f} | {_ratio(v, 'patch_vs_torch')} | {_ratio(v, 'patch_vs_same')} | "
                f"{v['patch_vs_best']:.2f} | "
                f"{v['patch_cpu_s']:.3f} | {v['patch_cpu_vs_best']:.2f} | {v['prepare_s']:.1f} | "
                f"{'' if cached is None else f'{cached:.1f}'} | {v['max_rel_dev']:.1e} |")
        if has_volume:
            line += f" {v['volume_s']:.1f} | {v['volume_vs_best']:.2f} |"
        lines.append(line)
    return head + "\n".join(lines)


def _ratio(v, key) -> str:
    return f"{v[key]:.2f}" if key in v else "–"




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["1.5mm", "3mm"], choices=sorted(ARCHITECTURES))
    ap.add_argument("--patch", nargs=3, type=int, action="append",
                    help="a patch to time (repeatable; default: each model's own)")
    ap.add_argument("--engine", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--precision", nargs="+", choices=("f32", "int8"),
                    help="OpenVINO precisions to time (f32: openvino, int8: openvino-int8); replaces those in --engine")
    ap.add_argument("--volume", nargs=3, type=int, help="sliding-window volume (voxels); omit to skip")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--multiple", type=int, default=1, help="round Tucker ranks up to this multiple")
    ap.add_argument("--prune-ratios", nargs="*", type=float, default=None,
                    help="Tucker ratios to also match by pruning (default: all; none: no pruning)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sw-runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the user's engine cache (default: a fresh one, so conversion times are measured)")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    if args.precision:
        wanted = {"f32": "openvino", "int8": "openvino-int8"}
        args.engine = [e for e in args.engine if e not in wanted.values()] + [wanted[p] for p in args.precision]

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if not args.keep_cache:
        os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="nnunet_compress_bench_cache_")
    openvino_engine.MAX_COMPILED = 64  # every row stays compiled (the product keeps 2: one model, few shapes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "engines": args.engine, "runs": args.runs, "architectures": {}}
    tables = []
    for arch_name in args.arch:
        arch = ARCHITECTURES[arch_name]
        for patch in (args.patch or [arch.patch]):
            key = f"{arch_name} {'x'.join(map(str, patch))}"
            report["architectures"][key] = result = measure(arch, tuple(patch), args)
            tables.append(markdown(arch_name, result, report["device"]))
            print(tables[-1], flush=True)
    out = RESULTS / f"speed_{args.tag}.json"
    out.write_text(json.dumps(report, indent=1))
    (RESULTS / f"speed_{args.tag}.md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
