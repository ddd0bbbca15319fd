"""Interrupted training: SIGKILL each of our trainers after a pruning/decomposition step, resume with --c.

A resumed run must continue from exactly the saved state: the same pruned architecture, method state
(thresholds, patience, pruning history) and optimizer state (momentum of the kept channels) as the checkpoint
the killed run left, and it must then finish its schedule.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.env import nnunet_command, run_nnunet

pytestmark = pytest.mark.e2e

SCHEDULE = ["--epochs", "4", "--iterations-per-epoch", "5", "--val-iterations", "1", "--save-every", "1",
            "--augmentation", "none"]

# Rebuild the trainer in a fresh process, load the checkpoint as --c does, and report what it holds.
CHECK = r"""
import json, sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunet_compress.network import unwrap
trainer_name, plans_file, dataset_json_file, ckpt_file = sys.argv[1:]
cls = recursive_find_trainer_class_by_name(trainer_name)
plans = load_json(plans_file)
plans["continue_training"] = True  # nnU-Net 2.8's run_training puts this into the plans before building trainers
trainer = cls(plans, "3d_fullres", 0, load_json(dataset_json_file), device=torch.device("cpu"))
trainer.load_checkpoint(ckpt_file)
ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
net = unwrap(trainer.network)
own = net.state_dict()
weights_equal = own.keys() == ckpt["network_weights"].keys() and all(
    torch.equal(own[k], v) for k, v in ckpt["network_weights"].items())
opt, saved = trainer.optimizer.state_dict(), ckpt["optimizer_state"]
opt_equal = len(opt["state"]) == len(saved["state"]) and all(
    all(torch.equal(opt["state"][i][k], v) if torch.is_tensor(v) else opt["state"][i][k] == v
        for k, v in saved["state"][i].items()) for i in saved["state"])
opt_equal = opt_equal and [g["lr"] for g in opt["param_groups"]] == [g["lr"] for g in saved["param_groups"]]
result = {"weights_equal": weights_equal, "optimizer_equal": opt_equal, "epoch": trainer.current_epoch,
          "momentum_buffers": sum(1 for s in saved["state"].values() if "momentum_buffer" in s)}
extra = ckpt.get("nnunet_compress")
if extra is not None:
    from nnunet_compress.pruning.surgery import channel_counts
    result["channels_equal"] = channel_counts(net) == extra["channels"]
    result["state_equal"] = json.loads(json.dumps(trainer.pruning_state(), default=str)) == \
        json.loads(json.dumps(extra["state"], default=str))
print("RESULT " + json.dumps(result))
"""


def kill_after_epochs(ws, trainer: str, plans: str, epochs_done: int, pretrained: Path | None = None) -> Path:
    """Start nnUNetv2_train, SIGKILL its process group once `epochs_done` epochs are checkpointed; snapshot it."""
    fold_dir = ws.model_folder(trainer, plans) / "fold_0"
    args = [nnunet_command("nnUNetv2_train"), str(ws.dataset_id), tiny.CONFIGURATION, "0", "-p", plans, "-tr",
            trainer, "-device", "cpu"]
    if pretrained is not None:
        args += ["-pretrained_weights", str(pretrained)]
    proc = subprocess.Popen(args, env=ws.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its data-loader workers die with it
    deadline = time.time() + 900
    try:
        while True:
            logs = list(fold_dir.glob("training_log_*.txt"))
            if logs and f"Epoch {epochs_done} " in logs[0].read_text():
                break
            assert proc.poll() is None, f"{trainer} ended before it could be interrupted (exit {proc.returncode})"
            assert time.time() < deadline, "training too slow to interrupt"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (fold_dir / "checkpoint_final.pth").exists()
    snapshot = fold_dir.parent / "killed_checkpoint_latest.pth"
    shutil.copy(fold_dir / "checkpoint_latest.pth", snapshot)
    return snapshot


def reloaded_state(ws, trainer: str, plans: str, checkpoint: Path) -> dict:
    folder = ws.model_folder(trainer, plans)
    out = subprocess.run([sys.executable, "-c", CHECK, trainer, str(folder / "plans.json"),
                          str(folder / "dataset.json"), str(checkpoint)], env=ws.env(), capture_output=True,
                         text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def resume(ws, trainer: str, plans: str) -> dict:
    run_nnunet(["nnUNetv2_train", str(ws.dataset_id), tiny.CONFIGURATION, "0", "-p", plans, "-tr", trainer,
                "-device", "cpu", "--c"], ws.env(), ws.root / "logs" / f"resume_{trainer}.log")
    final = ws.model_folder(trainer, plans) / "fold_0" / "checkpoint_final.pth"
    return torch.load(final, map_location="cpu", weights_only=False)


def check_exact_reload(state: dict, pruning: bool) -> None:
    assert state["epoch"] == 2, state  # two epochs were done and checkpointed when the run was killed
    assert state["weights_equal"] and state["optimizer_equal"] and state["momentum_buffers"] > 0, state
    if pruning:
        assert state["channels_equal"] and state["state_equal"], state


def test_sauron_resumes_exactly(tiny_ws):
    plans = f"{tiny.TINY_PLANS}_sauron_resume"
    run_cli("plan", "sauron", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--overwrite", "--plans-name",
            plans, "--tau-start", "0.3", "--tau-max", "0.4", "--rho", "2", "--kappa", "3", *SCHEDULE, env=tiny_ws.env(), check=True)
    snapshot = kill_after_epochs(tiny_ws, "nnUNetTrainerSauron", plans, 2)
    saved = torch.load(snapshot, map_location="cpu", weights_only=False)["nnunet_compress"]
    assert len(saved["state"]["channel_history"]) == 2 and saved["state"]["thresholds"]
    check_exact_reload(reloaded_state(tiny_ws, "nnUNetTrainerSauron", plans, snapshot), pruning=True)
    final = resume(tiny_ws, "nnUNetTrainerSauron", plans)
    history = final["nnunet_compress"]["state"]["channel_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3], "the resumed run lost or repeated epochs"
    assert history[:2] == saved["state"]["channel_history"]
    # channels only ever go (the resumed run started from the killed run's pruned shape), except where the class
    # guard undid a removal: a run from scratch this short has pseudo Dice near 0, and the guard may fire there
    undone = {r["checked_epoch"] for r in final["nnunet_compress"]["state"]["class_guard"]["rollbacks"]}
    for before, after in zip(history, history[1:]):
        if after["epoch"] not in undone:
            assert all(after["channels"][k] <= v for k, v in before["channels"].items())


def test_taylor_resumes_exactly(tiny_ws, tiny_base):
    plans = f"{tiny.TINY_PLANS}_taylor_resume"
    run_cli("plan", "taylor", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--overwrite", "--plans-name",
            plans, "--target-flops", "0.5", "--step", "0.05", "--accumulate-batches", "1", *SCHEDULE,
            env=tiny_ws.env(), check=True)
    snapshot = kill_after_epochs(tiny_ws, "nnUNetTrainerTaylorPruning", plans, 2, tiny.checkpoint_path(tiny_base))
    saved = torch.load(snapshot, map_location="cpu", weights_only=False)["nnunet_compress"]
    # pruned at the start of epochs 0 and 1; a step the class guard undid (judged at its own epoch's end) leaves
    # the history and is counted among the rollbacks instead
    saved_history = saved["state"]["history"]
    assert len(saved_history) + len(saved["state"]["class_guard"]["rollbacks"]) == 2, saved["state"]
    check_exact_reload(reloaded_state(tiny_ws, "nnUNetTrainerTaylorPruning", plans, snapshot), pruning=True)
    final = resume(tiny_ws, "nnUNetTrainerTaylorPruning", plans)
    history = final["nnunet_compress"]["state"]["history"]
    assert history[: len(saved_history)] == saved_history  # a later undo only ever removes a later step
    # one step per epoch, except where the class guard undid a step (its epoch then leaves the history); the
    # resumed run must have pruned on (a step kept or undone): with a freshly trained base the guard undid both of
    # its steps in one CI run, so "three steps kept" is not what resuming guarantees
    epochs = [h["epoch"] for h in history]
    undone = len(final["nnunet_compress"]["state"].get("class_guard", {}).get("rollbacks", []))
    assert epochs == sorted(set(epochs)) and epochs[-1] + 1 <= len(history) + undone, epochs
    assert len(history) + undone >= 3, (epochs, undone)
    assert all(b["flops"] < a["flops"] for a, b in zip(history, history[1:]))


def test_tucker_resumes_exactly(tiny_ws, tiny_base):
    plans = f"{tiny.TINY_PLANS}_tucker_resume"
    run_cli("plan", "tucker", "-d", tiny_ws.dataset_id, "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--overwrite", "--plans-name",
            plans, "--rank-ratio", "0.5", "--min-rank", "4", *SCHEDULE, env=tiny_ws.env(), check=True)
    snapshot = kill_after_epochs(tiny_ws, "nnUNetTrainerTucker", plans, 2, tiny.checkpoint_path(tiny_base))
    check_exact_reload(reloaded_state(tiny_ws, "nnUNetTrainerTucker", plans, snapshot), pruning=False)
    final = resume(tiny_ws, "nnUNetTrainerTucker", plans)
    assert final["current_epoch"] == 4
    assert final["network_weights"].keys() == torch.load(snapshot, weights_only=False)["network_weights"].keys()
