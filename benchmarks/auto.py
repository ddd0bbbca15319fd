"""``nnunet-compress auto`` on the demo's model, once per seed: how fast is the winner, and what Dice does it lose?

Each seed ``s`` uses the workspace of ``benchmarks/stability.py`` (``WORKDIR/seed_s``: the demo's synthetic cases
and base model of that seed; only the base is trained where the workspace has none), and runs

    nnunet-compress auto BASE -o WORKDIR/seed_s/auto/best --dataset 501 --max-dice-drop D

on the CPU engine: candidates graded on the validation cases of fold 0 in nnU-Net's ``splits_final.json`` (half of
them to choose on, half held out). Per seed it records the winner, its speed-up per patch against the base on the
same engine and on plain torch, its Dice drop on the held-out cases and the search's minutes; over seeds the mean
± standard deviation (a parent answer counts as speed-up 1 and drop 0). A seed whose search already finished is
read again from its report, so an interrupted benchmark resumes where it stopped.

    python -m benchmarks.auto                            # 5 seeds, the default search
    python -m benchmarks.auto --seeds 0 --tag smoke      # one seed
    python -m benchmarks.auto --candidates tucker:ratio=0.5 l1:flops=0.3 --seeds 0 --tag two
    python -m benchmarks.auto --fine-tune-epochs 8 --tag ft   # fine-tune the frontier (8 x 25 iterations)

Writes ``benchmarks/results/auto[_<tag>].json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "stability",
                   help="the seeds' workspaces (benchmarks/stability.py's layout)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--max-dice-drop", type=float, default=0.01)
    p.add_argument("--candidates", nargs="+", help="passed to auto --candidates (default: auto's own search)")
    p.add_argument("--time-budget", type=float, help="passed to auto --time-budget (minutes)")
    p.add_argument("--fine-tune-epochs", type=int, help="passed to auto --fine-tune-epochs")
    p.add_argument("--fine-tune-iterations", type=int, default=25,
                   help="passed to auto --fine-tune-iterations (25, the demo's fine-tuning iterations per epoch)")
    p.add_argument("--fine-tune-count", type=int, default=2, help="passed to auto --fine-tune-count (2)")
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def base_model(seed_root: Path, seed: int):
    """The seed's workspace and base model folder (trained here only where the workspace has none)."""
    from nnunet_compress.demo import tiny

    ws = tiny.default_workspace(seed_root)
    tiny.prepare_dataset(ws, seed=seed)
    folder = ws.model_folder()
    if not tiny.checkpoint_path(folder).is_file():
        print(f"[auto-bench] seed {seed}: training the base model in {seed_root}", flush=True)
        tiny.train(ws)
    return ws, folder


def run_seed(args, seed: int) -> dict:
    seed_root = args.workdir / f"seed_{seed}"
    ws, base = base_model(seed_root, seed)
    out = seed_root / "auto" / f"best{'_' + args.tag if args.tag else ''}"
    report = out / "auto_report.json"
    t = time.time()
    if not report.is_file():
        work = out.parent / f"{out.name}_auto_work"
        argv = ["auto", str(base), "-o", str(out), "--dataset", str(ws.dataset_id), "--max-dice-drop",
                str(args.max_dice_drop), "--quiet"]
        if work.is_dir():
            argv.append("--resume")
        if args.candidates:
            argv += ["--candidates", *args.candidates]
        if args.time_budget:
            argv += ["--time-budget", str(args.time_budget)]
        if args.fine_tune_epochs:
            argv += ["--fine-tune-epochs", str(args.fine_tune_epochs), "--fine-tune-iterations",
                     str(args.fine_tune_iterations), "--fine-tune-count", str(args.fine_tune_count)]
        env = {**ws.env(), "NNUNET_COMPRESS_CPU_ENGINE": os.environ.get("NNUNET_COMPRESS_CPU_ENGINE", "openvino")}
        print(f"[auto-bench] seed {seed}: nnunet-compress {' '.join(argv)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "nnunet_compress.cli", *argv], env=env)
        if proc.returncode != 0:
            raise SystemExit(f"auto failed for seed {seed} (exit {proc.returncode})")
    s = json.loads(report.read_text())
    w = s["winner"] if s["verdict"] == "winner" else None
    return {"seed": seed, "verdict": s["verdict"], "winner": w["spec"] if w else None,
            "runs_on": w["runs_on"] if w else None,
            "speedup_same_engine": w["speedup_same_engine"] if w else 1.0,
            "speedup_vs_torch": w["speedup_vs_torch"] if w else None,
            "dice_drop_held_out": w["dice_drop_held_out"] if w else 0.0,
            "dice_drop_choose": w["dice_drop_choose"] if w else 0.0,
            "parent_dice_held_out": s["parent_dice_held_out"], "held_out_cases": len(s["held_out_cases"]),
            "candidates_graded": s["candidates_graded"], "candidates_total": s["candidates_total"],
            "search_minutes": s["search_seconds"] / 60, "wall_minutes_this_run": (time.time() - t) / 60,
            "final_line": s["final_line"]}


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("speedup_same_engine", "speedup_vs_torch", "dice_drop_held_out", "search_minutes"):
        m, sd = mean_sd([r[key] for r in runs])
        out[key] = {"mean": m, "sd": sd, "worst": (min if key.startswith("speedup") else max)(
            [r[key] for r in runs if r[key] is not None], default=None)}
    return out


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(results: dict) -> str:
    s = results["summary"]
    lines = [f"# nnunet-compress auto on the demo model, {len(results['runs'])} seed(s)", "",
             f"Budget: mean foreground Dice within {results['max_dice_drop']:g} of the base on held-out cases "
             f"(validation cases of fold 0 not used to choose). Candidates: "
             f"{' '.join(results['candidates']) if results['candidates'] else 'the default search'}.", "",
             "| seed | winner | runs on | × same engine | × torch | Dice drop (held-out) | held-out cases | "
             "graded | minutes |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['seed']} | {r['winner'] or 'parent (' + r['verdict'] + ')'} | {r['runs_on'] or '–'} | "
                     f"{fmt(r['speedup_same_engine'], 2)} | {fmt(r['speedup_vs_torch'], 2)} | "
                     f"{fmt(r['dice_drop_held_out'], 4)} | {r['held_out_cases']} | "
                     f"{r['candidates_graded']}/{r['candidates_total']} | {fmt(r['search_minutes'], 1)} |")
    lines += ["", "| over seeds | mean | ± sd | worst |", "|---|---:|---:|---:|"]
    for key, label in (("speedup_same_engine", "speed-up vs base, same engine"),
                       ("speedup_vs_torch", "speed-up vs base, plain torch"),
                       ("dice_drop_held_out", "Dice drop, held-out"), ("search_minutes", "search minutes")):
        lines.append(f"| {label} | {fmt(s[key]['mean'], 3)} | {fmt(s[key]['sd'], 3)} | {fmt(s[key]['worst'], 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("auto" + (f"_{args.tag}" if args.tag else ""))
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        print(f"[auto-bench] seed {seed}: {runs[-1]['final_line']}", flush=True)
        results = {"max_dice_drop": args.max_dice_drop, "candidates": args.candidates, "seeds": args.seeds,
                   "runs": runs, "summary": summarise(runs)}
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
