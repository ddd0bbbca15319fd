"""How much do the demo's results move from one seed to the next? The whole demo, once per seed, side by side.

One demo run is one draw: the synthetic cases, the base training, the fine-tuning and the pruning choices all
depend on random numbers. A row that looked fine once can lose a class in the next run (a Taylor run did), so the
figures the README reports are the mean ± standard deviation over seeds and the worst run, per method and per class.

Each seed ``s`` runs ``nnunet-compress demo --seed s`` in its own workspace (``WORKDIR/seed_s``): new synthetic
cases, base training seeded with ``tiny.TRAINING_SEED + s``, fine-tuning and pruning seeded with ``s`` (Sauron's
reference channels with ``12345 + s``), data loading in the training process, so every seed repeats exactly. A
workspace that already holds a model is reused, so an interrupted run resumes where it stopped.

    python -m benchmarks.stability                         # 5 seeds, about 38 min per seed on 2 cores
    python -m benchmarks.stability --seeds 0 1 --tag smoke  # a quick look
    python -m benchmarks.stability --rerun sauron           # Sauron retrained with the current code, every other
                                                            # row taken from the last stability.json

The demo grades its models on the dataset's 4 held-out cases, so part of the spread over seeds is the luck of
which 4 cases were drawn (the base model's own mean Dice moves by ~0.03 from seed to seed). Every model is also
graded on ``--held-out-cases`` cases (default 16: those 4 and 12 new cases of the same seed, none of them seen in
training or fine-tuning), reported as a second table; both tables are checked against the aims.

Writes ``benchmarks/results/stability[_<tag>].json`` / ``.md`` and a plot (``.png``: mean foreground Dice per
method, one dot per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK, cpu_model

# the aims (spread over seeds, worst class), checked and printed for the fine-tuned rows
MIN_CLASS_DICE = 0.5
MAX_STD = 0.03

# new held-out cases are numbered from here: past the dataset's cases (0-15) and the demo's unlabelled scans
# (1000-1011), so no model has seen them
FIRST_NEW_HELD_OUT_CASE = 2000

# the demo's methods that --rerun can train again (nnunet_compress.demo.run): (trainer, plans) of their demo model,
# and their one-shot models (WORKSPACE/compressed/<name>), made again too because the same pruning code makes them
RERUNNABLE = {"taylor": ("nnUNetTrainerTaylorPruning", "nnUNetPlans_tiny_taylorF0.5", ["l1_F0.5"]),
              "sauron": ("nnUNetTrainerSauron", "nnUNetPlans_tiny_sauron_demo", [])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=WORK / "stability")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fast", action="store_true", help="the demo's --fast (shorter training)")
    p.add_argument("--tag", default="")
    p.add_argument("--held-out-cases", type=int, default=16,
                   help="grade every model on this many held-out cases as well: the dataset's own and new ones of "
                        "the same seed (0: the demo's cases only)")
    p.add_argument("--from-json", type=Path,
                   help="rewrite the table, aims and plot from the runs in this stability JSON (no demo is run)")
    p.add_argument("--rerun", nargs="+", choices=sorted(RERUNNABLE),
                   help="after a change to these methods: delete their demo models (one-shot ones included) in each "
                        "seed's workspace, train them again with the current code and grade them; every other row "
                        "comes from --previous")
    p.add_argument("--previous", type=Path,
                   help="with --rerun: the stability JSON whose other rows are kept (default: the one this run "
                        "writes, benchmarks/results/stability[_<tag>].json)")
    return p.parse_args(argv)


def is_fine_tuned(model: str) -> bool:
    """Rows whose model was trained after compression (the aims about lost classes apply to those)."""
    return " + " in model or model.startswith("Sauron")  # "+ fine-tuning", "+ label-free distill", Sauron


def summarise(runs: dict[int, list[dict]], grading: str = "") -> list[dict]:
    """Per demo row: mean, std and minimum of the mean foreground Dice and of each class's Dice over the seeds.

    `grading` picks which Dice of a run: "" the demo's (its held-out cases), "_held_out" the larger held-out set.
    """
    dice_key, class_key = "dice" + grading, "dice_per_class" + grading
    models = [r["model"] for r in next(iter(runs.values()))]
    base = {seed: next(r[dice_key] for r in rows if r["model"] == "base") for seed, rows in runs.items()}
    summary = []
    for model in models:
        rows = [next(r for r in rows if r["model"] == model) for rows in runs.values()]
        means = [r[dice_key] for r in rows]
        # each seed draws new cases, so the base model's own Dice moves too: the change against that seed's base is
        # what the method is responsible for
        deltas = [r[dice_key] - base[seed] for seed, r in zip(runs, rows)]
        classes = sorted(rows[0][class_key], key=lambda c: int(c) if str(c).isdigit() else str(c))
        per_class = {}
        for c in classes:
            values = [r[class_key][c] for r in rows]
            per_class[c] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values)}
        summary.append({
            "model": model, "fine_tuned": is_fine_tuned(model), "seeds": list(runs),
            "mean_dice": {"mean": statistics.fmean(means), "std": statistics.pstdev(means), "min": min(means),
                          "per_seed": means},
            "vs_base": {"mean": statistics.fmean(deltas), "std": statistics.pstdev(deltas), "min": min(deltas),
                        "per_seed": deltas},
            "per_class": per_class,
            "lowest_class_dice": min(v["min"] for v in per_class.values()),
            "params": rows[0]["params"], "gflops": statistics.fmean(r["gflops"] for r in rows),
        })
    return summary


def aims(summary: list[dict]) -> list[str]:
    base = next(s for s in summary if s["model"] == "base")
    lines = []
    for s in summary:
        if not s["fine_tuned"]:
            continue
        m = s["mean_dice"]
        ok_class = s["lowest_class_dice"] >= MIN_CLASS_DICE
        ok_std = m["std"] <= MAX_STD
        lines.append(f"{s['model']}: lowest class Dice over runs {s['lowest_class_dice']:.3f} "
                     f"({'ok' if ok_class else 'MISSED'}: aim >= {MIN_CLASS_DICE}), std of the mean {m['std']:.3f} "
                     f"({'ok' if ok_std else 'MISSED'}: aim <= {MAX_STD}), mean {m['mean']:.3f} vs base "
                     f"{base['mean_dice']['mean']:.3f} ({m['mean'] - base['mean_dice']['mean']:+.3f}; per seed against "
                     f"that seed's base {s['vs_base']['mean']:+.3f} ± {s['vs_base']['std']:.3f}, worst "
                     f"{s['vs_base']['min']:+.3f})")
    return lines


def table(summary: list[dict]) -> str:
    classes = list(summary[0]["per_class"])
    n = len(summary[0]["seeds"])
    head = (f"| model (over {n} seeds) | mean Dice, mean ± std | min over runs | vs that seed's base, mean ± std (worst) | "
            + " | ".join(f"class {c}: mean ± std (min)" for c in classes) + " | GFLOPs |")
    lines = [head, "|---|---:|---:|---:|" + "---:|" * (len(classes) + 1)]
    for s in summary:
        m = s["mean_dice"]
        cells = [f"{v['mean']:.3f} ± {v['std']:.3f} ({v['min']:.3f})" for v in s["per_class"].values()]
        d = s["vs_base"]
        lines.append(f"| {s['model']} | {m['mean']:.3f} ± {m['std']:.3f} | {m['min']:.3f} | "
                     f"{d['mean']:+.3f} ± {d['std']:.3f} ({d['min']:+.3f}) | " + " | ".join(cells)
                     + f" | {s['gflops']:.3f} |")
    return "\n".join(lines)


def plot(summaries: list[tuple[list[dict], str]], path: Path) -> None:
    """Mean foreground Dice per method, one dot per seed, for each grading (side by side, one colour each)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [s["model"] for s in summaries[0][0]]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(models)), 4.5))
    width = 0.3 if len(summaries) > 1 else 0.0
    for k, ((summary, label), colour) in enumerate(zip(summaries, ["tab:blue", "tab:orange"])):
        offset = (k - (len(summaries) - 1) / 2) * width
        for i, s in enumerate(summary):
            values = s["mean_dice"]["per_seed"]
            ax.scatter([i + offset] * len(values), values, color=colour, alpha=0.6, zorder=3,
                       label=label if i == 0 else None)
            ax.errorbar(i + offset, s["mean_dice"]["mean"], yerr=s["mean_dice"]["std"], fmt="_", color="black",
                        capsize=5, zorder=4)
    ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("mean foreground Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"Demo over {len(summaries[0][0][0]['seeds'])} seeds: one dot per run, mean ± std")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradings(results: dict) -> list[tuple[str, str]]:
    """(key suffix, title) of each grading the runs carry: the demo's own, and the larger held-out set if any."""
    out = [("", "the demo's held-out cases (4 per seed)")]
    if results.get("held_out_cases"):
        out.append(("_held_out", f"{results['held_out_cases']} held-out cases per seed"))
    return out


def add_summaries(results: dict) -> dict:
    for suffix, _ in gradings(results):
        results["summary" + suffix] = summarise(results["runs"], suffix)
        results["aims" + suffix] = aims(results["summary" + suffix])
    return results


def machine() -> dict:
    """What the seeds ran on: Dice does not depend on it, the minutes per seed do."""
    import openvino
    import torch
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "openvino": openvino.__version__}


def write(results: dict, stem: Path) -> str:
    """The table, aims and plot of the seeds finished so far (rewritten after every seed: a long run reports early)."""
    parts = []
    m = results.get("settings", {}).get("machine")
    if m:
        minutes = results.get("minutes_per_seed", {})
        parts.append(f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, OpenVINO {m['openvino']}; "
                     f"minutes per seed: {', '.join(f'{k}: {v:.1f}' for k, v in minutes.items())}.\n")
    for suffix, title in gradings(results):
        parts.append(f"Graded on {title}:\n\n" + table(results["summary" + suffix]) + "\n\n"
                     + "\n".join(f"- {a}" for a in results["aims" + suffix]) + "\n")
    text = "\n".join(parts)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(text)
    plot([(results["summary" + suffix], title) for suffix, title in gradings(results)], stem.with_suffix(".png"))
    return text


def grade_on_more_cases(seed_root: Path, seed: int, rows, num_cases: int) -> dict[str, dict]:
    """Each demo model's Dice on `num_cases` held-out cases: the dataset's own test cases and new ones.

    The cases are written once per workspace (``held_out_<n>/``) and every model predicts them with nnU-Net's
    predictor, as the demo does on its own four; returns {model: tiny.dice_scores(...)}.
    """
    from nnunet_compress.demo import tiny
    from nnunet_compress.nnunet.model_folder import read_json
    from nnunet_compress.nnunet.synthetic import write_held_out_cases
    ws = tiny.default_workspace(seed_root)
    dataset = read_json(ws.raw_dataset / "dataset.json")
    own = list(range(dataset["numTraining"], dataset["numTraining"] + dataset["numTest"]))
    new = list(range(FIRST_NEW_HELD_OUT_CASE, FIRST_NEW_HELD_OUT_CASE + max(0, num_cases - len(own))))
    cases = seed_root / f"held_out_{num_cases}"
    if not cases.exists():
        write_held_out_cases(cases, seed, own + new)
    graded = {}
    for row in rows:
        name = re.sub(r"[^a-z0-9.]+", "_", row.model.lower()).strip("_")
        output = seed_root / f"predictions_held_out_{num_cases}" / name
        tiny.predict_folder(ws, Path(row.model_folder), output, input_folder=cases / "imagesTs")
        graded[row.model] = tiny.dice_scores(ws, output, reference_folder=cases / "labelsTs")
    return graded


def run_record(row, graded: dict | None) -> dict:
    """One demo row as the JSON stores it, with its grading on the larger held-out set if there is one."""
    record = {"model": row.model, "dice": row.dice, "dice_per_class": row.dice_per_class, "params": row.params,
              "gflops": row.gflops, "latency_ms": row.latency_ms}
    if graded is not None:
        record["dice_held_out"] = graded[row.model]["mean_foreground"]
        record["dice_per_class_held_out"] = graded[row.model]["per_class"]
    return record


def demo_rows_again(seed_root: Path, seed: int, methods: list[str], fast: bool) -> list:
    """The demo rows of `methods` with models trained anew by the checked-out code (existing ones deleted first;
    they live in this benchmark's own workspace, never in a user's folders)."""
    from nnunet_compress.demo import run as demo
    from nnunet_compress.demo import tiny
    ws = tiny.default_workspace(seed_root)
    if not tiny.checkpoint_path(ws.model_folder()).exists():
        raise SystemExit(f"error: {seed_root} has no trained base model; run the whole demo for seed {seed} first "
                         f"(python -m benchmarks.stability --seeds {seed})")
    os.environ.update(ws.env())  # the in-process steps read nnU-Net's folders from the environment like the CLI
    epochs = 20 if fast else tiny.BASE_EPOCHS
    rows = []
    for method in methods:
        trainer, plans, one_shot = RERUNNABLE[method]
        shutil.rmtree(ws.model_folder(trainer, plans), ignore_errors=True)
        for name in one_shot:
            shutil.rmtree(ws.root / "compressed" / name, ignore_errors=True)
        rows += getattr(demo, f"{method}_rows")(ws, ws.model_folder(), epochs, seed)
    return rows


def rerun(args, stem: Path, t0: float) -> dict:
    """--rerun: the listed methods' rows of every seed anew; the other rows as in the previous JSON."""
    source = args.previous or stem.with_suffix(".json")
    if not source.is_file():
        raise SystemExit(f"error: {source} does not exist; --rerun replaces rows of an earlier stability run "
                         f"(give it with --previous, or run without --rerun first)")
    previous = json.loads(source.read_text())
    runs = {int(seed): rows for seed, rows in previous["runs"].items()}
    missing = [s for s in args.seeds if s not in runs]
    if missing:
        raise SystemExit(f"error: {source} has no runs of seed(s) {missing}; run them whole first")
    minutes = {}
    for seed in args.seeds:
        t = time.time()
        seed_root = Path(previous["settings"]["workdir"]) / f"seed_{seed}"
        print(f"[stability] seed {seed}: {', '.join(args.rerun)} trained again in {seed_root}", flush=True)
        rows = demo_rows_again(seed_root, seed, args.rerun, previous["settings"].get("fast", False))
        cases = previous.get("held_out_cases")
        graded = grade_on_more_cases(seed_root, seed, rows, cases) if cases else None
        # through JSON, as the kept rows were: class keys become strings in both
        new = {r.model: json.loads(json.dumps(run_record(r, graded))) for r in rows}
        runs[seed] = [new.get(r["model"], r) for r in runs[seed]]
        minutes[seed] = (time.time() - t) / 60
        results = add_summaries({
            **{k: v for k, v in previous.items() if not k.startswith(("summary", "aims"))},
            "runs": runs, "rerun": {"methods": args.rerun, "seeds": args.seeds, "previous": str(source),
                                    "minutes_per_seed": minutes, "minutes": (time.time() - t0) / 60}})
        text = write(results, stem)
        print(f"[stability] after {len(minutes)} of {len(args.seeds)} seeds:\n{text}", flush=True)
    return results


def main(argv=None) -> dict:
    from nnunet_compress.demo.run import run_demo
    args = parse_args(argv)
    t0 = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("stability" + (f"_{args.tag}" if args.tag else ""))
    if args.from_json is not None:
        results = add_summaries(json.loads(args.from_json.read_text()))
        print(write(results, stem))
        return results
    if args.rerun:
        return rerun(args, stem, t0)
    runs, minutes = {}, {}
    for seed in args.seeds:
        t = time.time()
        seed_root = args.workdir / f"seed_{seed}"
        print(f"[stability] seed {seed}: nnunet-compress demo --seed {seed} --workdir {seed_root}", flush=True)
        rows = run_demo(seed_root, fast=args.fast, seed=seed)
        graded = None
        if args.held_out_cases:
            print(f"[stability] seed {seed}: every model on {args.held_out_cases} held-out cases", flush=True)
            graded = grade_on_more_cases(seed_root, seed, rows, args.held_out_cases)
        runs[seed] = [run_record(r, graded) for r in rows]
        minutes[seed] = (time.time() - t) / 60
        results = add_summaries({
            "settings": {"seeds": args.seeds, "fast": args.fast, "workdir": str(args.workdir), "machine": machine()},
            "held_out_cases": args.held_out_cases, "seeds_done": list(runs), "runs": runs,
            "minutes_per_seed": minutes, "minutes": (time.time() - t0) / 60})
        text = write(results, stem)
        print(f"[stability] after {len(runs)} of {len(args.seeds)} seeds:\n{text}", flush=True)
    print(f"[stability] {results['minutes']:.1f} min; wrote {stem}.json/.md/.png")
    return results


if __name__ == "__main__":
    main()
