"""FLOPs vs time plot (PNG) from the JSON that benchmarks/speed.py writes.

    python benchmarks/plot_speed.py benchmarks/results/speed_cpu_*.json

Whole-CT times (compressed 1.5 mm vs the 3 mm --fast model) are measured directly by benchmarks/whole_ct.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def plot(reports: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [(arch, e, r["device"]) for r in reports for arch, e in r["architectures"].items()]
    fig, axes = plt.subplots(1, len(entries), figsize=(6 * len(entries), 5), squeeze=False)
    for ax, (arch, entry, device) in zip(axes[0], entries):
        variants = entry["variants"]
        base = variants["original"]
        # process CPU time where recorded: on a shared machine it is far steadier than wall-clock time
        key = "patch_cpu_s" if "patch_cpu_s" in base else "patch_s"
        for name, v in variants.items():
            fast = name.endswith("+fast")
            color = "tab:gray" if name.startswith("original") else "tab:blue" if "tucker" in name else "tab:orange"
            ax.scatter(v["flops"] / 1e9, v[key], marker="o" if fast else "x", color=color, s=40)
            ax.annotate(name, (v["flops"] / 1e9, v[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        fmax = base["flops"] / 1e9
        ax.plot([0, fmax], [0, base[key]], "k--", lw=0.8, label="time ∝ FLOPs (from plain original)")
        ax.set_xlabel("GFLOPs per patch (FlopCounterMode)")
        ax.set_ylabel(("CPU " if key == "patch_cpu_s" else "") + "seconds per patch (median)")
        ax.set_title(f"{arch}, patch {'×'.join(map(str, entry['patch']))}\n{device}", fontsize=9)
        ax.legend(fontsize=7, title="x: plain torch, o: fast paths", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("-o", type=Path, default=Path(__file__).resolve().parent / "results" / "speed_flops_vs_time.png")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.json]
    plot(reports, args.o)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
