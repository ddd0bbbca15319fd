"""The report of ``nnunet-compress auto``: ``auto_report.json`` (everything), ``.csv`` (one row per model),
``.md`` (the answer, then the table with the command that rebuilds each candidate) and ``auto_pareto.png``
(seconds per patch against Dice on the choosing cases, every candidate, the budget line, the winner marked;
candidates' seconds are the parent's engine seconds divided by their side-by-side speed-up, one time scale).

Every file is drawn from the summary dict alone, so the four always agree.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from nnunet_compress.evaluation.report_plots import pareto_front
from nnunet_compress.nnunet.model_folder import atomic_write_file

WINNER, NO_CANDIDATE, HELD_OUT_VETO = "winner", "no candidate within the budget", "winner vetoed on held-out cases"
STEM = "auto_report"
PLOT = "auto_pareto.png"


def summary(settings, data, parent, rows, winner, verdict: str, stopped: int | None, elapsed: float) -> dict:
    budget = settings.max_dice_drop
    parent_dice = parent.choose["mean_dice"]
    # the parent is the reference of the speed-ups, not a model to rank by them
    reference = {**_model(parent, parent, budget), "speedup_same_engine": None, "speedup_vs_torch": None}
    models = [reference] + [_model(r, parent, budget) for r in rows]
    dice_of = {m["name"]: m["dice_choose"] for m in models}
    for m in models:  # a fine-tuned candidate beside the Dice of the candidate it was trained from
        m["dice_before_fine_tune"] = dice_of.get(m["fine_tuned_from"]) if m["fine_tuned_from"] else None
    # one time scale for every candidate: the parent's engine seconds of the parent's own timing divided by the
    # candidate's side-by-side speed-up (raw seconds of candidates timed minutes apart carry the machine's load)
    parent_engine = (parent.speed or {}).get("parent_engine_seconds") or (parent.speed or {}).get("seconds")
    for m in models:
        m["seconds_normalised"] = (m["seconds_per_patch"] if m["name"] == "parent" else
                                   parent_engine / m["speedup_same_engine"]
                                   if parent_engine and m["speedup_same_engine"] else None)
    out = {"parent": str(Path(settings.model_folder).resolve()), "output": str(settings.output),
           "max_dice_drop": budget, "verdict": verdict, "quality_data": data.source,
           "graded_against": data.graded_against, "labelled": data.labelled,
           "choosing_cases": data.choose.cases, "held_out_cases": data.held_out.cases,
           "fine_tune_cases": data.train.cases if data.train is not None else None,
           "fine_tuned_by": (None if settings.fine_tune_epochs is None else
                             "the model's training split (--dataset)" if data.train is None else
                             "the labels of the fine-tuning cases" if data.labelled else
                             "distillation from the parent on the fine-tuning cases (no labels)"),
           "parent_dice_choose": parent_dice, "parent_dice_held_out": parent.held_out["mean_dice"],
           "candidates_total": len(rows), "candidates_graded": sum(r.status == "graded" for r in rows),
           "stopped_by_time_budget_after": stopped, "time_budget_min": settings.time_budget,
           "fine_tune_epochs": settings.fine_tune_epochs,
           "fine_tuned": sum(r.fine_tuned_from is not None and r.status == "graded" for r in rows),
           "search_seconds": elapsed, "winner": None, "models": models}
    if winner is not None:
        held = winner.held_out["mean_dice"]
        out["winner"] = {"name": winner.name, "spec": winner.spec, "commands": winner.commands,
                         "speedup_same_engine": winner.speed["speedup_same_engine"],
                         "speedup_vs_torch": winner.speed["speedup_vs_torch"],
                         "runs_on": winner.speed["variant"], "seconds_per_patch": winner.speed["seconds"],
                         "dice_choose": winner.choose["mean_dice"], "dice_held_out": held,
                         "dice_drop_choose": parent_dice - winner.choose["mean_dice"],
                         "dice_drop_held_out": parent.held_out["mean_dice"] - held}
    out["final_line"] = final_line(out)
    return out


def _model(row, parent, budget: float) -> dict:
    speed = row.speed or {}
    dice = (row.choose or {}).get("mean_dice")
    drop = parent.choose["mean_dice"] - dice if dice is not None else None
    return {"name": row.name, "spec": row.spec, "status": row.status, "error": row.error,
            "runs_on": speed.get("variant"), "seconds_per_patch": speed.get("seconds"),
            "parent_engine_seconds": speed.get("parent_engine_seconds"),
            "parent_torch_seconds": speed.get("parent_torch_seconds"),
            "speedup_same_engine": speed.get("speedup_same_engine"), "speedup_vs_torch": speed.get("speedup_vs_torch"),
            "dice_choose": dice, "dice_drop_choose": drop,
            "within_budget": None if drop is None else bool(drop <= budget + 1e-9),
            "dice_held_out": (row.held_out or {}).get("mean_dice"), "dice_per_class_choose":
            (row.choose or {}).get("dice_per_class"), "build_seconds": row.build_seconds,
            "commands": row.commands, "resumed": row.resumed, "fine_tuned_from": row.fine_tuned_from}


def final_line(s: dict) -> str:
    w = s["winner"]
    if s["verdict"] == WINNER:
        return (f"winner {w['spec']}: {w['speedup_same_engine']:.2f}x faster per patch than the parent on the same "
                f"engine ({w['runs_on']}), {w['speedup_vs_torch']:.2f}x vs the parent on plain torch; Dice drop "
                f"{w['dice_drop_held_out']:+.4f} on {len(s['held_out_cases'])} held-out case(s) (budget "
                f"{s['max_dice_drop']:g}, against {'labels' if s['labelled'] else 'the parent (label-free)'}); model "
                f"folder {s['output']}")
    stopped = (f" (the time budget stopped the search after {s['stopped_by_time_budget_after']} of "
               f"{s['candidates_total']} candidates)" if s["stopped_by_time_budget_after"] is not None else "")
    if s["verdict"] == HELD_OUT_VETO:
        return (f"no winner: the fastest candidate within the budget on the choosing cases, {w['spec']}, lost "
                f"{w['dice_drop_held_out']:+.4f} Dice on the held-out cases (budget {s['max_dice_drop']:g}); the "
                f"parent {s['parent']} stays the answer{stopped}; pass more quality cases or a larger budget. "
                f"{s['output']} holds the report only")
    return (f"no winner: no candidate kept the Dice within {s['max_dice_drop']:g} of the parent's on the choosing "
            f"cases ({s['candidates_graded']} of {s['candidates_total']} graded){stopped}; the parent "
            f"{s['parent']} stays the answer; {s['output']} holds the report only")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(s: dict) -> str:
    lines = [f"# nnunet-compress auto: {s['parent']}", "", f"**{s['final_line']}**", "",
             f"Budget: mean foreground Dice within {s['max_dice_drop']:g} of the parent's. Quality data: "
             f"{s['quality_data']}; Dice against {s['graded_against']}. Candidates are ranked on "
             f"{len(s['choosing_cases'])} choosing case(s) ({', '.join(s['choosing_cases'])}); the winner is graded "
             f"on {len(s['held_out_cases'])} held-out case(s) ({', '.join(s['held_out_cases'])}) that played no part "
             f"in the choice. Parent Dice: {_fmt(s['parent_dice_choose'])} (choosing), "
             f"{_fmt(s['parent_dice_held_out'])} (held-out)." + (
                 f" Fine-tuning: {s['fine_tuned_by']}" + (f" ({', '.join(s['fine_tune_cases'])}, never chosen or "
                                                          f"graded on)" if s.get('fine_tune_cases') else "") + "."
                 if s.get("fine_tuned_by") else ""), "",
             "Seconds per patch are medians of side-by-side runs on this machine's CPU: each model as nnU-Net's "
             "predictor runs it here, beside the parent on the CPU engine in f32 (\"same engine\": what "
             "`nnunet-compress convert` gives without compression, so INT8 counts as the candidate's gain) and on "
             "plain torch. The winner is the candidate with the largest same-engine speed-up within the budget: "
             "ratios measured side by side cancel the shared machine's load, raw seconds of candidates timed "
             "minutes apart do not.", "",
             f"Search time: {s['search_seconds'] / 60:.1f} min; {s['candidates_graded']} of "
             f"{s['candidates_total']} candidates graded.", "",
             f"![Pareto plot]({PLOT})", "",
             "| model | status | runs on | s/patch | × same engine | × torch | Dice (choosing) | drop | within | "
             "Dice before fine-tuning | Dice (held-out) |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for m in s["models"]:
        status = m["status"] if not m["error"] else f"{m['status']}: {m['error']}"
        mark = " **(winner)**" if s["winner"] and s["verdict"] == WINNER and m["name"] == s["winner"]["name"] else ""
        within = "" if m["within_budget"] is None else ("yes" if m["within_budget"] else "no")
        lines.append(f"| `{m['spec']}`{mark} | {status} | {m['runs_on'] or '–'} | {_fmt(m['seconds_per_patch'])} | "
                     f"{_fmt(m['speedup_same_engine'], 2)} | {_fmt(m['speedup_vs_torch'], 2)} | "
                     f"{_fmt(m['dice_choose'])} | {_fmt(m['dice_drop_choose'])} | {within} | "
                     f"{_fmt(m.get('dice_before_fine_tune'))} | {_fmt(m['dice_held_out'])} |")
    lines += ["", "## Commands that rebuild each candidate", ""]
    for m in s["models"][1:]:
        lines += [f"- `{m['spec']}`:", "", "  ```", *[f"  {c}" for c in m["commands"]], "  ```"]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("name", "spec", "status", "error", "runs_on", "seconds_per_patch", "seconds_normalised", "parent_engine_seconds",
              "parent_torch_seconds", "speedup_same_engine", "speedup_vs_torch", "dice_choose", "dice_drop_choose",
              "within_budget", "dice_before_fine_tune", "dice_held_out", "build_seconds", "fine_tuned_from",
              "commands")


def csv_text(s: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for m in s["models"]:
        writer.writerow({**m, "commands": " && ".join(m["commands"])})
    return buf.getvalue()


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in s["models"] if m.get("seconds_normalised") is not None and m["dice_choose"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    points = [(m["seconds_normalised"] * 1e3, m["dice_choose"]) for m in models]
    for m, (x, y) in zip(models, points):
        parent = m["name"] == "parent"
        ax.scatter([x], [y], s=50, marker="s" if parent else "o", zorder=3,
                   color="black" if parent else ("tab:blue" if m["within_budget"] else "tab:grey"))
        ax.annotate(m["spec"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", linewidth=1,
                label="Pareto front", zorder=2)
    ax.axhline(s["parent_dice_choose"] - s["max_dice_drop"], color="tab:orange", linestyle="--", linewidth=1,
               label=f"budget: parent − {s['max_dice_drop']:g}")
    if s["winner"] and s["verdict"] == WINNER:
        w = next(m for m in models if m["name"] == s["winner"]["name"])
        ax.scatter([w["seconds_normalised"] * 1e3], [w["dice_choose"]], s=260, marker="*", color="tab:green",
                   zorder=4, label=f"winner: {w['spec']}")
    ax.set_xlabel("ms per patch on this machine's CPU (parent: as nnU-Net runs it; candidates: the parent's "
                  "engine time / side-by-side speed-up)", fontsize=8)
    ax.set_xscale("log")  # the parent on torch is often ten times slower than every candidate on the engine
    ax.set_ylabel("mean foreground Dice, choosing cases")
    ax.set_title("auto: speed vs Dice of every candidate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(folder: Path, s: dict) -> None:
    """auto_report.{json,csv,md} and the plot in `folder`, each file written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_file(folder / PLOT, lambda tmp: plot(s, tmp.with_suffix(".png")) or
                      tmp.with_suffix(".png").replace(tmp))
    atomic_write_file(folder / f"{STEM}.csv", lambda tmp: tmp.write_text(csv_text(s)))
    atomic_write_file(folder / f"{STEM}.md", lambda tmp: tmp.write_text(markdown(s)))
    atomic_write_file(folder / f"{STEM}.json", lambda tmp: tmp.write_text(json.dumps(_json_safe(s), indent=2)))


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return o
