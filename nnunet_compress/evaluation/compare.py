"""``nnunet-compress compare``: does the compressed model segment as well as its base, and what does it save?

For a base model folder and one or more compressed ones, on a labelled test set:

1. predict every case with every model through nnU-Net's own predictor (reusing earlier predictions,
   :mod:`nnunet_compress.nnunet.predictions`);
2. score every case and class: Dice by nnU-Net's ``compute_metrics`` and the normalised surface Dice at a tolerance
   in mm (:mod:`nnunet_compress.evaluation.case_metrics`);
3. per class, a paired Wilcoxon signed-rank test of each compressed model against the base, corrected across the
   classes of that model (:mod:`nnunet_compress.evaluation.stats`);
4. parameters, FLOPs, latency and peak memory of each model on one patch (:mod:`nnunet_compress.evaluation.profiling`);
5. write ``models.csv``, ``per_class.csv``, ``per_case.csv``, ``summary.json``, ``summary.md`` and PNG plots
   (:mod:`nnunet_compress.evaluation.report_plots`) into the report folder.

The report folder also keeps the predictions (``predictions/<model>/``) so a re-run is cheap. The report files
are first written to a temporary folder and then moved into place one by one, so every file is complete, and
``summary.json`` (moved last) always describes the files beside it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.evaluation.base_reference import BaseReference
from nnunet_compress.evaluation.case_metrics import classes_of, find_cases, nanmean, score_all
from nnunet_compress.evaluation.profiling import measure_peak_memory, profile_network
from nnunet_compress.evaluation.report_markdown import summary_markdown
from nnunet_compress.evaluation.report_plots import plot_dice_per_class, plot_pareto
from nnunet_compress.evaluation.stats import CORRECTIONS, adjust, paired_wilcoxon
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    input_channels_of,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import resolved_configuration
from nnunet_compress.nnunet.predictions import predict_cases
from nnunet_compress.progress import bar
from nnunet_compress.settings import Settings, check_choice

SUMMARY = "summary.json"


@dataclass
class CompareSettings(Settings):
    """What `nnunet-compress compare` was asked to do (its options, checked)."""

    label = "compare"

    base: Path
    compressed: list[Path]
    images: Path
    labels: Path
    output: Path
    tolerance_mm: float = 2.0
    folds: list[str] | None = None
    checkpoint: str = CHECKPOINT_FINAL
    device: str = "cpu"
    disable_tta: bool = False
    correction: str = "holm"
    alpha: float = 0.05
    num_processes: int = 2
    patch: list[int] | None = None
    profile_runs: int = 3
    timing: bool = True
    names: list[str] | None = None

    def validate(self) -> "CompareSettings":
        if self.tolerance_mm < 0:
            raise CompressError(f"--tolerance-mm {self.tolerance_mm} is negative; pass a distance in mm, e.g. 2")
        if not 0 < self.alpha < 1:
            raise CompressError(f"--alpha {self.alpha} is outside (0, 1); e.g. 0.05")
        check_choice("--correction", self.correction, CORRECTIONS)
        if self.num_processes < 1 or self.profile_runs < 1:
            raise CompressError("--num-processes and --profile-runs must be at least 1")
        if self.names is not None and len(self.names) != 1 + len(self.compressed):
            raise CompressError(f"--names needs {1 + len(self.compressed)} names (base first), got {len(self.names)}")
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise CompressError("--device cuda requested but no CUDA device is available; use --device cpu")
        return self


@dataclass
class ModelEntry:
    name: str
    path: Path
    role: str  # "base" or "compressed"
    folds: list[str] = field(default_factory=list)
    profile: dict = field(default_factory=dict)


def unique_names(paths: list[Path]) -> list[str]:
    """Readable, distinct model names: the folder name, with parent folders prepended where names clash.

    nnU-Net names every model folder TRAINER__PLANS__CONFIGURATION, so two models of different datasets or runs
    easily share a folder name.
    """
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["_".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names) or depth >= max(len(pp) for pp in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def safe_name(name: str) -> str:
    for ch in '/\\:*?"<>| ':
        name = name.replace(ch, "_")
    return name


def open_models(settings: CompareSettings):
    paths = [settings.base, *settings.compressed]
    if len({p.resolve() for p in paths}) != len(paths):
        raise CompressError("the same model folder is given twice; pass the base once and each compressed model once")
    names = [safe_name(n) for n in (settings.names or unique_names(paths))]
    if len(set(names)) != len(names):
        raise CompressError(f"--names must be distinct, got {', '.join(names)}")
    folders, entries = [], []
    for i, (path, name) in enumerate(zip(paths, names)):
        folder = open_model_folder(path, settings.folds, settings.checkpoint)
        folders.append(folder)
        entries.append(ModelEntry(name, folder.path, "base" if i == 0 else "compressed", sorted(folder.folds)))
    return folders, entries


def check_same_task(folders) -> None:
    """All models must segment the same classes from the same inputs, or the comparison is meaningless."""
    base = folders[0]
    for other in folders[1:]:
        for key in ("labels", "channel_names", "file_ending"):
            if base.dataset_json.get(key) != other.dataset_json.get(key):
                raise CompressError(f"{other.path} and the base {base.path} differ in dataset.json '{key}'; compare "
                                    f"only models trained for the same task")


def run_compare(settings: CompareSettings, progress=print) -> dict:
    """The whole comparison; returns the summary that is also written to ``summary.json``."""
    settings.validate()
    folders, entries = open_models(settings)
    check_same_task(folders)
    base = folders[0]
    for f in folders:
        if settings.output.resolve() == f.path.resolve() or f.path.resolve() in settings.output.resolve().parents:
            raise CompressError(f"report folder {settings.output} lies inside model folder {f.path}; choose a "
                                f"folder outside the models (they are never modified)")
    file_ending = base.dataset_json["file_ending"]
    classes, ignore_label = classes_of(base.plans, base.dataset_json)
    cases = find_cases(settings.images, settings.labels, file_ending, len(base.dataset_json["channel_names"]))
    try:
        settings.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"cannot create report folder {settings.output} ({e.strerror}); choose a writable "
                            f"folder") from None
    progress(f"comparing {len(entries)} models on {len(cases)} cases, {len(classes)} classes; report in "
             f"{settings.output}")

    prediction_dirs = {}
    for i, (folder, entry) in enumerate(bar(list(zip(folders, entries)), "predicting", "model"), 1):
        out = settings.output / "predictions" / entry.name
        t0 = time.perf_counter()
        progress(f"[{i}/{len(entries)}] {entry.name}: predicting {len(cases)} cases (folds {', '.join(entry.folds)})")
        predicted = predict_cases(folder, settings.images, out, cases, file_ending, settings.checkpoint,
                                  settings.device, settings.disable_tta, settings.num_processes,
                                  settings.output / "logs" / f"predict_{entry.name}.log")
        progress(f"[{i}/{len(entries)}] {entry.name}: " + (f"predicted in {time.perf_counter() - t0:.0f} s"
                                                           if predicted else "reusing predictions already on disk"))
        prediction_dirs[entry.name] = out

    reader = base.plans.get("image_reader_writer", "SimpleITKIO")
    jobs = [((entry.name, case), str(settings.labels / f"{case}{file_ending}"),
             str(prediction_dirs[entry.name] / f"{case}{file_ending}"), classes, ignore_label, settings.tolerance_mm,
             reader) for entry in entries for case in cases]
    step = max(1, len(jobs) // 10)

    def report_scoring(done, total, key):
        if done == total or done % step == 0:
            progress(f"scoring: {done}/{total} (model, case) pairs done")

    scores = score_all(jobs, settings.num_processes, report_scoring)

    reference = None
    if settings.timing and settings.device == "cpu":
        reference = BaseReference(folders[0].path, sorted(folders[0].folds)[0],
                                  tuple(settings.patch) if settings.patch else None)
    for folder, entry in zip(folders, entries):
        progress(f"profiling {entry.name} on {settings.device}")
        entry.profile = profile_model(folder, settings, reference)

    summary = summarise(settings, entries, cases, classes, scores)
    write_report(settings.output, summary, progress)
    return summary


def profile_model(folder, settings: CompareSettings, reference: BaseReference | None = None) -> dict:
    """Costs of one model; on the CPU its seconds come side by side with the base's on torch and on the model's own
    engine and precision (`reference`), so that latency_ratio is the compression's gain alone."""
    fold = sorted(folder.folds)[0]
    net, _, configuration = load_fold_network(folder, fold)
    patch = tuple(settings.patch or resolved_configuration(folder.plans, configuration)["patch_size"])
    prof = profile_network(net, input_channels_of(folder.plans, folder.dataset_json, configuration), patch,
                           settings.device, runs=settings.profile_runs, warmup=1,
                           timing=settings.timing and reference is None)
    out = {"configuration": configuration, "fold": fold, "patch_size": list(prof.patch_size),
           "device": prof.device, "params": prof.params, "flops": prof.flops, "latency_s": prof.latency_s,
           "peak_memory_bytes": prof.peak_memory_bytes}
    if reference is not None:
        out["peak_memory_bytes"] = measure_peak_memory(net.eval(), reference.example())
        speed = reference.time(net, runs=settings.profile_runs, warmup=1)
        out.update({"latency_s": speed.seconds, "runs_on": speed.variant,
                    "base_torch_latency_s": speed.base_torch_seconds, "base_same_latency_s": speed.base_same_seconds})
    return out


def summarise(settings: CompareSettings, entries: list[ModelEntry], cases: list[str], classes, scores) -> dict:
    """Per-case rows, per-class means and paired tests, per-model totals: everything the report shows."""
    per_case = [{"model": e.name, "case": case, "label": c.label, "class": c.name,
                 **scores[(e.name, case)][c.label]} for e in entries for case in cases for c in classes]

    def series(model: str, label: str, metric: str) -> list[float]:
        return [scores[(model, case)][label][metric] for case in cases]

    base = entries[0].name
    per_class = []
    for e in entries:
        rows = []
        for c in classes:
            row = {"model": e.name, "label": c.label, "class": c.name,
                   "n_cases": sum(not math.isnan(v) for v in series(e.name, c.label, "dice")),
                   "dice": nanmean(series(e.name, c.label, "dice")), "nsd": nanmean(series(e.name, c.label, "nsd"))}
            if e.role == "compressed":
                for metric in ("dice", "nsd"):
                    t = paired_wilcoxon(series(base, c.label, metric), series(e.name, c.label, metric))
                    row.update({f"{metric}_pairs": t.n_pairs, f"{metric}_diff_mean": t.mean_difference,
                                f"{metric}_diff_median": t.median_difference, f"{metric}_p": t.p_value})
            rows.append(row)
        if e.role == "compressed":
            for metric in ("dice", "nsd"):
                adjusted = adjust([r[f"{metric}_p"] for r in rows], settings.correction)
                for r, p in zip(rows, adjusted):
                    r[f"{metric}_p_adj"] = p
                    r[f"{metric}_different"] = bool(p < settings.alpha) if not math.isnan(p) else False
        per_class += rows

    models = []
    for e in entries:
        rows = [r for r in per_class if r["model"] == e.name]
        m = {"name": e.name, "role": e.role, "path": str(e.path), "folds": e.folds,
             "mean_dice": nanmean(r["dice"] for r in rows), "mean_nsd": nanmean(r["nsd"] for r in rows),
             **{k: e.profile.get(k) for k in ("params", "flops", "latency_s", "peak_memory_bytes", "patch_size",
                                               "device", "runs_on")}}
        if e.role == "compressed":
            tested = [r for r in rows if not math.isnan(r["dice_p_adj"])]
            m["classes_tested"] = len(tested)
            m["classes_different_dice"] = sum(r["dice_different"] for r in tested)
            m["classes_different_nsd"] = sum(r["nsd_different"] for r in rows if not math.isnan(r["nsd_p_adj"]))
            base_profile = entries[0].profile
            m["params_ratio"] = ratio(e.profile.get("params"), base_profile.get("params"))
            m["flops_ratio"] = ratio(e.profile.get("flops"), base_profile.get("flops"))
            # against the base on the same engine and precision where measured so (CPU), else the base as it ran
            same = e.profile.get("base_same_latency_s", base_profile.get("latency_s"))
            m["latency_ratio"] = ratio(e.profile.get("latency_s"), same)
            m["latency_ratio_vs_base_torch"] = ratio(e.profile.get("latency_s"),
                                                     e.profile.get("base_torch_latency_s", base_profile.get("latency_s")))
        models.append(m)
    min_p = 2 / 2 ** len(cases)
    return {"settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "compressed" else v)
                         for k, v in asdict(settings).items()},
            "cases": cases, "classes": [{"label": c.label, "name": c.name} for c in classes],
            "smallest_possible_p": min_p, "models": models, "per_class": per_class, "per_case": per_case}


def ratio(a, b):
    return None if a is None or not b else a / b


# ---- writing -----------------------------------------------------------------------------------------------

MODEL_COLUMNS = ["name", "role", "runs_on", "params", "flops", "latency_s", "peak_memory_bytes", "mean_dice",
                 "mean_nsd", "params_ratio", "flops_ratio", "latency_ratio", "latency_ratio_vs_base_torch", "classes_tested", "classes_different_dice",
                 "classes_different_nsd", "path"]
CLASS_COLUMNS = ["model", "label", "class", "n_cases", "dice", "nsd", "dice_diff_mean", "dice_p", "dice_p_adj",
                 "dice_different", "nsd_diff_mean", "nsd_p", "nsd_p_adj", "nsd_different"]
CASE_COLUMNS = ["model", "case", "label", "class", "dice", "nsd", "n_ref", "n_pred"]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") if r.get(k) is not None else "" for k in columns})
    return buf.getvalue()


def write_report(output: Path, summary: dict, progress=print) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".report.partial-", dir=output))
    try:
        (staging / "models.csv").write_text(to_csv(summary["models"], MODEL_COLUMNS))
        (staging / "per_class.csv").write_text(to_csv(summary["per_class"], CLASS_COLUMNS))
        (staging / "per_case.csv").write_text(to_csv(summary["per_case"], CASE_COLUMNS))
        plots = {"dice_per_class": plot_dice_per_class(summary, staging / "dice_per_class.png"),
                 "pareto_flops": plot_pareto(summary, "flops", staging / "pareto_flops.png")}
        if all(m.get("latency_s") for m in summary["models"]):
            plots["pareto_latency"] = plot_pareto(summary, "latency_s", staging / "pareto_latency.png")
        summary["files"] = {"models": "models.csv", "per_class": "per_class.csv", "per_case": "per_case.csv",
                            "markdown": "summary.md", **{k: Path(v).name for k, v in plots.items()}}
        (staging / "summary.md").write_text(summary_markdown(summary))
        (staging / SUMMARY).write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        names = sorted(os.listdir(staging), key=lambda n: n == SUMMARY)  # summary.json last
        for name in names:
            os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {output / 'summary.md'} (and models.csv, per_class.csv, per_case.csv, summary.json, "
             f"{', '.join(Path(p).name for p in plots.values())})")


def json_safe(o):
    """NaN (a class absent from a case, a test that cannot be run) as null: strict JSON has no NaN."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return o
