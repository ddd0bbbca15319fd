"""FLOPs vs time plot (PNG) from the JSON that benchmarks/speed.py writes.

    python -m benchmarks.plot_speed benchmarks/results/speed_cpu_*.json

Whole-CT times (compressed 1.5 mm vs the 3 mm --fast model) are measured directly by benchmarks/whole_ct.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS

MARKERS = {"torch": "x", "torch+paths": "o", "openvino": "s", "onnxruntime": "^"}


def plot(reports: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [(key, e, r["device"]) for r in reports for key, e in r["architectures"].items()]
    fig, axes = plt.subplots(1, len(entries), figsize=(6 * len(entries), 5), squeeze=False)
    for ax, (key, entry, device) in zip(axes[0], entries):
        rows = entry["rows"]
        # process CPU time: on a shared machine it is far steadier than wall-clock time
        for v in rows.values():
            color = ("tab:gray" if v["network"] == "original" else "tab:blue" if v["network"].startswith("tucker")
                     else "tab:orange")
            ax.scatter(v["flops"] / 1e9, v["patch_cpu_s"], marker=MARKERS.get(v["engine"], "."), color=color, s=40)
            ax.annotate(f"{v['network']} / {v['engine']}", (v["flops"] / 1e9, v["patch_cpu_s"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        best = rows[entry["best_original"]]
        ax.plot([0, best["flops"] / 1e9], [0, best["patch_cpu_s"]], "k--", lw=0.8,
                label=f"time ∝ FLOPs (from {entry['best_original']})")
        ax.set_xlabel("GFLOPs per patch (FlopCounterMode)")
        ax.set_ylabel("CPU seconds per patch (median)")
        ax.set_title(f"{key}\n{device}", fontsize=9)
        ax.legend(fontsize=7, title="x torch, o torch+paths, ■ OpenVINO, ▲ ONNX Runtime", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("-o", type=Path, default=RESULTS / "speed_flops_vs_time.png")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.json]
    plot(reports, args.o)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
