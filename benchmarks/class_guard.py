"""The class guard in Sauron from scratch: off, judging every class present, and judging learned classes only.

Sauron's main mode trains from random weights while it prunes. In the first epochs a class's pseudo Dice is noise
(0.039 one epoch, 0.005 the next), and a guard that judges every class present undoes removals on it and then
protects their filters for good. This benchmark trains Sauron from scratch on the demo's synthetic data, once per
seed and guard rule, and compares what each run ends with:

- ``off``: ``--class-guard 0``;
- ``every class present``: ``--class-guard-floor 0 --class-guard-noise-epochs 0 --class-guard-release 0`` (a class
  counts when its pseudo Dice before the step is above 0; protection only ends if the class recovers past its
  noise, and without a noise estimate it never does: every class present is judged, learned or not);
- ``learned classes``: the defaults (floor 0.3, noise over 5 validations, release after 5 epochs or on recovery).

Each seed ``s`` has its own workspace (``WORKDIR/seed_s``: the demo's synthetic cases of seed ``s``, nnU-Net's
planning and preprocessing, the tiny plans), and every run is seeded (``--seed 12345 + s`` in the plans, data
loading in the training process), so a run repeats exactly and the three rules of a seed see the same batches
until their networks differ. A run that already has its final checkpoint is not trained again.

    python -m benchmarks.class_guard                      # 5 seeds × 3 rules
    python -m benchmarks.class_guard --seeds 0 --tag smoke

Per run: the final FLOPs per patch as a share of the unpruned network's, the mean foreground Dice and the lowest
class Dice on the dataset's held-out cases (nnU-Net's predictor and evaluation), the number of removals the guard
undid, and the class falls it reported without judging them. Writes ``benchmarks/results/class_guard[_<tag>].json``
/ ``.md`` after every run. The default schedule (8 epochs of 5 iterations) is the aims' scale: about 47 minutes
for 5 seeds × 3 rules on 2 shared cores, too short for any class to be learned from random weights, so it measures
what each rule lets Sauron prune, not how well the result segments; pass ``--epochs`` and
``--iterations-per-epoch`` for a schedule that learns the classes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK

# the rules compared: name -> `plan sauron` options
RULES = {
    "off": ["--class-guard", "0"],
    "every class present": ["--class-guard-floor", "0", "--class-guard-noise-epochs", "0",
                            "--class-guard-release", "0"],
    "learned classes": [],
}

# the aims: from scratch, the learned-class rule ends within this share of the FLOPs of the guard off...
MAX_FLOPS_GAP = 0.03
# ...and no class of a run ends below this Dice
MIN_CLASS_DICE = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=WORK / "class_guard")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iterations-per-epoch", type=int, default=5)
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2, help="from scratch: nnU-Net's own initial learning rate")
    p.add_argument("--sauron", nargs=argparse.REMAINDER, default=["--tau-start", "0.5", "--tau-max", "0.6",
                                                                  "--kappa", "2", "--rho", "1"],
                   help="Sauron's options (last on the command line; default: the thresholds the aims were set for)")
    p.add_argument("--tag", default="")
    p.add_argument("--from-json", type=Path, help="rewrite the table from this JSON (nothing is trained)")
    return p.parse_args(argv)


def plans_name(rule: str) -> str:
    from nnunet_compress.demo import tiny
    return f"{tiny.TINY_PLANS}_sauron_scratch_" + rule.replace(" ", "_")


def train_rule(ws, rule: str, seed: int, args) -> Path:
    """`plan sauron` with the rule's options, then `nnUNetv2_train -tr nnUNetTrainerSauron` from random weights."""
    from nnunet_compress.demo import tiny
    name = plans_name(rule)
    folder = ws.model_folder("nnUNetTrainerSauron", name)
    if tiny.checkpoint_path(folder).exists():
        return folder
    tiny.run_compress(["plan", "sauron", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                       "--plans-name", name, "--epochs", str(args.epochs),
                       "--iterations-per-epoch", str(args.iterations_per_epoch),
                       "--val-iterations", str(args.val_iterations), "--lr", str(args.lr), "--augmentation", "none",
                       "--seed", str(12345 + seed), "--overwrite", *RULES[rule], *args.sauron], ws.env())
    return tiny.train(ws, name, "nnUNetTrainerSauron")


def run_record(ws, rule: str, seed: int, folder: Path, minutes: float) -> dict:
    """What one run ended with: FLOPs share, Dice on the held-out cases, the guard's undos and unguarded falls."""
    from nnunet_compress.demo import tiny
    report = json.loads((folder / "fold_0" / "pruning_report.json").read_text())
    output = ws.root / "predictions" / plans_name(rule)
    dice = tiny.dice_scores(ws, tiny.predict_folder(ws, folder, output))
    return {"seed": seed, "rule": rule, "flops_share": report["final_cost"]["flops"] / report["start_cost"]["flops"],
            "gflops": report["final_cost"]["flops"] / 1e9, "dice": dice["mean_foreground"],
            "dice_per_class": dice["per_class"], "worst_class": min(dice["per_class"].values()),
            "undos": len(report.get("rollbacks", [])),
            "released": sum(1 for r in report.get("rollbacks", []) if r.get("released")),
            "unguarded_falls": sum(len(u["classes"]) for u in report.get("unguarded_drops", [])),
            "rollbacks": report.get("rollbacks", []), "minutes": minutes}


def summarise(runs: list[dict]) -> list[dict]:
    """Per rule: mean ± std and extremes over the seeds, and the FLOPs gap to the guard off in the same seed."""
    off = {r["seed"]: r["flops_share"] for r in runs if r["rule"] == "off"}
    summary = []
    for rule in [r for r in RULES if any(run["rule"] == r for run in runs)]:
        rows = [r for r in runs if r["rule"] == rule]
        gaps = [r["flops_share"] - off[r["seed"]] for r in rows if r["seed"] in off]
        summary.append({
            "rule": rule, "seeds": [r["seed"] for r in rows],
            "flops_share": {"mean": statistics.fmean(r["flops_share"] for r in rows),
                            "max": max(r["flops_share"] for r in rows)},
            "flops_gap_to_off": {"mean": statistics.fmean(gaps), "max": max(gaps)} if gaps else None,
            "dice": {"mean": statistics.fmean(r["dice"] for r in rows),
                     "std": statistics.pstdev(r["dice"] for r in rows)},
            "worst_class": min(r["worst_class"] for r in rows),
            "undos": sum(r["undos"] for r in rows), "released": sum(r["released"] for r in rows),
            "unguarded_falls": sum(r["unguarded_falls"] for r in rows),
        })
    return summary


def table(runs: list[dict], summary: list[dict]) -> str:
    lines = ["| rule | seeds | FLOPs share, mean (max) | vs guard off, mean (max) | mean Dice, mean ± std | "
             "worst class | undos (released) | unguarded falls |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        gap = s["flops_gap_to_off"]
        gap_text = f"{gap['mean']:+.3f} ({gap['max']:+.3f})" if gap else "–"
        lines.append(f"| {s['rule']} | {len(s['seeds'])} | {s['flops_share']['mean']:.3f} "
                     f"({s['flops_share']['max']:.3f}) | {gap_text} | {s['dice']['mean']:.3f} ± "
                     f"{s['dice']['std']:.3f} | {s['worst_class']:.3f} | {s['undos']} ({s['released']}) | "
                     f"{s['unguarded_falls']} |")
    lines += ["", "| seed | rule | FLOPs share | mean Dice | worst class | undos | minutes |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["seed"], list(RULES).index(r["rule"]))):
        lines.append(f"| {r['seed']} | {r['rule']} | {r['flops_share']:.3f} | {r['dice']:.3f} | "
                     f"{r['worst_class']:.3f} | {r['undos']} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def aims(summary: list[dict]) -> list[str]:
    lines = []
    for s in summary:
        if s["rule"] == "off" or not s["flops_gap_to_off"]:
            continue
        gap, ok_gap = s["flops_gap_to_off"]["max"], s["flops_gap_to_off"]["max"] <= MAX_FLOPS_GAP
        ok_class = s["worst_class"] >= MIN_CLASS_DICE
        lines.append(f"{s['rule']}: largest FLOPs gap to the guard off {gap:+.3f} ({'ok' if ok_gap else 'MISSED'}: "
                     f"aim <= {MAX_FLOPS_GAP}); worst class {s['worst_class']:.3f} "
                     f"({'ok' if ok_class else 'MISSED'}: aim >= {MIN_CLASS_DICE})")
    return lines


def write(results: dict, stem: Path) -> str:
    results["summary"] = summarise(results["runs"])
    results["aims"] = aims(results["summary"])
    text = table(results["runs"], results["summary"]) + "\n\n" + "\n".join(f"- {a}" for a in results["aims"]) + "\n"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> dict:
    from nnunet_compress.demo import tiny
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("class_guard" + (f"_{args.tag}" if args.tag else ""))
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        print(write(results, stem))
        return results
    t0 = time.time()
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k != "from_json"}, "runs": []}
    for seed in args.seeds:
        ws = tiny.default_workspace(args.workdir / f"seed_{seed}")
        os.environ.update(ws.env())  # in-process steps read nnU-Net's folders from the environment like the CLI
        tiny.prepare_dataset(ws, seed=seed)
        for rule in args.rules:
            t = time.time()
            print(f"[class_guard] seed {seed}, {rule}: Sauron from scratch in {ws.root}", flush=True)
            folder = train_rule(ws, rule, seed, args)
            results["runs"].append(run_record(ws, rule, seed, folder, (time.time() - t) / 60))
            results["minutes"] = (time.time() - t0) / 60
            text = write(results, stem)
        print(f"[class_guard] after seed {seed}:\n{text}", flush=True)
    print(f"[class_guard] {results['minutes']:.1f} min; wrote {stem}.json/.md")
    return results


if __name__ == "__main__":
    main()
