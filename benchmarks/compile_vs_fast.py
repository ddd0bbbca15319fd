"""torch.compile (inductor) vs the plugin's CPU fast paths on one Tucker-factorised patch, side by side.

    .venv/bin/python benchmarks/compile_vs_fast.py [--arch 1.5mm] [--patch 96 96 96] [--ratio 0.25] [--runs 5]

Why this exists: the speed issue asked whether inference-time compilation would make thin factorised convolutions
fast. The fast paths (nnunet_compress/inference/torch_paths.py and friends) switch themselves off inside torch.compile, so
the two are alternatives; this times plain torch, torch.compile of the same network and the fast paths,
interleaved in one process, and reports the compiled output's deviation from the plain one. Needs a C++ compiler
(inductor generates C++ for the CPU). Prints a Markdown table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.archs import ARCHITECTURES, as_compressed_unet, build_original, tucker  # noqa: E402
from benchmarks.speed import RESULTS  # noqa: E402
from nnunet_compress.inference import settings as fast_inference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="1.5mm", choices=sorted(ARCHITECTURES))
    ap.add_argument("--patch", nargs=3, type=int, default=[96, 96, 96])
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    arch, patch = ARCHITECTURES[args.arch], tuple(args.patch)
    net = tucker(as_compressed_unet(arch, build_original(arch)), args.ratio, patch)
    x = torch.randn(1, 1, *patch)

    def plain():
        with fast_inference.plain_inference():
            return net(x)

    with torch.inference_mode():
        reference = plain()
        start = time.perf_counter()
        compiled = torch.compile(net)
        out = compiled(x)
        compile_s = time.perf_counter() - start
        deviation = float((out - reference).abs().max() / reference.abs().max())
        variants = {"plain torch": plain, "torch.compile": lambda: compiled(x), "fast paths": lambda: net(x)}
        times = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, fn in variants.items():
                cpu, wall = time.process_time(), time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    rows = {name: {"wall_s": statistics.median(w for w, _ in t), "cpu_s": statistics.median(c for _, c in t)}
            for name, t in times.items()}
    base = rows["plain torch"]
    print(f"### {args.arch}, Tucker {args.ratio}, patch {'×'.join(map(str, patch))}, "
          f"{torch.get_num_threads()} threads (compile {compile_s:.0f} s, max deviation {deviation:.1e} relative)\n")
    print("| variant | wall s | × plain | CPU-s | × plain |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.3f} | {base['wall_s'] / r['wall_s']:.2f} | {r['cpu_s']:.3f} | "
              f"{base['cpu_s'] / r['cpu_s']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"compile_vs_fast_{args.arch}.json"
    out_path.write_text(json.dumps({"arch": args.arch, "patch": list(patch), "ratio": args.ratio,
                                    "compile_s": compile_s, "max_rel_deviation": deviation, "rows": rows}, indent=1))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
