"""Does INT8 keep the Dice? Each demo model against its INT8 twin, per class, over seeds.

    python -m benchmarks.int8_quality benchmarks/work/stability/seed_*      # demo workspaces, one per seed
    python -m benchmarks.int8_quality --stability benchmarks/results/stability.json  # its 16 held-out cases
    python -m benchmarks.int8_quality WORKSPACE --pair base:FOLDER:INT8_FOLDER [--pair ...] --dataset-id 501

The demo (``nnunet-compress demo``) quantises the base and the fine-tuned or pruned-while-training models
(``nnunet_compress.demo.run.int8_rows``) and grades every model on the held-out cases with nnU-Net's predictor;
its ``demo_summary.json`` holds the per-class Dice of each model and of its ``+ INT8`` row. This script pairs them
per seed and reports, per model, the mean foreground Dice change (INT8 − f32, mean ± std over seeds, and the worst
run) and the largest loss of any class in any run, against the aims: in every run, mean within 0.005 and no class
more than 0.02 lower.

``--stability FILE`` reads the runs of ``benchmarks.stability`` instead, graded on its larger held-out set (16
cases per seed: the demo's four decide too little for one class, where one hard case can move a class's mean by
0.05). ``--pair NAME:F32_FOLDER:INT8_FOLDER`` grades model folders of one workspace directly (the INT8 folder predicted
by nnU-Net's predictor in INT8, the f32 folder as nnU-Net runs it), for workspaces whose demo_summary.json has no
INT8 rows. Writes ``benchmarks/results/int8_quality[_<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from benchmarks.common import RESULTS

MAX_MEAN_DROP, MAX_CLASS_DROP = 0.005, 0.02  # aims: mean Dice change, largest class loss
SUFFIX = " + INT8"


def pairs_from_summary(workspace: Path) -> dict[str, tuple[dict, dict]]:
    """{model: (f32 row, INT8 row)} from a demo workspace's demo_summary.json."""
    rows = {r["model"]: r for r in json.loads((workspace / "demo_summary.json").read_text())}
    return {name[: -len(SUFFIX)]: (rows[name[: -len(SUFFIX)]], row) for name, row in rows.items()
            if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in rows}


def pairs_from_stability(results: dict) -> list[dict[str, tuple[dict, dict]]]:
    """Per seed, {model: (f32 row, INT8 row)} graded on the stability benchmark's larger held-out set."""
    out = []
    for seed, records in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        rows = {r["model"]: {"dice": r["dice_held_out"], "dice_per_class": r["dice_per_class_held_out"]}
                for r in records if "dice_held_out" in r}
        out.append({name[: -len(SUFFIX)]: (rows[name[: -len(SUFFIX)]], row) for name, row in rows.items()
                    if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in rows})
    return out


def pairs_from_folders(workspace: Path, dataset_id: int, specs: list[str]) -> dict[str, tuple[dict, dict]]:
    """{model: (f32 row, INT8 row)} by predicting each folder's held-out cases with nnU-Net's predictor."""
    from nnunet_compress.demo import tiny
    ws = tiny.default_workspace(workspace, dataset_id=dataset_id)
    os.environ.update(ws.env())
    out = {}
    for spec in specs:
        name, f32_folder, int8_folder = spec.split(":")
        rows = []
        for tag, folder in (("f32", f32_folder), ("int8", int8_folder)):
            pred = tiny.predict_folder(ws, Path(folder), ws.root / "int8_quality" / f"{name}_{tag}")
            dice = tiny.dice_scores(ws, pred)
            rows.append({"dice": dice["mean_foreground"], "dice_per_class": dice["per_class"]})
        out[name] = (rows[0], rows[1])
    return out


def summarise(per_seed: list[dict[str, tuple[dict, dict]]]) -> list[dict]:
    models = sorted({m for seed in per_seed for m in seed}, key=lambda m: (m != "base", m))
    table = []
    for model in models:
        changes, f32_dice, worst, worst_class = [], [], 0.0, None
        for seed in per_seed:
            if model not in seed:
                continue
            f32, q = seed[model]
            changes.append(q["dice"] - f32["dice"])
            f32_dice.append(f32["dice"])
            for label, value in f32["dice_per_class"].items():
                drop = value - q["dice_per_class"][label]
                if drop > worst:
                    worst, worst_class = drop, label
        table.append({"model": model, "runs": len(changes), "mean_f32": statistics.mean(f32_dice),
                      "mean_change": statistics.mean(changes),
                      "std_change": statistics.stdev(changes) if len(changes) > 1 else 0.0,
                      "worst_run_change": min(changes), "worst_class_drop": worst, "worst_class": worst_class,
                      "meets_aims": -min(changes) <= MAX_MEAN_DROP and worst <= MAX_CLASS_DROP})
    return table


def markdown(table: list[dict], sources: list[str]) -> str:
    lines = [f"INT8 − f32, mean foreground Dice on the held-out cases ({len(sources)} workspace(s)); aims: mean "
             f"within {MAX_MEAN_DROP} and no class more than {MAX_CLASS_DROP} lower, in every run.", "",
             "| model | runs | Dice f32 | Dice change, mean ± std | worst run | largest class loss (class) | aims |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['runs']} | {r['mean_f32']:.4f} | {r['mean_change']:+.4f} ± "
                     f"{r['std_change']:.4f} | {r['worst_run_change']:+.4f} | {r['worst_class_drop']:.4f} "
                     f"({r['worst_class']}) | {'met' if r['meets_aims'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspaces", type=Path, nargs="*")
    ap.add_argument("--stability", type=Path, help="stability.json of benchmarks.stability (its held-out cases)")
    ap.add_argument("--pair", action="append", default=[], help="NAME:F32_FOLDER:INT8_FOLDER (one workspace)")
    ap.add_argument("--dataset-id", type=int, default=500, help="the workspace's dataset (with --pair)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.stability is not None:
        results = json.loads(args.stability.read_text())
        per_seed = pairs_from_stability(results)
        args.workspaces = [Path(f"seed {s} ({results['held_out_cases']} held-out cases)") for s in sorted(
            results["runs"], key=int)]
    elif not args.workspaces:
        ap.error("give demo workspaces or --stability FILE")
    elif args.pair:
        per_seed = [pairs_from_folders(args.workspaces[0], args.dataset_id, args.pair)]
    else:
        per_seed = [pairs_from_summary(w) for w in args.workspaces]
    table = summarise(per_seed)
    text = markdown(table, [str(w) for w in args.workspaces])
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"int8_quality{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"workspaces": [str(w) for w in args.workspaces],
                                                     "pairs": args.pair, "rows": table}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
