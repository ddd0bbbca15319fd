"""FLOPs vs time plot (PNG) and whole-CT estimates from the JSON that benchmarks/speed.py writes.

    python benchmarks/plot_speed.py benchmarks/results/speed_cpu_*.json
    python benchmarks/plot_speed.py --per-ct benchmarks/results/speed_cpu_1.5mm_p128.json \
        benchmarks/results/speed_cpu_3mm_p112.json

Whole-CT time (question 3 of issue 7): nnU-Net resamples a CT to the model's spacing, then runs one patch per
sliding-window position (step 0.5 of the patch), so time per CT ≈ patches × time per patch. We count the
patches with nnU-Net's own ``compute_steps_for_sliding_window`` for a typical CT (512×512×300 voxels at
0.8×0.8×1.5 mm) resampled to 1.5 mm and to 3 mm. TotalSegmentator's default ``total`` task runs five 1.5 mm part
models (organs, vertebrae, cardiac, muscles, ribs) on every CT; ``--fast`` runs one 3 mm model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.8, 0.8, 1.5)
TOTAL_PART_MODELS = 5


def resampled_shape(spacing_mm: float) -> tuple[int, ...]:
    return tuple(int(round(n * s / spacing_mm)) for n, s in zip(CT_SHAPE, CT_SPACING))


def patches_per_ct(spacing_mm: float, patch) -> int:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    shape = resampled_shape(spacing_mm)
    shape = tuple(max(s, p) for s, p in zip(shape, patch))  # nnU-Net pads smaller images up to the patch
    return math.prod(len(s) for s in compute_steps_for_sliding_window(shape, tuple(patch), 0.5))


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


def per_ct(fine: dict, coarse: dict) -> str:
    """Markdown: per-CT seconds of the 1.5 mm variants (one part model and all five) vs the 3 mm original."""
    e15, e3 = fine["architectures"]["1.5mm"], coarse["architectures"]["3mm"]
    n15, n3 = patches_per_ct(1.5, e15["patch"]), patches_per_ct(3.0, e3["patch"])
    t3 = n3 * e3["variants"]["original"]["patch_s"]
    t3_cpu = n3 * e3["variants"]["original"]["patch_cpu_s"]
    lines = [f"Typical CT {CT_SHAPE} at {CT_SPACING} mm → 1.5 mm grid {resampled_shape(1.5)}: {n15} patches of "
             f"{e15['patch']}; 3 mm grid {resampled_shape(3.0)}: {n3} patches of {e3['patch']}.", "",
             "| model | s/patch | patches | s per CT (one model) | s per CT (`total`: 5 part models) "
             "| vs 3 mm --fast (wall) | vs --fast (CPU time) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| 3 mm --fast, original | {e3['variants']['original']['patch_s']:.2f} | {n3} | {t3:.0f} | – | 1.00 "
                 f"| 1.00 |")
    for name, v in e15["variants"].items():
        one, one_cpu = n15 * v["patch_s"], n15 * v["patch_cpu_s"]
        lines.append(f"| 1.5 mm {name} | {v['patch_s']:.2f} | {n15} | {one:.0f} | {TOTAL_PART_MODELS * one:.0f} | "
                     f"{one / t3:.2f}× (5 models: {TOTAL_PART_MODELS * one / t3:.1f}×) | "
                     f"{one_cpu / t3_cpu:.2f}× (5 models: {TOTAL_PART_MODELS * one_cpu / t3_cpu:.1f}×) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--per-ct", action="store_true", help="args: the 1.5 mm JSON, then the 3 mm JSON")
    ap.add_argument("-o", type=Path, default=Path(__file__).resolve().parent / "results" / "speed_flops_vs_time.png")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.json]
    if args.per_ct:
        text = per_ct(reports[0], reports[1])
        print(text)
        (Path(__file__).resolve().parent / "results" / "per_ct.md").write_text(text + "\n")
    else:
        plot(reports, args.o)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
