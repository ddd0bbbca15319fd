"""End-to-end pruning: Taylor in nnU-Net's training loop, one-shot prune CLI, Sauron while training."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from nnunet_compress.demo import tiny

pytestmark = pytest.mark.e2e


def load_checkpoint(folder: Path, name: str = "checkpoint_final.pth") -> dict:
    return torch.load(folder / "fold_0" / name, map_location="cpu", weights_only=False)


def test_taylor_trainer_prunes_to_target_and_predicts(tiny_ws, tiny_base, tiny_base_dice):
    plans_name = f"{tiny.TINY_PLANS}_taylorF0.7"
    # Steps of 5% of the channels with an epoch of fine-tuning between them, as the method intends; with 10% steps
    # and this short schedule about half of the runs lost a thin class (measured, see the README).
    run_cli("plan", "taylor", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS,
            "--target-flops", "0.7", "--step", "0.05", "--accumulate-batches", "2", "--epochs", "10",
            "--iterations-per-epoch", "15", "--val-iterations", "2", "--lr", "1e-3", "--augmentation", "none",
            "--seed", "0", env=tiny_ws.env(), check=True)
    folder = tiny.train(tiny_ws, plans_name, "nnUNetTrainerTaylorPruning", pretrained=tiny.checkpoint_path(tiny_base))
    checkpoint = load_checkpoint(folder)
    extra = checkpoint["nnunet_compress"]
    assert extra["method"] == "taylor" and extra["state"]["target_reached"]
    history = extra["state"]["history"]
    assert history[-1]["fraction"] <= 0.7 < history[0]["fraction"] or len(history) == 1
    # the last quarter of the 10 epochs (3, rounded up) takes no step: the saved network has recovered from the last
    assert all(step["epoch"] < 10 - 3 for step in history)
    # the class guard's record: in the checkpoint (for --c) and in the fold's report
    guard = extra["state"]["class_guard"]
    assert guard["share"] == 0.5 and guard["pending"] is None
    report = json.loads((folder / "fold_0" / "pruning_report.json").read_text())
    assert report["method"] == "taylor" and report["final_channels"] == extra["channels"]
    assert report["recovery_epochs"] == 3
    assert report["history"] == history and report["rollbacks"] == guard["rollbacks"]
    # the final plans.json of the model folder describes the pruned network
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["channels"] == extra["channels"]
    base_weights = load_checkpoint(tiny_base)["network_weights"]
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert checkpoint["network_weights"][key].shape[0] <= base_weights[key].shape[0]
    assert sum(v.numel() for k, v in checkpoint["network_weights"].items() if not k.startswith("decoder.encoder")) < \
        sum(v.numel() for k, v in base_weights.items() if not k.startswith("decoder.encoder"))
    pred = tiny.predict_dataset(tiny_ws, "nnUNetTrainerTaylorPruning", plans_name, tiny_ws.root / "taylor_pred")
    dice = tiny.dice_scores(tiny_ws, pred)
    assert dice["mean_foreground"] >= tiny_base_dice["mean_foreground"] - 0.15, (dice, tiny_base_dice)


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_one_shot_prune_cli(tiny_ws, tiny_base, tmp_path, method):
    out = tmp_path / f"pruned_{method}"
    args = ["prune", tiny_base, "-o", out, "--method", method, "--target-flops", "0.7", "--step", "0.1"]
    if method == "taylor":
        args += ["-i", tiny_ws.raw_dataset / "imagesTr", "--calibration-batches", "2"]
    run_cli(*args, env=tiny_ws.env(), check=True)
    report = json.loads((out / "compression_report.json").read_text())
    assert report["folds"]["0"]["history"][-1]["fraction"] <= 0.7
    assert isinstance(report["folds"]["0"]["class_guard_rollbacks"], list)
    proc = run_cli("profile", out, "--runs", "1", "--warmup", "0", "--totals-only", check=True)
    assert "parameters" in proc.stdout
    pred = tiny.predict_folder(tiny_ws, out, tmp_path / "pred")
    assert len(list(pred.glob("*.nii.gz"))) == len(list((tiny_ws.raw_dataset / "imagesTs").glob("*.nii.gz")))


def test_prune_cli_bad_input(tiny_ws, tiny_base, tmp_path):
    proc = run_cli("prune", tiny_base, "-o", tmp_path / "o", "--method", "taylor", "--target-flops", "0.5")
    assert proc.returncode == 2 and "calibration images" in proc.stderr
    proc = run_cli("prune", tiny_base, "-o", tmp_path / "o", "--method", "l1", "--target-flops", "1.5")
    assert proc.returncode == 2 and "outside (0, 1)" in proc.stderr
    proc = run_cli("prune", tiny_base, "-o", tmp_path / "o", "--method", "l1", "--target-flops", "0.01",
                   "--min-channels", "4")
    assert proc.returncode == 2 and "min-channels" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_sauron_trainer_removes_filters_and_predicts(tiny_ws, tiny_base):
    plans_name = f"{tiny.TINY_PLANS}_sauron0.4"
    # A short run from the trained model. Its channels' δ_prune lie between about 0.2 and 0.9 (measured on the tiny
    # base), so a threshold starting at 0.25 removes the most redundant ones in the first epochs; the paper's
    # 0.001 start only bites after the λ term has clustered the maps over a long training.
    run_cli("plan", "sauron", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS,
            "--tau-start", "0.25", "--tau-max", "0.4", "--rho", "2", "--kappa", "3", "--epochs", "4",
            "--iterations-per-epoch", "10", "--val-iterations", "2", "--lr", "1e-3", "--augmentation", "none",
            env=tiny_ws.env(), check=True)
    folder = tiny.train(tiny_ws, plans_name, "nnUNetTrainerSauron", pretrained=tiny.checkpoint_path(tiny_base))
    checkpoint = load_checkpoint(folder)
    extra = checkpoint["nnunet_compress"]
    history = extra["state"]["channel_history"]
    assert len(history) == 4
    from nnunet_compress.nnunet.model_folder import build_network
    from nnunet_compress.pruning.surgery import channel_counts
    parent = json.loads(tiny_ws.plans_path(tiny.TINY_PLANS).read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    full = sum(channel_counts(build_network(parent, dataset_json, "3d_fullres")).values())
    assert sum(extra["channels"].values()) < full, "Sauron removed no filters"
    assert history[-1]["params"] <= history[0]["params"]
    # a quarter of the 4 epochs (1) is for recovery: what epoch 1 left is what epoch 3 (the last) trained and saved
    assert history[1]["channels"] == history[2]["channels"] == history[3]["channels"] == extra["channels"]
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["channels"] == extra["channels"]
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "[sauron] channels per layer" in log and "epoch time" in log
    pred = tiny.predict_dataset(tiny_ws, "nnUNetTrainerSauron", plans_name, tiny_ws.root / "sauron_pred")
    assert len(list(pred.glob("*.nii.gz"))) > 0


@pytest.mark.parametrize("args, message", [
    (["--lambda", "-1"], "lambda"),
    (["--tau-max", "1.5"], "tau_max"),
    (["--kappa", "0"], "kappa"),
    (["--rho", "0"], "rho"),
])
def test_plan_sauron_bad_input(tiny_ws, args, message):
    proc = run_cli("plan", "sauron", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS, *args,
                   env=tiny_ws.env())
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_latency_targets_through_the_cli_and_the_trainer(tiny_ws, tiny_base, tmp_path, torch_engine):
    """--target-latency end to end on the tiny model, on torch's CPU path (the engine a machine without OpenVINO
    uses): Tucker writes predicted and measured seconds per layer into its report and the calibration rounds into
    the plans; the Taylor trainer measures the network after every pruning step. Targets are loose (0.95):
    whether a tighter one is met depends on the machine's load, not on the code."""
    # torch_engine: NNUNET_COMPRESS_CPU_ENGINE=torch reaches every subprocess through tiny_ws.env()
    env = tiny_ws.env()
    out = tmp_path / "tucker_latency"
    run_cli("tucker", tiny_base, "-o", out, "--target-latency", "0.95", "--min-rank", "4", "--calibration-patches",
            "1", env=env, check=True)
    report = json.loads((out / "compression_report.json").read_text())
    latency = report["latency"]
    assert latency["engine"] == "torch" and latency["cost_model"] == "measured" and latency["rounds"]
    assert latency["measured_fraction"] <= 0.95 * 1.05
    assert all(row["seconds"]["measured_before"] > 0 and row["seconds"]["predicted_after"] > 0
               for row in report["layers"])
    plans = json.loads((out / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["nnunet_compress"]["latency"]["rounds"] == latency["rounds"]

    plans_name = f"{tiny.TINY_PLANS}_taylorL0.95"
    run_cli("plan", "taylor", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS,
            "--target-latency", "0.95", "--step", "0.1", "--accumulate-batches", "2", "--epochs", "3",
            "--iterations-per-epoch", "5", "--val-iterations", "1", "--augmentation", "none", "--class-guard", "0",
            "--seed", "0", env=env, check=True)
    folder = tiny.train(tiny_ws, plans_name, "nnUNetTrainerTaylorPruning", pretrained=tiny.checkpoint_path(tiny_base))
    report = json.loads((folder / "fold_0" / "pruning_report.json").read_text())
    assert report["settings"]["target_latency"] == 0.95 and report["latency"]["engine"] == "torch"
    history = report["history"]
    assert all(step["fraction"] == step["measured"] and "predicted" in step for step in history)
    if report["target_reached"]:
        assert history[-1]["measured"] <= 0.95
    layers = report["latency"]["layers"]
    assert layers and all(row["measured_before"] > 0 and row["predicted_after"] <= row["predicted_before"]
                          for row in layers.values())

    pruned = tmp_path / "l1_latency"
    run_cli("prune", tiny_base, "-o", pruned, "--method", "l1", "--target-latency", "0.95", "--step", "0.1",
            env=env, check=True)
    fold = json.loads((pruned / "compression_report.json").read_text())["folds"]["0"]
    assert fold["history"][-1]["measured"] <= 0.95 and fold["latency"]["engine"] == "torch"
    assert set(fold["layers"]) >= {"encoder.stages.0.0.convs.0.conv", "decoder.seg_layers.2"}
