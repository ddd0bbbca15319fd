"""Budget rank policies against the uniform ratio at the same cost, on a trained tiny nnU-Net (no fine-tuning).

For each FLOPs target and calibration seed it chooses ranks the way ``nnunet-compress tucker`` does
(:func:`nnunet_compress.workflows.tucker.select_ranks`, synthetic-CT calibration through the model's
preprocessing, as without ``-i``) for these variants:

- ``ratio R``: the uniform ``--rank-ratio R`` (the reference point);
- ``kernel, no guard``: ``--target-flops T --no-budget-guard`` (the allocator alone, which can wreck a model);
- ``sensitivity, no guard``: ``--budget-error sensitivity --no-budget-guard``;
- ``default``: ``--target-flops T`` (kernel error, guard on);
- ``best``: ``--budget-error best`` (kernel and sensitivity allocations, guard on).

It records each variant's FLOPs fraction, lowest rank, the guard's measurements on the calibration patches and
the relative change of the output logits on patches of the held-out images (imagesTs, which the guard never
sees). Held-out foreground Dice (``nnUNetv2_predict_from_modelfolder`` + nnU-Net's evaluation) is computed once
per distinct set of ranks, for the variants named by ``--dice`` (the model folder is written by
``compress_model_folder`` with those ranks; the decomposition is deterministic, so it is the folder the budget
command writes). Usage (a workspace made by ``nnunet_compress.demo.tiny``, base model trained)::

    python -m benchmarks.budget_policies WORKSPACE_ROOT [--targets 0.18] [--seeds 0 1] [--min-rank 4]
        [--ratio 0.25] [--dice ratio "kernel, no guard" default] [-o budget_policies.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.calibration import preprocessed_cases, random_patches
from nnunet_compress.nnunet.model_folder import input_channels_of, load_fold_network, open_model_folder
from nnunet_compress.tucker.budget_guard import output_change, reference_outputs
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import build_report, calibration_source, compress_model_folder, select_ranks

SEED_INDEPENDENT = ("kernel, no guard",)  # no calibration patches are involved


def policies(target: float, min_rank: int) -> dict[str, RankPolicy]:
    budget = dict(target_flops=target, min_rank=min_rank)
    return {"kernel, no guard": RankPolicy(**budget, guard=False),
            "sensitivity, no guard": RankPolicy(**budget, budget_error="sensitivity", guard=False),
            "default": RankPolicy(**budget),
            "best": RankPolicy(**budget, budget_error="best")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--targets", type=float, nargs="+", default=[0.18])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration seeds")
    p.add_argument("--min-rank", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--dice", nargs="*", default=["ratio", "kernel, no guard", "default"],
                   help="variants whose held-out Dice is measured ('ratio' for the uniform ratio)")
    p.add_argument("-o", "--output", type=Path, default=Path("budget_policies.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    ws = tiny.default_workspace(args.workspace)
    folder = open_model_folder(ws.model_folder(), ["0"], "checkpoint_final.pth")
    net, _, configuration = load_fold_network(folder, "0")
    net.eval()
    plans, dataset_json = folder.plans, folder.dataset_json
    patch = tuple(plans["configurations"][configuration]["patch_size"])
    channels = input_channels_of(plans, dataset_json, configuration)
    held_out = random_patches(preprocessed_cases(ws.raw_dataset / "imagesTs", plans, dataset_json, configuration),
                              patch, 4, batch_size=1, seed=123)
    references = reference_outputs(net, held_out)
    calibrations = {seed: calibration_source(None, plans, dataset_json, configuration, channels, patch, 4, seed)
                    for seed in args.seeds}

    rows = []

    def record(variant: str, target: float | None, seed: int | None, policy: RankPolicy, calibration) -> None:
        start = time.time()
        selection = select_ranks(net, policy, patch, calibration, progress=lambda line: None)
        report = build_report(net, selection.ranks, {}, patch, policy, configuration)
        rows.append({"variant": variant, "target_flops": target, "calibration_seed": seed,
                     "flops_fraction": report.flops_after / report.flops_before,
                     "lowest_rank": min(min(r) for r in selection.ranks.values()),
                     "held_out_output_change": output_change(net, selection.ranks, held_out, references),
                     "budget_guard": selection.guard, "select_seconds": round(time.time() - start, 1),
                     "ranks": {name: list(pair) for name, pair in selection.ranks.items()}})
        print(f"{variant} target {target} seed {seed}: {rows[-1]['flops_fraction']:.4f} of the FLOPs, held-out "
              f"output change {rows[-1]['held_out_output_change']:.4f}", flush=True)

    record(f"ratio {args.ratio}", None, None, RankPolicy(ratio=args.ratio, min_rank=args.min_rank), None)
    for target in args.targets:
        for variant, policy in policies(target, args.min_rank).items():
            for seed in ([None] if variant in SEED_INDEPENDENT else args.seeds):
                record(variant, target, seed, policy, None if seed is None else calibrations[seed])

    dice_of: dict[str, dict] = {}  # ranks (json) -> dice
    for row in rows:
        wanted = "ratio" if row["variant"].startswith("ratio ") else row["variant"]
        if wanted not in args.dice:
            continue
        key = json.dumps(row["ranks"], sort_keys=True)
        if key not in dice_of:
            out = ws.root / f"bench_budget_{len(dice_of)}"
            compress_model_folder(folder.path, out, RankPolicy(ranks=row["ranks"], min_rank=args.min_rank), ["0"],
                                  overwrite=True, progress=lambda line: None)
            dice_of[key] = tiny.dice_scores(ws, tiny.predict_folder(ws, out, ws.root / f"bench_pred_{len(dice_of)}"))
            print(f"Dice of {row['variant']} (target {row['target_flops']}, seed {row['calibration_seed']}): "
                  f"{dice_of[key]['mean_foreground']:.4f}", flush=True)
        row["dice"] = dice_of[key]["mean_foreground"]
        row["dice_per_class"] = dice_of[key]["per_class"]
    args.output.write_text(json.dumps(rows, indent=2))

    print("\n| variant | target | seed | FLOPs | lowest rank | guard: output change on calibration (chosen) | "
          "held-out output change | Dice |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["budget_guard"]
        guard = "" if not g else ", ".join(f"{name} {e['output_change']:.3f}" for name, e in
                                           g["candidates"].items()) + f" (**{g['chosen']}**)"
        dice = f"{r['dice']:.4f}" if "dice" in r else ""
        print(f"| {r['variant']} | {r['target_flops'] or ''} | {'' if r['calibration_seed'] is None else r['calibration_seed']} "
              f"| {r['flops_fraction']:.4f} | {r['lowest_rank']} | {guard} | {r['held_out_output_change']:.4f} | {dice} |")


if __name__ == "__main__":
    main()
