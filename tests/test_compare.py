"""`nnunet-compress compare` end to end on the tiny pipeline; every reported number is re-derived independently.

Dice from nnU-Net's own ``compute_metrics_on_folder`` on the same prediction files, the paired tests from scipy and a
hand-written Holm step, surface Dice from a brute-force distance computation, parameters from the checkpoint's
tensors and FLOPs from the Tucker compression report (analytic counts) of the same models.
"""

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_compare_metrics import brute_force_nsd

from conftest import run_cli

pytestmark = pytest.mark.e2e


def tree_checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def compressed(tiny_ws, tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "tucker0.5"
    run_cli("tucker", tiny_base, "-o", out, "--rank-ratio", "0.5", "--min-rank", "4", env=tiny_ws.env(), check=True)
    return out


@pytest.fixture(scope="module")
def report(tiny_ws, tiny_base, compressed, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_report") / "report"
    before = {p: tree_checksums(p) for p in (tiny_base, compressed)}
    proc = run_cli("compare", tiny_base, compressed, "-i", tiny_ws.raw_dataset / "imagesTs", "-l",
                   tiny_ws.raw_dataset / "labelsTs", "-o", out, "--disable-tta", "--tolerance-mm", "2",
                   "--profile-runs", "1", "--names", "base", "tucker0.5", env=tiny_ws.env(), check=True)
    assert {p: tree_checksums(p) for p in before} == before, "a model folder was modified"
    return out, proc.stdout


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_progress_and_files(report):
    out, stdout = report
    assert "[1/2] base: predicting 4 cases" in stdout and "[2/2] tucker0.5" in stdout
    assert "scoring: 8/8" in stdout and "profiling tucker0.5" in stdout
    for name in ("models.csv", "per_class.csv", "per_case.csv", "summary.json", "summary.md", "dice_per_class.png",
                 "pareto_flops.png", "pareto_latency.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    md = (out / "summary.md").read_text()
    assert "| base |" in md and "| tucker0.5 |" in md and "liver (1)" in md
    assert not list(out.glob(".report.partial-*")), "staging folder left behind"


def test_dice_matches_nnunet_compute_metrics(tiny_ws, report):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    out, _ = report
    summary = json.loads((out / "summary.json").read_text())
    per_case = read_csv(out / "per_case.csv")
    per_class = {(r["model"], r["label"]): r for r in read_csv(out / "per_class.csv")}
    models = {r["name"]: r for r in read_csv(out / "models.csv")}
    for name in ("base", "tucker0.5"):
        pred = out / "predictions" / name
        ref = compute_metrics_on_folder(str(tiny_ws.raw_dataset / "labelsTs"), str(pred),
                                        str(out.parent / f"{name}_nnunet_summary.json"), SimpleITKIO(), ".nii.gz",
                                        [1, 2, 3, 4], None, 1)
        for case_result in ref["metric_per_case"]:
            case = Path(case_result["reference_file"]).name[:-len(".nii.gz")]
            for label, metrics in case_result["metrics"].items():
                row = next(r for r in per_case if r["model"] == name and r["case"] == case and r["label"] == str(label))
                assert float(row["dice"]) == pytest.approx(metrics["Dice"], abs=1e-12)
                assert int(row["n_ref"]) == metrics["n_ref"] and int(row["n_pred"]) == metrics["n_pred"]
        for label, metrics in ref["mean"].items():
            assert float(per_class[(name, str(label))]["dice"]) == pytest.approx(metrics["Dice"], abs=1e-12)
        assert float(models[name]["mean_dice"]) == pytest.approx(ref["foreground_mean"]["Dice"], abs=1e-12)
    # a trained tiny model segments; the report is not about an empty prediction
    assert float(models["base"]["mean_dice"]) > 0.5
    assert summary["models"][1]["name"] == "tucker0.5"


def test_paired_tests_rederived(report):
    from scipy.stats import wilcoxon
    out, _ = report
    per_case = read_csv(out / "per_case.csv")
    rows = [r for r in read_csv(out / "per_class.csv") if r["model"] == "tucker0.5"]
    raw = []
    for r in rows:
        base = {c["case"]: float(c["dice"]) for c in per_case if c["model"] == "base" and c["label"] == r["label"]}
        comp = {c["case"]: float(c["dice"]) for c in per_case if c["model"] == "tucker0.5" and c["label"] == r["label"]}
        diff = np.array([comp[k] - base[k] for k in sorted(base)])
        p = 1.0 if not np.any(diff) else wilcoxon(diff).pvalue
        assert float(r["dice_p"]) == pytest.approx(p)
        assert float(r["dice_diff_mean"]) == pytest.approx(diff.mean())
        raw.append(p)
    # Holm by the textbook definition: adjusted p_(i) = max_{j<=i} (m - j + 1) p_(j), capped at 1
    m, order = len(raw), np.argsort(raw)
    holm = {}
    for rank, i in enumerate(order):
        holm[i] = min(1.0, max((m - j) * raw[order[j]] for j in range(rank + 1)))
    for i, r in enumerate(rows):
        assert float(r["dice_p_adj"]) == pytest.approx(holm[i])
        assert (r["dice_different"] == "True") == (holm[i] < 0.05)


def test_surface_dice_rederived_by_brute_force(tiny_ws, report):
    out, _ = report
    row = next(r for r in read_csv(out / "per_case.csv") if r["model"] == "tucker0.5" and r["label"] == "2")
    ref_img = sitk.ReadImage(str(tiny_ws.raw_dataset / "labelsTs" / f"{row['case']}.nii.gz"))
    pred_img = sitk.ReadImage(str(out / "predictions" / "tucker0.5" / f"{row['case']}.nii.gz"))
    spacing = np.array(ref_img.GetSpacing()[::-1])  # SimpleITK gives (x, y, z); arrays are (z, y, x)
    ref, pred = sitk.GetArrayFromImage(ref_img) == 2, sitk.GetArrayFromImage(pred_img) == 2
    assert float(row["nsd"]) == pytest.approx(brute_force_nsd(ref, pred, spacing, 2.0))


def test_cost_figures_rederived(tiny_base, compressed, report):
    out, _ = report
    models = {r["name"]: r for r in read_csv(out / "models.csv")}
    for name, folder in (("base", tiny_base), ("tucker0.5", compressed)):
        weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                             weights_only=False)["network_weights"]
        # nnU-Net registers modules under two names (.conv/.norm and .all_modules.N; the decoder's reference to the
        # encoder as decoder.encoder.*), so the state dict lists those tensors twice: count the aliases out
        assert int(models[name]["params"]) == sum(v.numel() for k, v in weights.items()
                                                  if ".all_modules." not in k and not k.startswith("decoder.encoder."))
        assert float(models[name]["latency_s"]) > 0 and int(models[name]["peak_memory_bytes"]) >= 0
    tucker_report = json.loads((compressed / "compression_report.json").read_text())
    assert int(models["base"]["flops"]) == tucker_report["flops_before"]
    assert int(models["tucker0.5"]["flops"]) == tucker_report["flops_after"]
    assert float(models["tucker0.5"]["flops_ratio"]) == pytest.approx(
        tucker_report["flops_after"] / tucker_report["flops_before"])


def test_rerun_reuses_predictions(tiny_ws, tiny_base, compressed, report, tmp_path):
    out, _ = report
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "predictions").rglob("*.nii.gz")}
    proc = run_cli("compare", tiny_base, compressed, "-i", tiny_ws.raw_dataset / "imagesTs", "-l",
                   tiny_ws.raw_dataset / "labelsTs", "-o", copy, "--disable-tta", "--tolerance-mm", "0",
                   "--no-timing", "--names", "base", "tucker0.5", env=tiny_ws.env(), check=True)
    assert proc.stdout.count("reusing predictions already on disk") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    strict = {(r["model"], r["case"], r["label"]): float(r["nsd"]) for r in read_csv(copy / "per_case.csv")}
    loose = {(r["model"], r["case"], r["label"]): float(r["nsd"]) for r in read_csv(out / "per_case.csv")}
    assert all(strict[k] <= loose[k] + 1e-12 for k in strict if not math.isnan(strict[k]))
    assert sum(strict.values()) < sum(loose.values())


def test_user_errors_are_one_line(tiny_ws, tiny_base, compressed, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(tiny_ws.raw_dataset / "labelsTs", labels)
    victim = sorted(labels.glob("*.nii.gz"))[0]
    victim.unlink()
    proc = run_cli("compare", tiny_base, compressed, "-i", tiny_ws.raw_dataset / "imagesTs", "-l", labels, "-o",
                   tmp_path / "r", env=tiny_ws.env())
    assert proc.returncode == 2 and victim.name[:-len(".nii.gz")] in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("compare", tiny_base, tmp_path / "nope", "-i", tiny_ws.raw_dataset / "imagesTs", "-l", labels,
                   "-o", tmp_path / "r", env=tiny_ws.env())
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("compare", tiny_base, compressed, "-i", tiny_ws.raw_dataset / "imagesTs", "-l", labels, "-o",
                   tiny_base / "report", env=tiny_ws.env())
    assert proc.returncode == 2 and not (tiny_base / "report").exists()
