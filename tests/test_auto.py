"""``nnunet-compress auto`` on the trained tiny model: the search, its answer and its bad inputs.

The search runs as a user runs it (a subprocess of the CLI, the CPU engine on); its answer is checked against an
independent grading (the winner folder predicted by ``nnUNetv2_predict_from_modelfolder`` and scored by nnU-Net's
evaluation here). A search killed after its first finished candidate must resume without rebuilding it; the same
work area re-chosen under a budget no candidate meets must return the parent; a time budget must stop the search;
bad input gets one-line errors; the source folder stays byte-identical. Two cheap candidates keep it to minutes.
With ``--fine-tune-epochs`` (1 epoch of 25 iterations) the frontier candidate must be trained as the compressed
network it is, listed with its Dice before fine-tuning, win where only it fits the budget, and not be trained again
on a resume.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_e2e_tucker import tree_checksums

from conftest import run_cli
from nnunet_compress.auto.candidates import parse_candidate, parse_candidates
from nnunet_compress.auto.fine_tune import frontier
from nnunet_compress.auto.quality_data import split_cases, split_off_training
from nnunet_compress.auto.search import AutoSettings, Row, Search, choose_winner
from nnunet_compress.demo import tiny
from nnunet_compress.errors import CompressError

pytestmark = pytest.mark.e2e

SPECS = ["tucker:ratio=0.5", "l1:flops=0.5"]
BUDGET = 0.2


def engine_env(ws) -> dict:
    return {**ws.env(), "NNUNET_COMPRESS_CPU_ENGINE": "openvino"}


def auto_args(base, out, work, *extra) -> list[str]:
    return ["auto", str(base), "-o", str(out), "--work-dir", str(work), "--candidates", *SPECS, "--timing-runs",
            "2", *map(str, extra)]


@pytest.fixture(scope="module")
def source_checksums(tiny_base):
    return tree_checksums(tiny_base)


@pytest.fixture(scope="module")
def killed_then_resumed(tiny_ws, tiny_base, source_checksums, tmp_path_factory):
    """A search killed (SIGKILL, whole process group) once its first candidate is finished, then resumed."""
    root = tmp_path_factory.mktemp("auto")
    out, work = root / "best", root / "work"
    first = parse_candidates(SPECS)[0]
    result = work / "candidates" / first.name / "result.json"
    args = [sys.executable, "-m", "nnunet_compress.cli",
            *auto_args(tiny_base, out, work, "--dataset", tiny_ws.dataset_id, "--max-dice-drop", BUDGET)]
    proc = subprocess.Popen(args, env=engine_env(tiny_ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 1200
    while not result.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"auto ended before it was killed:\n{proc.stdout.read()}")
        assert time.time() < deadline, "the first candidate did not finish in 20 minutes"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed search left an output folder"
    finished = {"result": result.stat().st_mtime_ns,
                "checkpoint": tiny.checkpoint_path(work / "candidates" / first.name / "model").stat().st_mtime_ns}
    resumed = run_cli(*auto_args(tiny_base, out, work, "--dataset", tiny_ws.dataset_id, "--max-dice-drop", BUDGET,
                                 "--resume"), env=engine_env(tiny_ws), check=True)
    return {"out": out, "work": work, "first": first, "finished": finished, "proc": resumed,
            "report": json.loads((out / "auto_report.json").read_text())}


def test_resume_after_kill_does_not_rebuild_finished_candidates(killed_then_resumed):
    r = killed_then_resumed
    first, work = r["first"], r["work"]
    assert (work / "candidates" / first.name / "result.json").stat().st_mtime_ns == r["finished"]["result"]
    checkpoint = tiny.checkpoint_path(work / "candidates" / first.name / "model")
    assert checkpoint.stat().st_mtime_ns == r["finished"]["checkpoint"]
    assert f"candidate 1/2 {first.spec}" in r["proc"].stdout and "finished in an earlier run" in r["proc"].stdout
    log = (work / "auto.log").read_text()
    assert log.count(f"{first.spec}: building from") == 1
    assert all(m["status"] == "graded" for m in r["report"]["models"]), r["report"]["models"]


def test_winner_meets_the_budget_on_held_out_cases(tiny_ws, tiny_base, killed_then_resumed):
    r = killed_then_resumed
    report, out = r["report"], r["out"]
    assert report["verdict"] == "winner" and report["labelled"]
    assert set(report["choosing_cases"]).isdisjoint(report["held_out_cases"])
    winner = report["winner"]
    chosen = max((m for m in report["models"][1:] if m["within_budget"]), key=lambda m: m["speedup_same_engine"])
    assert winner["name"] == chosen["name"]  # the fastest within the budget on the choosing cases
    # independent grading: the output folder and the parent predicted by nnU-Net's CLI on the held-out cases
    held = r["work"] / "quality" / "held_out" / "images"
    labels = tiny_ws.raw_dataset / "labelsTr"
    mine = tiny.dice_scores(tiny_ws, tiny.predict_folder(tiny_ws, out, tiny_ws.root / "auto_winner_pred",
                                                         input_folder=held), labels)["mean_foreground"]
    parent = tiny.dice_scores(tiny_ws, tiny.predict_folder(tiny_ws, tiny_base, tiny_ws.root / "auto_parent_pred",
                                                           input_folder=held), labels)["mean_foreground"]
    assert parent - mine <= BUDGET
    assert abs((parent - mine) - winner["dice_drop_held_out"]) < 0.02  # engine vs torch predictions may differ
    for name in ("auto_report.md", "auto_report.csv", "auto_pareto.png", "plans.json", "dataset.json"):
        assert (out / name).is_file(), name
    assert "nnunet-compress tucker" in (out / "auto_report.md").read_text() or "nnunet-compress prune" in \
        (out / "auto_report.md").read_text()
    last = r["proc"].stdout.strip().splitlines()[-1]
    assert last.startswith(f"winner {winner['spec']}:") and "held-out" in last and "plain torch" in last


def test_parent_is_the_answer_when_no_candidate_meets_the_budget(tiny_ws, tiny_base, killed_then_resumed,
                                                                 tmp_path):
    r = killed_then_resumed
    graded = [m for m in r["report"]["models"][1:] if m["status"] == "graded"]
    budget = 0.001
    assert all(m["dice_drop_choose"] > budget for m in graded)  # precondition: nothing meets it
    out = tmp_path / "none"
    proc = run_cli(*auto_args(tiny_base, out, r["work"], "--dataset", tiny_ws.dataset_id, "--max-dice-drop", budget,
                              "--resume"), env=engine_env(tiny_ws), check=True)
    report = json.loads((out / "auto_report.json").read_text())
    assert report["verdict"] == "no candidate within the budget" and report["winner"] is None
    assert not (out / "plans.json").exists() and not list(out.glob("fold_*")), "a model folder was written"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("no winner") and "stays the answer" in last


def test_time_budget_stops_the_search_label_free(tiny_ws, tiny_base, source_checksums, tmp_path):
    out, work = tmp_path / "best", tmp_path / "work"
    proc = run_cli(*auto_args(tiny_base, out, work, "--images", tiny_ws.raw_dataset / "imagesTs", "--time-budget",
                              0.001), env=engine_env(tiny_ws), check=True)
    report = json.loads((out / "auto_report.json").read_text())
    assert report["stopped_by_time_budget_after"] == 0 and report["winner"] is None
    assert [m["status"] for m in report["models"][1:]] == ["not tried (time budget)"] * 2
    assert not (work / "candidates").exists()
    assert not report["labelled"] and "parent's own predictions" in report["graded_against"]
    assert report["parent_dice_choose"] == pytest.approx(1.0)  # the parent against its own predictions
    assert "time budget" in proc.stdout.strip().splitlines()[-1]


def test_source_folder_is_byte_identical(tiny_base, source_checksums, killed_then_resumed):
    assert tree_checksums(tiny_base) == source_checksums


# ---- bad input ---------------------------------------------------------------------------------------------------


def settings(base, tmp_path, **kw) -> AutoSettings:
    return AutoSettings(base, tmp_path / "out", **kw)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.1, 1.5])
def test_budget_outside_0_1_is_refused(tiny_base, tmp_path, budget):
    with pytest.raises(CompressError, match=r"--max-dice-drop .* is outside \(0, 1\)"):
        Search(settings(tiny_base, tmp_path, max_dice_drop=budget, images=tmp_path))


def test_no_quality_data_is_refused_in_one_line(tiny_ws, tiny_base, tmp_path):
    proc = run_cli("auto", tiny_base, "-o", tmp_path / "out", env=tiny_ws.env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no quality data: pass --dataset ID")
    assert not (tmp_path / "out").exists()


def test_not_a_model_folder_is_refused(tiny_ws, tmp_path):
    with pytest.raises(CompressError, match="is not an nnU-Net model folder: plans.json is missing"):
        Search(settings(tmp_path, tmp_path, images=tiny_ws.raw_dataset / "imagesTs"))


def test_labels_that_do_not_match_the_images_are_refused(tiny_ws, tiny_base, tmp_path):
    images, labels = tiny_ws.raw_dataset / "imagesTs", tmp_path / "labels"
    labels.mkdir()
    files = sorted((tiny_ws.raw_dataset / "labelsTs").glob("*.nii.gz"))
    for f in files[1:]:
        (labels / f.name).symlink_to(f)
    with pytest.raises(CompressError, match=f"the labels do not match the images: .* has no {files[0].name}"):
        Search(settings(tiny_base, tmp_path, images=images, labels=labels))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(labels / files[0].name))
    with pytest.raises(CompressError, match="the labels do not match the images: case .* voxels in the image"):
        Search(settings(tiny_base, tmp_path, images=images, labels=labels))


def test_both_quality_sources_and_bad_candidates_are_refused(tiny_ws, tiny_base, tmp_path):
    with pytest.raises(CompressError, match="pass one source of quality data"):
        Search(settings(tiny_base, tmp_path, dataset=str(tiny_ws.dataset_id), images=tmp_path))
    with pytest.raises(CompressError, match="int8 can only be the last step"):
        parse_candidate("int8+tucker:ratio=0.5")
    with pytest.raises(CompressError, match="outside \\(0, 1\\)"):
        parse_candidate("l1:flops=2")
    with pytest.raises(CompressError, match="unknown method 'svd'"):
        parse_candidate("svd:ratio=0.5")


def test_case_split_keeps_a_held_out_part_and_is_seeded():
    cases = [f"c{i}" for i in range(7)]
    choose, held = split_cases(cases, 0.5, seed=0)
    assert sorted(choose + held) == cases and not set(choose) & set(held) and len(held) == 3
    assert split_cases(cases, 0.5, seed=0) == (choose, held)
    with pytest.raises(CompressError, match="at least 2"):
        split_cases(["c0"], 0.5, 0)


def test_default_candidates_are_cheapest_first_and_rebuildable(tmp_path):
    candidates = parse_candidates(None)
    costs = [c.cost for c in candidates]
    assert costs == sorted(costs) and len(candidates) == 20
    assert sum(c.spec.endswith("+int8") for c in candidates) == 10
    chain = parse_candidate("l1:flops=0.5+tucker:ratio=0.5+int8")
    commands = chain.commands(tmp_path / "parent", {"images": "IMG", "labels": "LAB", "max_dice_drop": "0.01",
                                                    "subset_size": "16", "validation_patches": "8"})
    assert [c.split()[1] for c in commands] == ["prune", "tucker", "quantize"]
    assert "-o l1_flops0.5 " in commands[0] and commands[1].startswith("nnunet-compress tucker l1_flops0.5 ")


def test_winner_is_ranked_by_side_by_side_speedup_not_raw_seconds():
    """Raw seconds of candidates timed at different loads mislead; the ratio to the parent beside them does not."""
    def row(name, seconds, speedup, dice):
        return Row(name, name, "graded", speed={"seconds": seconds, "speedup_same_engine": speedup},
                   choose={"mean_dice": dice})
    parent = row("parent", 0.5, None, 0.90)
    rows = [row("loaded", 0.02, 1.5, 0.895), row("quiet_but_faster", 0.05, 3.0, 0.891), row("over", 0.01, 9.0, 0.5),
            Row("broken", "broken", "failed")]
    assert choose_winner(parent, rows, 0.01).name == "quiet_but_faster"
    assert choose_winner(parent, rows, 0.001) is None


# ---- fine-tuning (--fine-tune-epochs) ----------------------------------------------------------------------------

# one-shot L1 pruning to half the FLOPs loses about 0.29 Dice on the tiny model and one epoch of 25 iterations
# wins back about 0.06 of it (Tucker at ratio 0.5 loses only 0.03, which such a short run does not move)
FT_SPECS = ["l1:flops=0.5"]
FT_BUDGET = 0.01
FT_ARGS = ["--candidates", *FT_SPECS, "--fine-tune-epochs", "1", "--fine-tune-iterations", "25",
           "--fine-tune-count", "1"]


def fine_tune_env(ws) -> dict:
    # this checkout's trainers first, so nnU-Net trains with the nnUNetTrainerFineTune of the code under test;
    # data loading in the training process, so the parent plans' seed makes the run repeat
    trainers = str(Path(__file__).resolve().parent.parent / "trainers")
    return {**engine_env(ws), "nnUNet_extTrainer": trainers, "nnUNet_n_proc_DA": "0"}


def ft_args(base, out, work, *extra) -> list[str]:
    return ["auto", str(base), "-o", str(out), "--work-dir", str(work), "--timing-runs", "2", *FT_ARGS,
            *map(str, extra)]


@pytest.fixture(scope="module")
def fine_tuned(tiny_ws, tiny_base, tmp_path_factory):
    """A search with --fine-tune-epochs at a budget the cheap candidate misses: it is fine-tuned and graded."""
    root = tmp_path_factory.mktemp("auto_ft")
    out, work = root / "best", root / "work"
    proc = run_cli(*ft_args(tiny_base, out, work, "--dataset", tiny_ws.dataset_id, "--max-dice-drop", FT_BUDGET),
                   env=fine_tune_env(tiny_ws), check=True)
    report = json.loads((out / "auto_report.json").read_text())
    tuned = [m for m in report["models"] if m.get("fine_tuned_from")]
    assert len(tuned) == 1, report["models"]
    result = work / "candidates" / tuned[0]["name"] / "result.json"
    return {"work": work, "proc": proc, "report": report, "tuned": tuned[0], "mtime": result.stat().st_mtime_ns}


def test_fine_tuned_candidate_is_the_frontier_one_trained_as_compressed(fine_tuned):
    report, ft, work = fine_tuned["report"], fine_tuned["tuned"], fine_tuned["work"]
    cheap = [m for m in report["models"][1:] if not m.get("fine_tuned_from")]
    assert all(m["status"] == "graded" and m["dice_drop_choose"] > FT_BUDGET for m in cheap)  # precondition
    source = min(cheap, key=lambda m: m["dice_drop_choose"])  # none within: the smallest miss is the frontier
    assert ft["fine_tuned_from"] == source["name"] and ft["spec"] == f"{source['spec']}+ft:epochs=1"
    assert ft["status"] == "graded" and ft["dice_before_fine_tune"] == pytest.approx(source["dice_choose"])
    assert report["fine_tune_epochs"] == 1 and report["fine_tuned"] == 1
    commands = " ".join(ft["commands"])
    assert "nnUNetv2_train" in commands and "-tr nnUNetTrainerFineTune" in commands and "-pretrained_weights" in \
        commands
    assert f"fine-tune 1/1 {source['spec']}" in fine_tuned["proc"].stdout
    assert f"| `{ft['spec']}` |" in (work / "report" / "auto_report.md").read_text()
    # the compressed network itself was trained: same architecture as its source, other weights
    import torch
    src_folder, ft_folder = (work / "candidates" / n / "model" for n in (source["name"], ft["name"]))
    arch = [json.loads((f / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
            for f in (src_folder, ft_folder)]
    assert arch[0] == arch[1]
    before, after = (torch.load(tiny.checkpoint_path(f), map_location="cpu", weights_only=False)
                     for f in (src_folder, ft_folder))
    assert after["trainer_name"] == "nnUNetTrainerFineTune"
    assert before["network_weights"].keys() == after["network_weights"].keys()
    assert any(not torch.equal(before["network_weights"][k], after["network_weights"][k])
               for k in before["network_weights"])


def test_winner_can_be_fine_tuned_and_resume_does_not_train_again(tiny_ws, tiny_base, fine_tuned, tmp_path):
    ft, work = fine_tuned["tuned"], fine_tuned["work"]
    source = next(m for m in fine_tuned["report"]["models"] if m["name"] == ft["fine_tuned_from"])
    assert ft["dice_drop_choose"] < source["dice_drop_choose"], "fine-tuning did not raise the Dice"  # precondition
    budget = (ft["dice_drop_choose"] + source["dice_drop_choose"]) / 2  # the fine-tuned one fits, its source not
    out = tmp_path / "best"
    proc = run_cli(*ft_args(tiny_base, out, work, "--dataset", tiny_ws.dataset_id, "--max-dice-drop", budget,
                            "--resume"), env=fine_tune_env(tiny_ws), check=True)
    report = json.loads((out / "auto_report.json").read_text())
    assert report["winner"]["name"] == ft["name"], report["models"]
    assert report["verdict"] in ("winner", "winner vetoed on held-out cases")
    # resumed: read from its result.json, not trained again
    assert (work / "candidates" / ft["name"] / "result.json").stat().st_mtime_ns == fine_tuned["mtime"]
    assert (work / "auto.log").read_text().count("fine-tuning fold 0") == 1
    assert "finished in an earlier run" in next(line for line in proc.stdout.splitlines()
                                                 if line.startswith("fine-tune 1/1 ") and "ft:epochs" in line)
    if report["verdict"] == "winner":
        checkpoint = torch_load(tiny.checkpoint_path(out))
        assert checkpoint["trainer_name"] == "nnUNetTrainerFineTune"


def torch_load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def test_label_free_fine_tuning_distils_on_cases_never_chosen_or_graded(tiny_ws, tiny_base, tmp_path):
    """--images without labels: a part of the images becomes a private nnU-Net dataset labelled by the parent, and
    the frontier candidate is fine-tuned towards the parent's soft predictions, each fold from its own teacher."""
    out, work = tmp_path / "best", tmp_path / "work"
    images = tiny_ws.raw_dataset / "imagesTs"
    proc = run_cli(*ft_args(tiny_base, out, work, "--images", images, "--max-dice-drop", FT_BUDGET),
                   env=fine_tune_env(tiny_ws), check=True)
    report = json.loads((out / "auto_report.json").read_text())
    train, choose, held = (set(report[k]) for k in ("fine_tune_cases", "choosing_cases", "held_out_cases"))
    all_cases = {f.name.removesuffix("_0000.nii.gz") for f in images.glob("*_0000.nii.gz")}
    assert train and not train & (choose | held) and train | choose | held == all_cases
    assert not report["labelled"] and report["fine_tuned_by"].startswith("distillation from the parent")
    tuned = [m for m in report["models"] if m.get("fine_tuned_from")]
    assert len(tuned) == 1 and tuned[0]["status"] == "graded", report["models"]
    # the training dataset: private, the fine-tuning cases only, labelled by the parent
    dataset = work / "fine_tune_data" / "raw" / "Dataset999_AutoFineTune"
    assert {f.name.removesuffix(".nii.gz") for f in (dataset / "labelsTr").iterdir()} == train
    provenance = json.loads((dataset / "dataset.json").read_text())["nnunet_compress_pseudo_labels"]
    assert provenance["labels"] == "the parent's predictions"
    assert not list((tiny_ws.root / "nnUNet_raw").glob("Dataset999_*"))  # the user's nnU-Net folders gained nothing
    # each fold distils from the parent's same fold, teacher term only
    plans = json.loads((work / "candidates" / tuned[0]["name"] / "fine_tune_plans_fold_0.json").read_text())
    distillation = plans["configurations"]["3d_fullres"]["nnunet_compress"]["distillation"]
    assert distillation["alpha"] == 1.0
    assert Path(distillation["teacher"]).resolve() == tiny.checkpoint_path(tiny_base).resolve()
    log = (work / "candidates" / tuned[0]["name"] / "logs" / "fine_tune_fold_0.log").read_text()
    assert "[distill] teacher" in log
    source = work / "candidates" / tuned[0]["fine_tuned_from"] / "model"
    before, after = (torch_load(tiny.checkpoint_path(f)) for f in (source, work / "candidates" / tuned[0]["name"] /
                                                                   "model"))
    assert after["trainer_name"] == "nnUNetTrainerFineTune"
    assert any(not np.array_equal(before["network_weights"][k].numpy(), after["network_weights"][k].numpy())
               for k in before["network_weights"])
    commands = " ".join(tuned[0]["commands"])
    assert "pseudo-dataset" in commands and "nnUNetv2_preprocess -d 999" in commands
    assert "Fine-tuning: distillation from the parent" in (out / "auto_report.md").read_text()
    assert "fine-tune 1/1" in proc.stdout


def test_fine_tuning_split_keeps_cases_apart_and_is_seeded():
    cases = [f"c{i}" for i in range(9)]
    train, rest = split_off_training(cases, 0.5, seed=3)
    assert len(train) == 4 and sorted(train + rest) == cases and not set(train) & set(rest)
    assert split_off_training(cases, 0.5, seed=3) == (train, rest)
    assert split_off_training(cases, 0.5, seed=4) != (train, rest)
    assert [len(p) for p in split_off_training(cases[:3], 0.9, seed=0)] == [1, 2]  # two left to choose and grade
    with pytest.raises(CompressError, match="at least 3"):
        split_off_training(cases[:2], 0.5, seed=0)


def test_fine_tuning_options_are_checked(tiny_ws, tiny_base, tmp_path):
    images = tiny_ws.raw_dataset / "imagesTs"
    for fraction in (0.0, 1.0):
        with pytest.raises(CompressError, match="--fine-tune-fraction"):
            Search(settings(tiny_base, tmp_path, images=images, fine_tune_epochs=1, fine_tune_fraction=fraction))
    with pytest.raises(CompressError, match="fine-tuning from --images needs at least 3"):
        Search(settings(tiny_base, tmp_path, images=images, fine_tune_epochs=1, max_cases=2,
                        work_dir=tmp_path / "w"))
    assert not (tmp_path / "out").exists()


def test_frontier_is_faster_than_the_best_within_budget_smallest_miss_first():
    def row(name, speedup, dice):
        return Row(name, name, "graded", speed={"speedup_same_engine": speedup}, choose={"mean_dice": dice})
    rows = [row("within", 2.0, 0.895), row("slow_close", 1.5, 0.889), row("fast_close", 3.0, 0.885),
            row("fast_close+int8", 4.0, 0.884), row("fast_far", 5.0, 0.6), Row("broken", "broken", "failed")]
    f32 = {r.name: r.name.removesuffix("+int8") for r in rows}
    pick = [r.name for r in frontier(rows, 0.90, 0.01, 2, lambda r: r.speed["speedup_same_engine"],
                                     lambda r: f32[r.name])]
    assert pick == ["fast_close", "fast_far"]  # one f32 network each before the INT8 twin of a chosen one
    pick = [r.name for r in frontier(rows, 0.90, 0.01, 3, lambda r: r.speed["speedup_same_engine"],
                                     lambda r: f32[r.name])]
    assert pick == ["fast_close", "fast_far", "fast_close+int8"]


def test_int8_candidate_is_fine_tuned_as_its_f32_network_then_quantised(tmp_path):
    candidate = parse_candidate("l1:flops=0.5+tucker:ratio=0.5+int8").fine_tuned(3)
    assert candidate.spec == "l1:flops=0.5+tucker:ratio=0.5+ft:epochs=3+int8"
    assert candidate.prefix.spec == "l1:flops=0.5+tucker:ratio=0.5+ft:epochs=3"  # the INT8 step's source
    data = {"images": "IMG", "max_dice_drop": "0.01", "subset_size": "16", "validation_patches": "8",
            "dataset": "Dataset501_X", "configuration": "3d_fullres", "checkpoint": "checkpoint_final.pth",
            "folds": "0,1", "plans_name": "nnUNetPlans", "candidates_root": str(tmp_path), "device": "cpu"}
    commands = candidate.commands(tmp_path / "parent", data)
    tools = [c.split()[0] if c.split()[0] != "nnunet-compress" else c.split()[1] for c in commands]
    assert tools == ["prune", "tucker", "cp", "nnUNetv2_train", "nnUNetv2_train", "cp", "quantize"]
    ft_name = candidate.prefix.name
    assert f"-p nnUNetPlans_auto_{ft_name} -tr nnUNetTrainerFineTune" in commands[3]
    assert "-pretrained_weights l1_flops0.5+tucker_ratio0.5/fold_1/checkpoint_final.pth" in commands[4]
    assert commands[-1].startswith(f"nnunet-compress quantize {ft_name} ")
