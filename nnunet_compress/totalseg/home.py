"""``nnunet-compress totalseg``: a TotalSegmentator home folder whose models are Tucker-compressed.

TotalSegmentator (totalsegmentator 2.x) runs nnU-Net model folders it finds under its home folder:
``<home>/nnunet/results/<DatasetXXX_name>/<trainer>__<plans>__<configuration>/fold_<f>/checkpoint_final.pth``,
home = ``$TOTALSEG_HOME_DIR`` or ``~/.totalsegmentator`` (``totalsegmentator/config.py``). Which datasets, trainers
and folds a task uses is TotalSegmentator's own task table (``totalsegmentator/map_tasks_config.py``); we read it
from the installed package so that the layout we write is the one the installed version looks for.

What keeps TotalSegmentator from going online with the home we write:
* weights: ``libs.download_pretrained_weights`` downloads only when ``<results>/<foldername>`` does not exist; we
  write exactly those folders (current names: an older name such as ``..._1559subj_v204`` would be deleted).
* usage statistics: ``config.send_usage_stats`` posts only when ``<home>/config.json`` says
  ``"send_usage_stats": true``; ours says false (``statistics_disclaimer_shown`` true silences the notice).
The compressed plans name ``nnunet_compress.network.CompressedUNet`` as their network class; nnU-Net resolves it
with ``pydoc.locate``, so TotalSegmentator only needs nnunet-compress installed in the same environment.
Tasks whose pipeline also runs helper models (cropping with the 6 mm model for ``--roi_subset`` and cropped tasks)
need those helpers in the new home too: add their task (e.g. ``total_fastest``) to ``--task``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import atomic_output_folder, check_output_location, read_json, write_json
from nnunet_compress.progress import bar
from nnunet_compress.workflows.convert import convert_model_folder
from nnunet_compress.workflows.engine_cache import check_engine_in_use, prepare_engine
from nnunet_compress.workflows.quantize import QuantizeSettings, quantize_model_folder
from nnunet_compress.workflows.tucker import compress_model_folder

RESULTS = Path("nnunet") / "results"
MODES = ("fast", "fastest")


@dataclass(frozen=True)
class TaskModel:
    """One nnU-Net model folder a TotalSegmentator task runs."""

    task: str
    dataset_id: int
    dataset_folder: str  # relative to the results folder (TotalSegmentator's foldername, with rel_path if any)
    trainer: str
    plans: str
    configuration: str
    folds: tuple[str, ...]

    @property
    def model_folder(self) -> Path:
        return Path(self.dataset_folder) / f"{self.trainer}__{self.plans}__{self.configuration}"


def _task_config(task: str) -> dict:
    """TotalSegmentator's configuration of `task` ('total', 'total_fast', 'total_fastest', 'lung_vessels', ...)."""
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS
    name, mode = task, "default"
    if task not in TASK_CONFIGS:
        for m in MODES:
            if task.endswith(f"_{m}") and task[:-len(m) - 1] in TASK_CONFIGS:
                name, mode = task[:-len(m) - 1], m
    if name not in TASK_CONFIGS:
        known = sorted(TASK_CONFIGS)
        raise CompressError(f"unknown TotalSegmentator task {task!r}; use one of {', '.join(known[:12])}, ... "
                            f"(append _fast / _fastest for the lower-resolution variants, e.g. total_fast)")
    raw = TASK_CONFIGS[name]
    config = dict(DEFAULT_CONFIG)
    if "sub_modes" in raw:
        if mode not in raw["sub_modes"]:
            raise CompressError(f"TotalSegmentator task {name!r} has no {mode!r} variant (it has: "
                                f"{', '.join(raw['sub_modes'])})")
        config.update(raw["sub_modes"][mode])
    elif mode != "default":
        raise CompressError(f"TotalSegmentator task {name!r} has no {mode!r} variant; pass --task {name}")
    else:
        config.update(raw)
    return config


def task_models(tasks: list[str]) -> list[TaskModel]:
    """Every model folder the given tasks run, each once, in TotalSegmentator's order."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    models: dict[int, TaskModel] = {}
    for task in tasks:
        cfg = _task_config(task)
        ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
        for dataset_id in ids:
            info = TASK_ID_WEIGHTS_CONFIGS.get(dataset_id)
            if info is None:
                raise CompressError(f"TotalSegmentator {task!r} names dataset {dataset_id}, which its weights table "
                                    f"does not list; this TotalSegmentator version is not supported")
            folder = info["foldername"]
            if info.get("rel_path"):
                folder = str(Path(info["rel_path"]) / folder)
            models.setdefault(dataset_id, TaskModel(task, dataset_id, folder, cfg["trainer"],
                                                    cfg.get("plans") or "nnUNetPlans", cfg.get("model") or "3d_fullres",
                                                    tuple(str(f) for f in cfg.get("folds") or [0])))
    return list(models.values())


def source_results_folder(source_home: Path | None) -> Path:
    """Where the installed weights are, by TotalSegmentator's own rules (plus an explicit --source-home first)."""
    if source_home is not None:
        return Path(source_home) / RESULTS
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    from totalsegmentator.config import get_totalseg_dir
    return get_totalseg_dir() / RESULTS


def source_config(results: Path) -> dict:
    """The source home's config.json (for its id and license fields), if the results folder sits in a home."""
    path = results.parent.parent / "config.json"
    if results.parts[-2:] == RESULTS.parts and path.is_file():
        try:
            return read_json(path)
        except CompressError:
            return {}
    return {}


def offline_config(source: dict) -> dict:
    """config.json of the new home: the source's settings, but no usage statistics and a fresh counter."""
    config = {k: v for k, v in source.items() if k in ("totalseg_id", "license_number")}
    config.setdefault("totalseg_id", "totalseg_nnunet_compress")
    config.update({"send_usage_stats": False, "prediction_counter": 0, "statistics_disclaimer_shown": True})
    return config


def compress_totalseg_home(output: str | os.PathLike, policy, tasks: list[str], source_home: Path | None = None,
                           overwrite: bool = False, progress=print, images: Path | None = None,
                           engine_cache: bool = True, int8: QuantizeSettings | None = None) -> dict:
    """Write a TotalSegmentator home with every model of `tasks` Tucker-compressed by `policy`.

    ``policy=None`` writes every model unchanged as a CompressedUNet folder (``--no-compression``): the original
    home, run on the CPU engine, for a fair comparison with a compressed home. `images` calibrate the budget
    policies' guard (each model preprocesses them with its own plans). `engine_cache`: convert every model for the
    CPU engine once the home is written (:mod:`nnunet_compress.workflows.engine_cache`), so that the first
    TotalSegmentator run is as quick as the later ones. `int8`: quantise every written model for the engine
    (:mod:`nnunet_compress.workflows.quantize`) on the user's own CTs; an INT8 home needs no f32 engine cache.
    """
    if int8 is not None:
        int8.validate()
    if policy is not None:
        policy.validate()
    output = Path(output)
    results = source_results_folder(source_home)
    models = task_models(tasks)
    missing = [m for m in models if not (results / m.model_folder).is_dir()]
    if missing:
        m = missing[0]
        raise CompressError(
            f"TotalSegmentator weights of task {m.task!r} (dataset {m.dataset_id}) are not at "
            f"{results / m.model_folder}; download them first (totalseg_download_weights -t {m.task}, or run "
            f"TotalSegmentator once with this task) or pass --source-home with the home that holds them")
    check_output_location(results.parent.parent if results.parts[-2:] == RESULTS.parts else results, output)
    rows = []
    with atomic_output_folder(output, overwrite) as tmp:
        tmp.chmod(0o755)
        for i, m in enumerate(bar(models, "TotalSegmentator models", "model"), 1):
            t0 = time.perf_counter()
            progress(f"[{i}/{len(models)}] {m.task}: dataset {m.dataset_id} ({m.model_folder})")
            target = tmp / RESULTS / m.model_folder
            written = target.with_name(target.name + ".f32") if int8 is not None else target
            row = _write_model(results / m.model_folder, written, policy, m, lambda line: progress("    " + line),
                               images)
            if int8 is not None:
                report = quantize_model_folder(written, target, int8, list(m.folds), m.configuration,
                                               progress=lambda line: progress("    " + line))
                shutil.rmtree(written)
                row["int8"] = [{k: f[k] for k in ("fold", "convolutions", "f32_layers", "mean_dice_f32",
                                                  "mean_dice_int8")} for f in report["folds"]]
            rows.append({**asdict(m), **row})
            if policy is None:
                progress(f"    {row['params_before']:,} parameters, unchanged ({time.perf_counter() - t0:.0f} s)")
            else:
                progress(f"    parameters {row['params_before']:,} -> {row['params_after']:,}, GFLOPs/patch "
                         f"{row['flops_before'] / 1e9:.1f} -> {row['flops_after'] / 1e9:.1f} "
                         f"({time.perf_counter() - t0:.0f} s)")
        write_json(tmp / "config.json", offline_config(source_config(results)))
        summary = {"source_results": str(results.resolve()), "tasks": list(tasks),
                   "rank_policy": policy.to_dict() if policy is not None else None,
                   "int8": ({k: str(v) if isinstance(v, Path) else v for k, v in int8.to_dict().items()}
                            if int8 is not None else None), "models": rows}
        write_json(tmp / "nnunet_compress_totalseg.json", summary)
    if engine_cache and int8 is None:
        summary["engine_cache"] = _prepare_engine(output, models, progress)
    return summary


def _prepare_engine(home: Path, models: list[TaskModel], progress) -> list[dict]:
    """Fill the engine cache for each model of the written home; a model the engine cannot take is reported in one
    line and left to torch at run time (as the predictor would), never an error: the home itself is complete."""
    try:
        check_engine_in_use()
    except CompressError as e:
        progress(f"engine cache not prepared: {e}")
        return []
    rows = []
    for i, m in enumerate(models, 1):
        progress(f"[{i}/{len(models)}] {m.task}: converting for the CPU engine (once; later runs start at once)")
        try:
            rows += prepare_engine(home / RESULTS / m.model_folder, list(m.folds), m.configuration,
                                   progress=lambda line: progress("    " + line))
        except CompressError as e:
            progress(f"    not converted: {e}")
    return rows


def _write_model(source: Path, target: Path, policy, model: TaskModel, progress, images: Path | None = None) -> dict:
    """One model folder of the new home: Tucker-compressed by `policy`, or unchanged where it is None."""
    if policy is None:
        info = convert_model_folder(source, target, list(model.folds), model.configuration, progress=progress)
        return {"params_before": info["params"], "params_after": info["params"], "flops_before": None,
                "flops_after": None, "layers_factorised": 0}
    report = compress_model_folder(source, target, policy, list(model.folds), model.configuration, progress=progress,
                                   images=images)
    return {"params_before": report.params_before, "params_after": report.params_after,
            "flops_before": report.flops_before, "flops_after": report.flops_after,
            "layers_factorised": len(report.layers), "layers_at_rank_floor": report.floor_layers,
            "budget_guard": report.budget_guard}
