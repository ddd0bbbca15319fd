"""The human-readable summary of a comparison (``summary.md``), rendered from the summary dict alone.

Keeping it a pure function of ``summary.json`` means the Markdown can never disagree with the machine-readable
numbers, and tests can render it from any summary.
"""

from __future__ import annotations

import math


def _f(value, fmt: str = ".4f", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


def _times(latency_ratio, role: str) -> str:
    """A latency ratio (model / base) as a speed-up; the base row is the reference."""
    if role == "base":
        return "1.00×"
    return "–" if not latency_ratio else f"{1 / latency_ratio:.2f}×"


def _mib(value) -> str:
    return _f(None if value is None else value / 2 ** 20, ".1f")


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    models = summary["models"]
    base = models[0]
    lines = [
        "# Model comparison", "",
        f"{len(summary['cases'])} test cases, {len(summary['classes'])} classes; base model **{base['name']}**. "
        f"Dice by nnU-Net's `compute_metrics`; NSD = normalised surface Dice at {s['tolerance_mm']} mm. "
        f"Paired test per class: Wilcoxon signed-rank (compressed − base over cases), p-values corrected across "
        f"classes ({s['correction']}), α = {s['alpha']}. Cost of one forward pass on a "
        f"{'×'.join(map(str, base.get('patch_size') or []))} patch on {base.get('device')}; FLOPs as torch counts "
        f"them (1 multiply-add = 2 FLOPs). \"runs on\": the engine and precision nnU-Net's predictor uses for the "
        f"model here; each model was timed interleaved with the base on torch and the base on its own engine and "
        f"precision, so \"same engine\" is the compression's own speed-up.", "",
        "## Models", "",
        "| model | runs on | params | GFLOPs | latency (ms) | × vs base, same engine | × vs base on torch | "
        "peak memory (MiB) | mean Dice | mean NSD | classes different (Dice / NSD) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        different = "base" if m["role"] == "base" else \
            f"{m['classes_different_dice']} / {m['classes_different_nsd']} of {m['classes_tested']}"
        lines.append(
            f"| {m['name']} | {m.get('runs_on') or m.get('device') or '–'} | {_f(m['params'], ',')} ({_f(m.get('params_ratio'), '.2f', '1.00')}) | "
            f"{_f(None if m['flops'] is None else m['flops'] / 1e9, '.2f')} "
            f"({_f(m.get('flops_ratio'), '.2f', '1.00')}) | "
            f"{_f(None if m['latency_s'] is None else m['latency_s'] * 1e3, '.1f')} | "
            f"{_times(m.get('latency_ratio'), m['role'])} | {_times(m.get('latency_ratio_vs_base_torch'), m['role'])} | "
            f"{_mib(m['peak_memory_bytes'])} | {_f(m['mean_dice'])} | {_f(m['mean_nsd'])} | {different} |")
    lines.append("")
    for m in models[1:]:
        lines.append(f"- **{m['name']}**: no evidence of a Dice difference for "
                     f"{m['classes_tested'] - m['classes_different_dice']} of {m['classes_tested']} classes "
                     f"(corrected p ≥ {s['alpha']}).")
    if summary["smallest_possible_p"] >= s["alpha"]:
        lines += ["", f"Note: with {len(summary['cases'])} cases the smallest possible two-sided Wilcoxon p-value is "
                      f"{summary['smallest_possible_p']:.3g} ≥ α, so no class can show a significant difference; "
                      f"use more test cases for a meaningful test."]
    lines += ["", "## Per class", "",
              "| class | " + " | ".join(f"{m['name']} Dice" for m in models) + " | "
              + " | ".join(f"Δ Dice {m['name']} (p adj.)" for m in models[1:]) + " | "
              + " | ".join(f"{m['name']} NSD" for m in models) + " |",
              "|---|" + "---:|" * (2 * len(models) + len(models) - 1)]
    by_key = {(r["model"], r["label"]): r for r in summary["per_class"]}
    for c in summary["classes"]:
        rows = [by_key[(m["name"], c["label"])] for m in models]
        deltas = [f"{_f(r['dice_diff_mean'], '+.4f')} ({_f(r['dice_p_adj'], '.3g')})"
                  f"{' *' if r['dice_different'] else ''}" for r in rows[1:]]
        lines.append(f"| {c['name']} ({c['label']}) | " + " | ".join(_f(r["dice"]) for r in rows) + " | "
                     + " | ".join(deltas) + " | " + " | ".join(_f(r["nsd"]) for r in rows) + " |")
    lines += ["", "`*` corrected p < α. Files: " + ", ".join(f"`{v}`" for v in summary.get("files", {}).values()),
              ""]
    plots = [v for k, v in summary.get("files", {}).items() if v.endswith(".png")]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
