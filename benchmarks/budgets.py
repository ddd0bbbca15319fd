"""Budgets that buy seconds: uniform ``--rank-ratio``, ``--target-flops`` and ``--target-latency`` at matched cost.

Three parts (``--parts``), each printed as a table and written to the JSON (``-o``), with a Pareto plot (Dice
against measured time) beside it:

* ``tucker`` — on the trained tiny nnU-Net of a demo workspace and its held-out cases (imagesTs): for each uniform
  ratio R (``--ratios``), the ratio itself, ``--target-flops`` at the ratio's FLOPs fraction and ``--target-latency``
  at the ratio's MEASURED time fraction, each written by ``compress_model_folder`` (the ``tucker`` command). Held-out
  foreground Dice without fine-tuning (``nnUNetv2_predict_from_modelfolder`` + nnU-Net's evaluation) and after the
  same short fine-tuning (``plan tucker --ranks`` with the variant's ranks + ``nnUNetv2_train -tr
  nnUNetTrainerTucker``, the demo's schedule). All variants' times are measured in ONE interleaved run against the
  base on the CPU engine (and on torch's CPU path, for reference).
* ``taylor`` — ``nnUNetTrainerTaylorPruning`` with ``--target-flops F`` (the demo's run, reused when the workspace
  has it) against ``--target-latency`` at that run's measured time fraction; same schedule; Dice and time.
* ``totalseg`` — TotalSegmentator's 1.5 mm architecture (random He weights: time depends on shapes only; the guard
  is off, since random weights have no output to protect) at ~9× fewer FLOPs: ``--rank-ratio``, ``--target-flops``
  and ``--target-latency`` at the ratio's measured time, one 96³ patch, measured interleaved against the original on
  OpenVINO and on torch.

Usage (a workspace made by the demo, base model trained; ``benchmarks/work/stability/seed_N`` are such)::

    python -m benchmarks.budgets WORKSPACE [--parts tucker taylor totalseg] [--ratios 0.75 0.5 0.25]
        [-o benchmarks/results/budgets.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nnunet_compress.budgets.timing import engine_in_use, patch_seconds
from nnunet_compress.costs import layer_io_shapes, patch_flops, total_macs
from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.model_folder import load_fold_network, open_model_folder, read_json
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import compress_model_folder, factorised_copy, select_ranks

MIN_RANK = 4  # the demo's --min-rank (the tiny network has 8-channel layers)


def quiet(_line: str) -> None:
    pass


# ---- tucker on the trained tiny model ---------------------------------------------------------------------------

def tucker_part(ws: tiny.TinyWorkspace, ratios: list[float], epochs: int, seed: int,
                latency_targets: list[float] | None = None) -> list[dict]:
    base_folder = ws.model_folder()
    out_root = ws.root / "budgets"
    folder = open_model_folder(base_folder, ["0"], "checkpoint_final.pth")
    net, _, configuration = load_fold_network(folder, "0")
    patch = tuple(folder.plans["configurations"][configuration]["patch_size"])
    rows: list[dict] = []

    def compress(name: str, policy: RankPolicy) -> dict:
        out = out_root / name
        t0 = time.time()
        if not (out / "compression_report.json").exists():
            compress_model_folder(base_folder, out, policy, ["0"], overwrite=True, progress=quiet)
        report = read_json(out / "compression_report.json")
        ranks = {r["name"]: tuple(r["ranks"]) for r in report["layers"]}
        row = {"name": name, "policy": report["policy"], "folder": str(out), "ranks": ranks,  # as written
               "flops_fraction": report["flops_after"] / report["flops_before"],
               "params_fraction": report["params_after"] / report["params_before"],
               "lowest_rank": min(min(r) for r in ranks.values()), "latency": report.get("latency"),
               "compress_seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"  {name}: {row['flops_fraction']:.3f} of the FLOPs, lowest rank {row['lowest_rank']}", flush=True)
        return row

    uniform = [compress(f"ratio {r}", RankPolicy(ratio=r, min_rank=MIN_RANK)) for r in ratios]
    # the latency targets: each ratio's measured time (or given, e.g. a previous run's interleaved table: on this
    # shared machine one measurement of a 20 ms network can be 30% off)
    fractions = latency_targets or measured_fractions(net, patch, [u["ranks"] for u in uniform], engine_in_use())
    for u, fraction in zip(uniform, fractions):
        ratio = u["policy"]["ratio"]
        compress(f"flops @ ratio {ratio}", RankPolicy(target_flops=round(u["flops_fraction"], 4), min_rank=MIN_RANK))
        try:
            compress(f"latency @ ratio {ratio}", RankPolicy(target_latency=round(fraction, 3), min_rank=MIN_RANK))
        except Exception as e:  # e.g. a time the floors cannot reach on this engine: recorded, not fatal
            rows.append({"name": f"latency @ ratio {ratio}", "error": str(e), "target_latency": fraction})
            print(f"  latency @ ratio {ratio}: {e}", flush=True)
    timed = [r for r in rows if "error" not in r]
    for engine in dict.fromkeys([engine_in_use(), "torch"]):
        for row, fraction in zip(timed, measured_fractions(net, patch, [r["ranks"] for r in timed], engine)):
            row[f"time_fraction_{engine}"] = fraction
    for row in timed:
        prediction = tiny.predict_folder(ws, Path(row["folder"]), ws.root / "budgets_pred" / row["name"].replace(" ", "_"))
        row["dice"] = tiny.dice_scores(ws, prediction)["mean_foreground"]
        row["dice_finetuned"] = finetuned_dice(ws, row, epochs, seed)
        print(f"  {row['name']}: time {row[f'time_fraction_{engine_in_use()}']:.3f}, Dice {row['dice']:.3f} -> "
              f"{row['dice_finetuned']:.3f} after fine-tuning", flush=True)
    base = tiny.dice_scores(ws, tiny.predict_folder(ws, base_folder, ws.root / "budgets_pred" / "base"))
    rows.insert(0, {"name": "base", "dice": base["mean_foreground"], "dice_finetuned": base["mean_foreground"],
                    "flops_fraction": 1.0, **{f"time_fraction_{e}": 1.0 for e in (engine_in_use(), "torch")}})
    return rows


def measured_fractions(net, patch, rank_sets: list[dict], engine: str) -> list[float]:
    """Each factorised network's seconds per patch over the base's, all timed interleaved in one run."""
    nets = [net] + [factorised_copy(net, ranks) for ranks in rank_sets]
    times = patch_seconds(nets, (1, *patch), engine, torch.get_num_threads(), runs=5, min_seconds=3.0)
    return [t / times[0] for t in times[1:]]


def finetuned_dice(ws: tiny.TinyWorkspace, row: dict, epochs: int, seed: int) -> float:
    """Fine-tune the variant's exact ranks with the demo's Tucker schedule; held-out Dice of the result."""
    tag = row["name"].replace(" ", "").replace("@", "_at_").replace("ratio", "r")
    plans_name = f"{tiny.TINY_PLANS}_budget_{tag}"
    ranks_file = ws.root / "budgets" / f"{tag}_ranks.json"
    ranks_file.write_text(json.dumps({k: list(v) for k, v in row["ranks"].items()}))
    folder = ws.model_folder("nnUNetTrainerTucker", plans_name)
    if not tiny.checkpoint_path(folder).exists():
        tiny.run_compress(["plan", "tucker", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                           "--ranks", str(ranks_file), "--min-rank", str(MIN_RANK), "--epochs", str(max(3, epochs // 5)),
                           "--iterations-per-epoch", "25", "--val-iterations", "2", "--lr", "1e-3",
                           "--augmentation", "none", "--seed", str(seed), "--plans-name", plans_name, "--overwrite"])
        tiny.train(ws, plans_name, "nnUNetTrainerTucker", pretrained=tiny.checkpoint_path(ws.model_folder()))
    prediction = tiny.predict_folder(ws, folder, ws.root / "budgets_pred" / f"{tag}_ft")
    return tiny.dice_scores(ws, prediction)["mean_foreground"]


# ---- taylor in the training loop ---------------------------------------------------------------------------------

def taylor_part(ws: tiny.TinyWorkspace, flops_target: float, epochs: int, seed: int) -> list[dict]:
    rows = []
    base_net, _, configuration = load_fold_network(open_model_folder(ws.model_folder(), ["0"], "checkpoint_final.pth"),
                                                   "0")
    patch = tuple(read_json(ws.model_folder() / "plans.json")["configurations"][configuration]["patch_size"])
    flops_row = taylor_run(ws, f"taylorF{flops_target}", ["--target-flops", str(flops_target)], epochs, seed)
    flops_row["time_fraction"] = pruned_fraction(base_net, flops_row, patch)
    latency_target = round(flops_row["time_fraction"], 3)
    latency_row = taylor_run(ws, f"taylorL{latency_target}", ["--target-latency", str(latency_target)], epochs, seed)
    latency_row["target_latency"] = latency_target
    for row in (flops_row, latency_row):
        row["time_fraction"], row["time_fraction_torch"] = pruned_fraction(base_net, row, patch, both=True)
        rows.append(row)
        print(f"  {row['name']}: {row['flops_fraction']:.3f} of the FLOPs, time {row['time_fraction']:.3f}, "
              f"Dice {row['dice']:.3f}", flush=True)
    return rows


def taylor_run(ws: tiny.TinyWorkspace, tag: str, target: list[str], epochs: int, seed: int) -> dict:
    plans_name = f"{tiny.TINY_PLANS}_{tag}"
    folder = ws.model_folder("nnUNetTrainerTaylorPruning", plans_name)
    if not tiny.checkpoint_path(folder).exists():  # the demo's schedule (nnunet_compress.demo.run.taylor_rows)
        tiny.run_compress(["plan", "taylor", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                           *target, "--step", "0.1", "--accumulate-batches", "4", "--epochs", str(max(8, epochs // 3)),
                           "--iterations-per-epoch", "20", "--val-iterations", "2", "--lr", "1e-3",
                           "--augmentation", "none", "--seed", str(seed), "--plans-name", plans_name, "--overwrite"])
        tiny.train(ws, plans_name, "nnUNetTrainerTaylorPruning", pretrained=tiny.checkpoint_path(ws.model_folder()))
    report = read_json(folder / "fold_0" / "pruning_report.json")
    net, _, configuration = load_fold_network(open_model_folder(folder, ["0"], "checkpoint_final.pth"), "0")
    base, _, _ = load_fold_network(open_model_folder(ws.model_folder(), ["0"], "checkpoint_final.pth"), "0")
    patch = read_json(folder / "plans.json")["configurations"][configuration]["patch_size"]
    prediction = tiny.predict_folder(ws, folder, ws.root / "budgets_pred" / tag)
    return {"name": tag, "folder": str(folder), "dice": tiny.dice_scores(ws, prediction)["mean_foreground"],
            "flops_fraction": patch_flops(net, 1, patch) / patch_flops(base, 1, patch),
            "history": report.get("history"), "latency": report.get("latency"), "_net": net}


def pruned_fraction(base_net, row: dict, patch, both: bool = False):
    engines = [engine_in_use(), "torch"] if both else [engine_in_use()]
    fractions = []
    for engine in dict.fromkeys(engines):
        base, pruned = patch_seconds([base_net, row["_net"]], (1, *patch), engine, torch.get_num_threads(), runs=5,
                                     min_seconds=3.0)
        fractions.append(pruned / base)
    if both and len(fractions) == 1:
        fractions.append(fractions[0])
    return tuple(fractions) if both else fractions[0]


# ---- the TotalSegmentator-shaped architecture ------------------------------------------------------------------------

def totalseg_part(ratio: float, flops_target: float, patch: int) -> list[dict]:
    from benchmarks.archs import ARCHITECTURES, build_original

    net = build_original(ARCHITECTURES["1.5mm"]).eval()
    shape = (patch,) * 3
    io = layer_io_shapes(net, shape)
    macs = total_macs(net, io)
    variants = {f"ratio {ratio}": RankPolicy(ratio=ratio), f"flops {flops_target}": RankPolicy(
        target_flops=flops_target, guard=False)}
    ranks = {name: select_ranks(net, policy, shape, progress=quiet).ranks for name, policy in variants.items()}
    fraction = measured_fractions(net, shape, [ranks[f"ratio {ratio}"]], engine_in_use())[0]
    print(f"  ratio {ratio}: measured {fraction:.3f} of the original's time on {engine_in_use()}", flush=True)
    latency_policy = RankPolicy(target_latency=round(fraction, 3), guard=False)
    ranks[f"latency {round(fraction, 3)}"] = select_ranks(net, latency_policy, shape, progress=print).ranks
    rows = []
    nets = {name: factorised_copy(net, r) for name, r in ranks.items()}
    times = {}
    for engine in dict.fromkeys([engine_in_use(), "torch"]):
        measured = patch_seconds([net, *nets.values()], (1, *shape), engine, torch.get_num_threads(), runs=3)
        times[engine] = measured
    torch_original = times["torch"][0]
    for i, (name, compressed) in enumerate(nets.items(), start=1):
        flops = total_macs(compressed, layer_io_shapes(compressed, shape)) / macs
        row = {"name": name, "flops_fraction": flops, "lowest_rank": min(min(r) for r in ranks[name].values()),
               "speedup_vs_original_same_engine": times[engine_in_use()][0] / times[engine_in_use()][i],
               "speedup_vs_original_torch": torch_original / times[engine_in_use()][i],
               "seconds": {e: t[i] for e, t in times.items()}}
        rows.append(row)
        print(f"  {name}: {1 / flops:.1f}x fewer FLOPs, {row['speedup_vs_original_same_engine']:.2f}x faster than "
              f"the original on {engine_in_use()}, lowest rank {row['lowest_rank']}", flush=True)
    rows.insert(0, {"name": "original", "seconds": {e: t[0] for e, t in times.items()}})
    return rows


# ---- output ----------------------------------------------------------------------------------------------------

def print_tables(results: dict) -> None:
    engine = results["engine"]
    if "tucker" in results:
        print(f"\n### Tucker on the trained tiny nnU-Net (time: one patch on {engine}, interleaved; Dice: held-out)\n")
        print(f"| variant | FLOPs | time ({engine}) | time (torch) | lowest rank | Dice, no fine-tuning | "
              f"Dice, fine-tuned |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in results["tucker"]:
            if "error" in r:
                print(f"| {r['name']} | | | | | {r['error'][:80]} | |")
                continue
            print(f"| {r['name']} | {r['flops_fraction']:.3f} | {r[f'time_fraction_{engine}']:.3f} | "
                  f"{r['time_fraction_torch']:.3f} | {r.get('lowest_rank', '')} | {r['dice']:.3f} | "
                  f"{r['dice_finetuned']:.3f} |")
    if "taylor" in results:
        print(f"\n### Taylor pruning in the training loop (time on {engine})\n")
        print(f"| run | FLOPs | time ({engine}) | time (torch) | Dice (fine-tuned while pruning) |")
        print("|---|---:|---:|---:|---:|")
        for r in results["taylor"]:
            print(f"| {r['name']} | {r['flops_fraction']:.3f} | {r['time_fraction']:.3f} | "
                  f"{r['time_fraction_torch']:.3f} | {r['dice']:.3f} |")
    if "totalseg" in results:
        print(f"\n### TotalSegmentator 1.5 mm architecture, one {results['totalseg_patch']}³ patch\n")
        print(f"| policy | FLOPs | lowest rank | × vs original on {engine} | × vs original on torch |")
        print("|---|---:|---:|---:|---:|")
        for r in results["totalseg"][1:]:
            print(f"| {r['name']} | {r['flops_fraction']:.3f} | {r['lowest_rank']} | "
                  f"{r['speedup_vs_original_same_engine']:.2f} | {r['speedup_vs_original_torch']:.2f} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = results["engine"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "dice", "no fine-tuning"), (axes[1], "dice_finetuned", "after fine-tuning")):
        for family, marker in (("ratio", "o"), ("flops", "s"), ("latency", "^"), ("base", "*")):
            points = [(r[f"time_fraction_{engine}"], r[key]) for r in results.get("tucker", [])
                      if "error" not in r and r["name"].startswith(family)]
            if points:
                ax.scatter(*zip(*points), marker=marker, s=60, label=family)
        for r in results.get("taylor", []) if key == "dice_finetuned" else []:
            ax.scatter(r["time_fraction"], r["dice"], marker="x", s=60, label=r["name"])
        ax.set_xlabel(f"measured time per patch / base ({engine})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out mean foreground Dice")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--parts", nargs="+", choices=("tucker", "taylor", "totalseg"),
                   default=["tucker", "taylor", "totalseg"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--latency-targets", type=float, nargs="+",
                   help="--target-latency per ratio (default: each ratio's time, measured at the start)")
    p.add_argument("--taylor-flops", type=float, default=0.5)
    p.add_argument("--totalseg-ratio", type=float, default=0.25)
    p.add_argument("--totalseg-flops", type=float, default=0.11)
    p.add_argument("--totalseg-patch", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/budgets.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = tiny.default_workspace(args.workspace)
    import os
    os.environ.update(ws.env())
    results: dict = {"engine": engine_in_use(), "threads": args.threads, "workspace": str(args.workspace),
                     "totalseg_patch": args.totalseg_patch}
    if args.output.exists():  # parts run separately add up in one file
        results = {**json.loads(args.output.read_text()), **results}
    epochs = tiny.BASE_EPOCHS
    t0 = time.time()
    if "tucker" in args.parts:
        print("[budgets] tucker on the trained tiny model", flush=True)
        results["tucker"] = tucker_part(ws, args.ratios, epochs, args.seed, args.latency_targets)
    if "taylor" in args.parts:
        print("[budgets] taylor in the training loop", flush=True)
        results["taylor"] = [{k: v for k, v in r.items() if k != "_net"}
                             for r in taylor_part(ws, args.taylor_flops, epochs, args.seed)]
    if "totalseg" in args.parts:
        print("[budgets] TotalSegmentator 1.5 mm architecture", flush=True)
        results["totalseg"] = totalseg_part(args.totalseg_ratio, args.totalseg_flops, args.totalseg_patch)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print_tables(results)
    if "tucker" in results:
        plot(results, args.output.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
