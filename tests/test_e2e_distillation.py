"""End-to-end label-free distillation: pseudo-dataset → nnUNetv2_preprocess → plan tucker --distill --alpha 1 →
nnUNetv2_train -tr nnUNetTrainerTucker -pretrained_weights → nnUNetv2_predict, scored on held-out labelled cases.

The unlabelled images are synthetic cases no model saw (indices beyond the tiny dataset's training and test
cases); the tiny base model labels them and teaches the Tucker-compressed student. Plus: a --c resume reloads the
teacher, and the two pruning trainers run with --distill plans.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from nnunet_compress.demo import tiny
from nnunet_compress.nnunet.env import run_nnunet

pytestmark = pytest.mark.e2e

PSEUDO_ID = 502
PSEUDO_NAME = "SyntheticPseudo"
UNLABELLED = range(100, 108)  # the tiny dataset has cases 0..15
SCHEDULE = ["--iterations-per-epoch", "10", "--val-iterations", "2", "--lr", "1e-3", "--augmentation", "none",
            "--save-every", "1"]


@pytest.fixture(scope="module")
def pseudo_ws(tiny_ws, tiny_base, tmp_path_factory) -> tiny.TinyWorkspace:
    """Dataset 502: the unlabelled images with the base model's predictions as labels, preprocessed."""
    from nnunet_compress.nnunet.synthetic import write_unlabelled_images
    images = tmp_path_factory.mktemp("unlabelled") / "images"
    write_unlabelled_images(images, seed=0, indices=UNLABELLED)
    ws = tiny.TinyWorkspace(tiny_ws.root, PSEUDO_ID, PSEUDO_NAME)
    proc = run_cli("pseudo-dataset", tiny_base, "-i", images, "-d", PSEUDO_ID, "-n", PSEUDO_NAME, "--disable-tta",
                   "--num-processes", "1", "--overwrite", env=ws.env(), check=True)
    assert "nnUNetv2_preprocess" in proc.stdout
    run_nnunet(["nnUNetv2_preprocess", "-d", str(PSEUDO_ID), "-c", tiny.CONFIGURATION, "-plans_name", tiny.TINY_PLANS,
                "-np", "1"], ws.env(), ws.root / "logs" / "preprocess_pseudo.log")
    shutil.rmtree(ws.results / ws.dataset_folder_name, ignore_errors=True)  # models of an earlier (reused) run
    return ws


def test_pseudo_dataset_is_an_ordinary_nnunet_dataset(tiny_ws, tiny_base, pseudo_ws):
    import SimpleITK as sitk
    raw = pseudo_ws.raw_dataset
    cases = [f"synct_{i:03d}" for i in UNLABELLED]
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    parent_json = json.loads((tiny_base / "dataset.json").read_text())
    for key in ("labels", "channel_names", "file_ending"):
        assert dataset_json[key] == parent_json[key]
    assert dataset_json["numTraining"] == len(cases)
    assert dataset_json["nnunet_compress_pseudo_labels"]["parent_model_folder"] == str(tiny_base.resolve())
    plans = json.loads(pseudo_ws.plans_path(tiny.TINY_PLANS).read_text())
    assert plans["dataset_name"] == pseudo_ws.dataset_folder_name
    # the labels are the parent's segmentations: its label values, foreground included (a short-trained tiny base may
    # miss the small lesion class altogether, so not necessarily every class)
    found = set()
    for c in cases:
        found |= set(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{c}.nii.gz"))).ravel().tolist())
    assert found <= set(parent_json["labels"].values()) and len(found - {0}) >= 2, found
    assert not list(pseudo_ws.raw.glob(".*partial*")) and not list(pseudo_ws.preprocessed.glob(".*partial*"))


def predict_held_out(tiny_ws, ws, trainer: str, plans: str, output: Path, fold: str = "all") -> Path:
    """nnUNetv2_predict (model found by dataset, trainer and plans) on the tiny dataset's labelled test cases."""
    run_nnunet(["nnUNetv2_predict", "-i", str(tiny_ws.raw_dataset / "imagesTs"), "-o", str(output), "-d",
                str(ws.dataset_id), "-c", tiny.CONFIGURATION, "-f", fold, "-tr", trainer, "-p", plans, "-device",
                "cpu", "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1"],
               ws.env(), ws.root / "logs" / f"predict_{output.name}.log")
    return output


def test_label_free_distillation_beats_the_compressed_model_without_fine_tuning(tiny_ws, tiny_base, pseudo_ws,
                                                                                tmp_path):
    # the compressed model without fine-tuning: what distillation has to improve on
    untuned = tmp_path / "tucker0.5"
    run_cli("tucker", tiny_base, "-o", untuned, "--rank-ratio", "0.5", "--min-rank", "4", env=tiny_ws.env(),
            check=True)
    before = tiny.dice_scores(tiny_ws, tiny.predict_folder(tiny_ws, untuned, tiny_ws.root / "distill_untuned"))

    plans_name = f"{tiny.TINY_PLANS}_tucker0.5_distill"
    run_cli("plan", "tucker", "-d", PSEUDO_ID, "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS, "--rank-ratio", "0.5",
            "--min-rank", "4", "--distill", "--alpha", "1", "--epochs", "3", *SCHEDULE, "--overwrite",
            env=pseudo_ws.env(), check=True)
    section = json.loads(pseudo_ws.plans_path(plans_name).read_text())["configurations"]["3d_fullres"][
        "nnunet_compress"]
    # no --teacher: the teacher is the -pretrained_weights checkpoint; unset settings are not written (settings.py)
    assert section["distillation"] == {"alpha": 1.0, "temperature": 2.0}
    parent_ckpt = tiny.checkpoint_path(tiny_base)
    folder = tiny.train(pseudo_ws, plans_name, "nnUNetTrainerTucker", fold="all", pretrained=parent_ckpt,
                        log_name="distill_tucker")
    log = next((folder / "fold_all").glob("training_log_*.txt")).read_text()
    assert f"[distill] teacher PlainConvUNet from {parent_ckpt.resolve()}" in log
    assert log.count("[distill] label loss") == 3, log
    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    entry = checkpoint["nnunet_compress_distillation"]
    assert entry["teacher"] == str(parent_ckpt.resolve()) and len(entry["history"]) == 3
    # the teacher's weights are not in the checkpoint: only the factorised student's
    assert any(k.endswith(".conv.1.weight") for k in checkpoint["network_weights"])
    parent_keys = set(torch.load(parent_ckpt, map_location="cpu", weights_only=False)["network_weights"])
    assert not parent_keys <= set(checkpoint["network_weights"])

    after = tiny.dice_scores(tiny_ws, predict_held_out(tiny_ws, pseudo_ws, "nnUNetTrainerTucker", plans_name,
                                                       tiny_ws.root / "distill_tucker"))
    print(f"held-out mean Dice: Tucker 0.5 without fine-tuning {before['mean_foreground']:.3f}, after label-free "
          f"distillation {after['mean_foreground']:.3f} (per class {before['per_class']} -> {after['per_class']})")
    assert after["mean_foreground"] > before["mean_foreground"] + 0.01, (before, after)

    # --c takes no -pretrained_weights: the teacher comes back from the path in the checkpoint
    plans_path = pseudo_ws.plans_path(plans_name)
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"]["nnunet_compress"]["schedule"]["num_epochs"] = 4
    plans_path.write_text(json.dumps(plans, indent=2))
    old_logs = set((folder / "fold_all").glob("training_log_*.txt"))
    tiny.train(pseudo_ws, plans_name, "nnUNetTrainerTucker", fold="all", extra=["--c"], log_name="distill_resume")
    new_log = next(iter(set((folder / "fold_all").glob("training_log_*.txt")) - old_logs)).read_text()
    assert f"[distill] teacher PlainConvUNet from {parent_ckpt.resolve()}" in new_log
    assert "Epoch 3" in new_log and new_log.count("[distill] label loss") == 1, new_log
    resumed = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(resumed["nnunet_compress_distillation"]["history"]) == 4


@pytest.mark.parametrize("method, trainer, options", [
    ("taylor", "nnUNetTrainerTaylorPruning", ["--target-flops", "0.8", "--step", "0.1", "--accumulate-batches", "2",
                                              "--class-guard", "0"]),
    ("sauron", "nnUNetTrainerSauron", ["--tau-start", "0.2", "--tau-max", "0.4", "--kappa", "2", "--class-guard",
                                       "0"]),
])
def test_pruning_trainers_distil_with_labels(tiny_ws, tiny_base, method, trainer, options):
    """Labels and teacher together (α = 0.5, --teacher given in the plans), on the labelled dataset."""
    plans_name = f"{tiny.TINY_PLANS}_{method}_distill_e2e"
    parent_ckpt = tiny.checkpoint_path(tiny_base)
    run_cli("plan", method, "-d", tiny_ws.dataset_id, "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS, *options,
            "--plans-name", plans_name, "--distill", "--alpha", "0.5", "--teacher", parent_ckpt, "--epochs", "2",
            "--iterations-per-epoch", "5", "--val-iterations", "1", "--augmentation", "none", "--overwrite",
            env=tiny_ws.env(), check=True)
    folder = tiny.train(tiny_ws, plans_name, trainer, pretrained=parent_ckpt, log_name=f"distill_{method}")
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert f"[distill] teacher PlainConvUNet from {parent_ckpt.resolve()}" in log
    assert log.count("[distill] label loss") == 2, log
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "nnunet_compress" in checkpoint and "nnunet_compress_distillation" in checkpoint


def test_plan_distill_bad_input(tiny_ws, tiny_base, tmp_path):
    """One error line, exit code 2, no plans written, the parent untouched."""
    compressed = "bad_distill_parent"  # plans that are already compressed cannot be a distilled model's parent
    run_cli("plan", "tucker", "-d", tiny_ws.dataset_id, "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS,
            "--rank-ratio", "0.5", "--plans-name", compressed, "--overwrite", env=tiny_ws.env(), check=True)
    before = sorted(p.name for p in tiny_ws.plans_path(tiny.TINY_PLANS).parent.iterdir())
    parent_ckpt = tiny.checkpoint_path(tiny_base)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(parent_ckpt.read_bytes()[:4000])
    other_classes = tmp_path / "other_classes.pth"
    ckpt = torch.load(parent_ckpt, map_location="cpu", weights_only=False)
    ckpt["init_args"]["dataset_json"]["labels"] = {"background": 0, "liver": 1}
    torch.save(ckpt, other_classes)
    wider = tmp_path / "wider.pth"
    ckpt = torch.load(parent_ckpt, map_location="cpu", weights_only=False)
    key = "encoder.stages.0.0.convs.0.conv.weight"
    ckpt["network_weights"][key] = torch.zeros(16, *ckpt["network_weights"][key].shape[1:])
    torch.save(ckpt, wider)
    cases = [
        (["tucker", "--rank-ratio", "0.5", "--distill", "--alpha", "1.5"], r"--alpha 1.5 is outside \[0, 1\]"),
        (["tucker", "--rank-ratio", "0.5", "--distill", "--temperature", "0"], "must be positive"),
        (["taylor", "--target-flops", "0.5", "--alpha", "0.5"], "only with --distill"),
        (["sauron", "--distill", "--teacher", tmp_path / "missing.pth"], "teacher checkpoint .* does not exist"),
        (["sauron", "--distill", "--teacher", corrupt], "corrupt"),
        (["tucker", "--rank-ratio", "0.5", "--distill", "--teacher", other_classes], "trained for labels"),
        (["taylor", "--target-flops", "0.5", "--distill", "--teacher", wider], "does not fit the parent architecture"),
        (["tucker", "--rank-ratio", "0.5", "--distill"], "already compressed", compressed),
    ]
    import re
    for args, message, *parent in cases:
        proc = run_cli("plan", args[0], "-d", tiny_ws.dataset_id, "-c", tiny.CONFIGURATION, "-p",
                       parent[0] if parent else tiny.TINY_PLANS, *args[1:], "--plans-name", "bad_distill",
                       env=tiny_ws.env())
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), (args, proc.stderr)
    assert sorted(p.name for p in tiny_ws.plans_path(tiny.TINY_PLANS).parent.iterdir()) == before
    tiny_ws.plans_path(compressed).unlink()
