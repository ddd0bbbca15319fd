"""The end-to-end demo: synthetic CT -> tiny nnU-Net -> every compression method -> side-by-side table.

Each step is the command a user would run (nnU-Net's CLI for planning, training and prediction; ours for the
rest); the demo only strings them together and prints what each model costs and how well it segments.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_compress.demo import tiny
from nnunet_compress.evaluation.base_reference import BaseReference
from nnunet_compress.evaluation.profiling import profile_network
from nnunet_compress.nnunet.model_folder import (
    atomic_write_file,
    input_channels_of,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import resolved_configuration


@dataclass
class DemoRow:
    model: str
    params: int
    gflops: float
    latency_ms: float  # one patch as nnU-Net's predictor runs this model here (variant)
    dice: float
    dice_per_class: dict
    model_folder: str = ""  # where the model lives, so a benchmark can grade it again on other cases
    variant: str = "torch f32"  # engine and precision it runs in: torch f32, engine f32, engine int8
    base_torch_ms: float | None = None  # the base on torch, timed interleaved with this row
    base_same_ms: float | None = None  # the base on this row's engine and precision, timed interleaved too

    def line(self, base: "DemoRow") -> str:
        def times(reference):
            return f"{reference / self.latency_ms:>6.2f}x" if reference and self.latency_ms else f"{'-':>7}"
        return (f"{self.model:<34} {self.variant:<11} {self.params / base.params:>6.2f} "
                f"{self.gflops:>7.3f} {self.gflops / base.gflops:>6.2f} {self.latency_ms:>8.1f} "
                f"{times(self.base_torch_ms)} {times(self.base_same_ms)} {self.dice:>7.3f}")


HEADER = (f"{'model':<34} {'runs on':<11} {'params':>6} {'GFLOPs':>7} {'ratio':>6} {'ms':>8} "
          f"{'×torch':>7} {'×same':>7} {'Dice':>7}")
LEGEND = ("params, ratio: fraction of the base's; ms: one patch as nnU-Net's predictor runs the model here; ×torch: "
          "speed-up over the base on plain torch; ×same: over the base on the same engine and precision (timed "
          "interleaved with the row; the compression's own gain)")


def measure(ws: tiny.TinyWorkspace, name: str, model_folder: Path, prediction_name: str,
            base: BaseReference | None = None) -> DemoRow:
    """Profile one patch (side by side with the base where given) and predict the held-out cases with nnU-Net's
    predictor."""
    folder = open_model_folder(model_folder, ["0"])
    net, _, configuration = load_fold_network(folder, "0")
    patch = tuple(resolved_configuration(folder.plans, configuration)["patch_size"])
    prof = profile_network(net, input_channels_of(folder.plans, folder.dataset_json, configuration), patch,
                           timing=False)
    speed = (base or BaseReference(model_folder, "0")).time(net, runs=7, warmup=2)
    predictions = tiny.predict_folder(ws, model_folder, ws.root / "predictions" / prediction_name)
    dice = tiny.dice_scores(ws, predictions)
    ms = (lambda s: s * 1000 if s is not None else None)
    return DemoRow(name, prof.params, prof.flops / 1e9, ms(speed.seconds), dice["mean_foreground"],
                   dice["per_class"], str(model_folder), speed.variant, ms(speed.base_torch_seconds),
                   ms(speed.base_same_seconds))


def run_demo(workdir: Path, fast: bool = False, seed: int = 0) -> list[DemoRow]:
    t0 = time.time()
    ws = tiny.default_workspace(workdir)
    # the in-process steps (plans, profiling) read nnU-Net's folders from the environment like the CLI does
    os.environ.update(ws.env())
    epochs = 20 if fast else tiny.BASE_EPOCHS
    print(f"[demo] workspace {ws.root}")
    print("[demo] 1/4 synthetic CT dataset + nnUNetv2_plan_and_preprocess + tiny plans")
    tiny.prepare_dataset(ws, seed=seed, num_epochs=epochs)
    base_folder = ws.model_folder()
    if not tiny.checkpoint_path(base_folder).exists():
        print(f"[demo] 2/4 nnUNetv2_train (base model, {epochs} short epochs on the CPU)")
        tiny.train(ws)
    base = BaseReference(base_folder, "0")
    rows = [measure(ws, "base", base_folder, "base", base)]
    print(f"[demo]      base model: mean foreground Dice {rows[0].dice:.3f}")

    print("[demo] 3/4 Tucker: post-training compression (nnunet-compress tucker) and fine-tuning "
          "(nnUNetv2_train -tr nnUNetTrainerTucker)")
    for ratio in (0.5, 0.25):
        out = ws.root / "compressed" / f"tucker{ratio}"
        if not out.exists():
            tiny.run_compress(["tucker", str(base_folder), "-o", str(out), "--rank-ratio", str(ratio), "--min-rank", "4"])
        rows.append(measure(ws, f"tucker {ratio} (no fine-tuning)", out, f"tucker{ratio}", base))
        plans_name = f"{tiny.TINY_PLANS}_tucker{ratio}"
        finetuned = ws.model_folder("nnUNetTrainerTucker", plans_name)
        if not tiny.checkpoint_path(finetuned).exists():
            tiny.run_compress(["plan", "tucker", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                       "--rank-ratio", str(ratio), "--min-rank", "4", "--epochs", str(max(3, epochs // 5)),
                       "--iterations-per-epoch", "25", "--val-iterations", "2", "--lr", "1e-3", "--augmentation", "none",
                       "--seed", str(seed), "--overwrite"])
            tiny.train(ws, plans_name, "nnUNetTrainerTucker", pretrained=tiny.checkpoint_path(base_folder))
        rows.append(measure(ws, f"tucker {ratio} + fine-tuning", finetuned, f"tucker{ratio}_ft", base))
    rows.append(label_free_row(ws, base_folder, 0.25, epochs, seed, base))

    rows.extend(taylor_rows(ws, base_folder, epochs, seed, base))
    rows.extend(sauron_rows(ws, base_folder, epochs, seed, base))
    rows.extend(int8_rows(ws, rows, base))

    print("[demo] 4/4 summary (one 3D patch on the CPU; Dice = mean foreground Dice on the held-out cases)")
    print(LEGEND)
    print(HEADER)
    for row in rows:
        print(row.line(rows[0]))
    summary = ws.root / "demo_summary.json"
    atomic_write_file(summary, lambda tmp: tmp.write_text(json.dumps([asdict(r) for r in rows], indent=2)))
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min; figures in {summary}")
    return rows


# the label-free row's dataset: the base model's predictions on extra unlabelled synthetic cases
PSEUDO_ID, PSEUDO_NAME, UNLABELLED_CASES = 511, "SyntheticUnlabelled", range(1000, 1012)


def label_free_row(ws: tiny.TinyWorkspace, base_folder: Path, ratio: float, epochs: int, seed: int = 0,
                   base: BaseReference | None = None) -> DemoRow:
    """Tucker `ratio` fine-tuned without labels: the base model labels unseen scans and teaches the student.

    The same schedule as the labelled Tucker fine-tuning, on 12 extra synthetic cases that no model was trained or
    tested on (what a hospital holds: its own scans, no labels), with the teacher's probabilities only (α = 1).
    """
    pseudo = tiny.TinyWorkspace(ws.root, PSEUDO_ID, PSEUDO_NAME)
    plans_name = f"{tiny.TINY_PLANS}_tucker{ratio}_distill"
    folder = pseudo.model_folder("nnUNetTrainerTucker", plans_name)
    if not tiny.checkpoint_path(folder).exists():
        print(f"[demo]      label-free: the base model labels {len(UNLABELLED_CASES)} unlabelled scans "
              "(nnunet-compress pseudo-dataset), Tucker fine-tuned from its probabilities (--distill --alpha 1)")
        tiny.label_unlabelled_cases(ws, base_folder, ws.root / "unlabelled_images", PSEUDO_ID, PSEUDO_NAME, seed,
                                    UNLABELLED_CASES)
        tiny.run_compress(["plan", "tucker", "-d", str(PSEUDO_ID), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                   "--rank-ratio", str(ratio), "--min-rank", "4", "--distill", "--alpha", "1",
                   "--epochs", str(max(3, epochs // 5)), "--iterations-per-epoch", "25", "--val-iterations", "2",
                   "--lr", "1e-3", "--augmentation", "none", "--seed", str(seed), "--overwrite"])
        tiny.train(pseudo, plans_name, "nnUNetTrainerTucker", pretrained=tiny.checkpoint_path(base_folder),
                   log_name="demo_label_free")
    return measure(ws, f"tucker {ratio} + label-free distill", folder, f"tucker{ratio}_label_free", base)


def taylor_rows(ws: tiny.TinyWorkspace, base_folder: Path, epochs: int, seed: int = 0,
                base: BaseReference | None = None) -> list[DemoRow]:
    """One-shot L1 pruning (no fine-tuning) and Taylor pruning inside nnU-Net's training loop, to half the FLOPs."""
    print("[demo] pruning: one-shot L1 (nnunet-compress prune) and Taylor in the training loop "
          "(nnUNetv2_train -tr nnUNetTrainerTaylorPruning), both to about half the FLOPs")
    rows = []
    l1 = ws.root / "compressed" / "l1_F0.5"
    if not l1.exists():
        tiny.run_compress(["prune", str(base_folder), "-o", str(l1), "--method", "l1", "--target-flops", "0.5",
                   "--step", "0.05"])
    rows.append(measure(ws, "L1 prune F0.5 (no fine-tuning)", l1, "l1_F0.5", base))
    plans_name = f"{tiny.TINY_PLANS}_taylorF0.5"
    folder = ws.model_folder("nnUNetTrainerTaylorPruning", plans_name)
    if not tiny.checkpoint_path(folder).exists():
        tiny.run_compress(["plan", "taylor", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                   "--target-flops", "0.5", "--step", "0.1", "--accumulate-batches", "4",
                   "--epochs", str(max(8, epochs // 3)), "--iterations-per-epoch", "20", "--val-iterations", "2", "--lr", "1e-3",
                   "--augmentation", "none", "--seed", str(seed), "--overwrite"])
        tiny.train(ws, plans_name, "nnUNetTrainerTaylorPruning", pretrained=tiny.checkpoint_path(base_folder))
    rows.append(measure(ws, "Taylor F0.5 + fine-tuning", folder, "taylor_F0.5", base))
    return rows


def sauron_rows(ws: tiny.TinyWorkspace, base_folder: Path, epochs: int, seed: int = 0,
                base: BaseReference | None = None) -> list[DemoRow]:
    """Sauron pruning while (re)training, started from the base model's weights."""
    print("[demo] Sauron: pruning during training (nnUNetv2_train -tr nnUNetTrainerSauron -pretrained_weights)")
    plans_name = f"{tiny.TINY_PLANS}_sauron_demo"
    folder = ws.model_folder("nnUNetTrainerSauron", plans_name)
    if not tiny.checkpoint_path(folder).exists():
        # a short run needs thresholds that bite at once: the trained tiny model's δ_prune lie between ~0.2 and 0.9,
        # while the paper's τ start of 0.001 only bites after a long training has clustered the feature maps
        tiny.run_compress(["plan", "sauron", "-d", str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
                   "--plans-name", plans_name, "--tau-start", "0.2", "--tau-max", "0.4", "--kappa", "4",
                   "--rho", "2", "--epochs", str(max(10, epochs // 3)), "--iterations-per-epoch", "20", "--val-iterations", "2",
                   "--lr", "1e-3", "--augmentation", "none", "--seed", str(12345 + seed), "--overwrite"])
        tiny.train(ws, plans_name, "nnUNetTrainerSauron", pretrained=tiny.checkpoint_path(base_folder))
    return [measure(ws, "Sauron (pruned while training)", folder, "sauron", base)]


# the demo rows that get an INT8 twin (nnunet-compress quantize), by row name -> folder name
INT8_ROWS = {"base": "base", "tucker 0.25 + fine-tuning": "tucker0.25_ft",
             "tucker 0.25 + label-free distill": "tucker0.25_label_free", "Taylor F0.5 + fine-tuning": "taylor_F0.5",
             "Sauron (pruned while training)": "sauron"}


def int8_rows(ws: tiny.TinyWorkspace, rows: list[DemoRow], base: BaseReference | None = None) -> list[DemoRow]:
    """INT8 twins of the base and of the fine-tuned or pruned-while-training models, calibrated on the training
    cases (nnunet-compress quantize --calibration-dataset) with NNCF's accuracy control at its default budget."""
    print("[demo] INT8: nnunet-compress quantize on the base and the fine-tuned models (calibrated on the training "
          "cases, mean Dice drop on validation tiles <= 0.01)")
    out = []
    for row in rows:
        name = INT8_ROWS.get(row.model)
        if name is None:
            continue
        folder = ws.root / "int8" / name
        if not folder.exists():
            tiny.run_compress(["quantize", row.model_folder, "-o", str(folder), "-f", "0", "--calibration-dataset",
                               str(ws.dataset_id), "--subset-size", "16", "--validation-patches", "8"])
        out.append(measure(ws, f"{row.model} + INT8", folder, f"int8_{name}", base))
    return out
