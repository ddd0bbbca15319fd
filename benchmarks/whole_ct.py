"""A whole CT on the CPU: compressed 1.5 mm TotalSegmentator networks vs the uncompressed 3 mm ``--fast`` model.

    .venv/bin/python -m benchmarks.whole_ct [--fov 366 303 336] [--ratios 0.25 0.125] [--runs 1] \
        [--engine torch openvino]

What a user without a GPU would otherwise pick is TotalSegmentator's ``--fast`` model: 3 mm voxels, one network.
This times, side by side in one process (interleaved, as benchmarks/speed.py does), nnU-Net's own sliding-window
prediction of one CT-sized volume by

* the 3 mm ``--fast`` network on the CT resampled to 3 mm,
* one 1.5 mm part network on the CT resampled to 1.5 mm (8x the voxels), uncompressed and Tucker-factorised at
  each ``--ratios`` channel ratio,

each on every ``--engine`` (benchmarks/engines.py: plain torch as nnU-Net runs an original, OpenVINO as
``nnUNetv2_predict`` runs a compressed or ``convert``-ed folder). Ratios are against the ``--fast`` model on its
fastest engine.

TotalSegmentator's default ``total`` task runs FIVE such 1.5 mm part networks (organs, vertebrae, cardiac,
muscles, ribs) with the same architecture; the table reports one network's seconds and the five-network total
(5x: the part networks differ only in their 1x1x1 head, 25 outputs here for all of them, so their times are the
same to within noise).

The field of view defaults to the example CT shipped in tests/data (TotalSegmentator's example_ct: 122x101x112
voxels at 3 mm = 366x303x336 mm). Weights are random (nnU-Net's He init); speed does not depend on them.
Outputs a Markdown table on stdout and JSON + Markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from benchmarks.archs import ARCHITECTURES, as_compressed_unet, build_original, flops, params, tucker
from benchmarks.common import RESULTS, device_name, make_predictor, sliding_window_patches, time_interleaved
from benchmarks.engines import ENGINES, make_runner
from nnunet_compress.inference import openvino_engine

PART_MODELS = 5  # TotalSegmentator's default 'total' task at 1.5 mm


def voxels(fov_mm, spacing_mm) -> tuple[int, ...]:
    return tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing_mm))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fov", nargs=3, type=float, default=[366.0, 303.0, 336.0], help="field of view in mm")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--engine", nargs="+", default=["torch", "openvino"], choices=ENGINES)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    openvino_engine.MAX_COMPILED = 64  # every row stays compiled
    fast_arch, part_arch = ARCHITECTURES["3mm"], ARCHITECTURES["1.5mm"]
    fast_net = build_original(fast_arch)
    fast_base = as_compressed_unet(fast_arch, fast_net)
    part_original = build_original(part_arch)
    part_base = as_compressed_unet(part_arch, part_original)
    # (name, network, the same as CompressedUNet, architecture)
    networks = [("3mm --fast (original)", fast_net, fast_base, fast_arch),
                ("1.5mm part (original)", part_original, part_base, part_arch)]
    for r in args.ratios:
        t = tucker(part_base, r, part_arch.patch)
        networks.append((f"1.5mm part tucker{r}", t, t, part_arch))
    volumes = {a.name: voxels(args.fov, a.spacing_mm) for a in (fast_arch, part_arch)}
    images = {name: torch.randn(1, *shape) for name, shape in volumes.items()}
    rows, timed = [], {}
    for name, net, compressed, arch in networks:
        for engine in args.engine:
            if engine == "torch+paths" and "original" in name:
                continue  # the torch fallback of a compressed folder; originals are compared plain and on engines
            label = f"{name} / {engine}"
            print(f"preparing {label}", file=sys.stderr, flush=True)
            runner = make_runner(engine, net, (1, 1, *arch.patch), compressed)
            predictor = make_predictor(runner.module(), arch.patch, arch.num_classes, torch.device("cpu"))
            timed[label] = _Sliding(predictor, images[arch.name])
            rows.append({"variant": name, "engine": engine, "label": label, "spacing_mm": arch.spacing_mm[0],
                         "volume": list(volumes[arch.name]),
                         "patches": sliding_window_patches(volumes[arch.name], arch.patch), "params": params(net),
                         "gflops_per_patch": flops(net, arch.patch) / 1e9, "start_up_s": runner.prepare_s,
                         "networks_per_ct": PART_MODELS if arch is part_arch else 1})
    wall, cpu = time_interleaved(timed, lambda run: run(), args.runs, warmup=0)
    for r in rows:
        r["seconds_one_network"] = statistics.median(wall[r["label"]])
        r["cpu_seconds_one_network"] = statistics.median(cpu[r["label"]])
    add_per_ct(rows)
    report = {"device": device_name(), "threads": torch.get_num_threads(), "fov_mm": args.fov,
              "runs": args.runs, "rows": rows}
    table = markdown(report)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"whole_ct_{args.tag}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"whole_ct_{args.tag}.md").write_text(table + "\n")
    print(f"wrote {RESULTS / f'whole_ct_{args.tag}.json'}")
    return 0


class _Sliding:
    """nnU-Net's sliding-window prediction of one volume by one prepared predictor."""

    def __init__(self, predictor, image):
        self.predictor, self.image = predictor, image

    def __call__(self):
        with torch.inference_mode():
            self.predictor.predict_sliding_window_return_logits(self.image)


def add_per_ct(rows) -> None:
    """Seconds per CT (one network × networks per CT) and their ratio to the --fast model on its fastest engine."""
    fast_rows = [r for r in rows if r["variant"].startswith("3mm")]
    for kind in ("seconds", "cpu_seconds"):
        fast = min(r[f"{kind}_one_network"] for r in fast_rows)
        for r in rows:
            r[f"{kind}_per_ct"] = r[f"{kind}_one_network"] * r["networks_per_ct"]
            r[f"{kind}_vs_fast"] = r[f"{kind}_per_ct"] / fast


def markdown(report) -> str:
    fov = "×".join(f"{f:g}" for f in report["fov_mm"])
    lines = [f"### Whole CT ({fov} mm) on {report['device']}, {report['threads']} threads, median of "
             f"{report['runs']} run(s)\n",
             "| variant | engine | voxels | patches | params (M) | GFLOPs/patch (FlopCounterMode) | networks per CT "
             "| wall s, one network | wall s per CT | × best `--fast` | CPU-s per CT | × best `--fast` (CPU) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['engine']} | {'×'.join(map(str, r['volume']))} | {r['patches']} | "
                     f"{r['params'] / 1e6:.2f} | {r['gflops_per_patch']:.1f} | {r['networks_per_ct']} | "
                     f"{r['seconds_one_network']:.1f} | {r['seconds_per_ct']:.1f} | {r['seconds_vs_fast']:.2f} | "
                     f"{r['cpu_seconds_per_ct']:.1f} | {r['cpu_seconds_vs_fast']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
