"""``nnunet-compress quantize``: post-training INT8 of any model folder for the CPU engine, with Dice kept in budget.

Why on top of every method: INT8 arithmetic and fewer FLOPs are independent savings. An original folder becomes a
:class:`~nnunet_compress.network.CompressedUNet` folder (as ``convert`` writes it) whose checkpoints also carry an
INT8 model; a Tucker, pruned, Sauron or distilled folder keeps its architecture and gains the same. The f32
weights stay in every checkpoint: torch, CUDA and ``NNUNET_COMPRESS_CPU_PRECISION=f32`` run them.

Per fold: the network is converted for the engine at the plans' patch size, calibrated by NNCF on sliding-window
tiles of real cases (:mod:`nnunet_compress.nnunet.quantization_data`), and NNCF's accuracy control returns
quantised operations to float until the mean foreground Dice on separate validation tiles is within
``max_dice_drop`` of the f32 network's and no class is more than ``max_class_drop`` below — against labels where
the cases have them, against the f32 network's own prediction otherwise. With ``--calibration-dataset`` the
validation tiles come from the fold's own validation cases (``splits_final.json``), which the fold never trained
on; the calibration tiles from its training cases. The output folder is written atomically; the source folder is
only read.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.inference import int8, openvino_engine
from nnunet_compress.inference.settings import plain_inference
from nnunet_compress.network import NETWORK_CLASS_NAME, compressed_arch_kwargs
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    build_network,
    check_output_location,
    input_channels_of,
    load_fold_network,
    open_model_folder,
    write_json,
)
from nnunet_compress.nnunet.plans import SECTION, resolved_configuration
from nnunet_compress.nnunet.quantization_data import (
    Case,
    Patch,
    cases_from_dataset,
    cases_from_images,
    draw_patches,
    fold_split,
)
from nnunet_compress.settings import Settings, check_choice
from nnunet_compress.workflows.derived_folder import write_derived_model_folder

PRESETS = ("mixed", "performance")
REPORT = "quantization_report"
MANIFEST = "int8_manifest.json"


@dataclass
class QuantizeSettings(Settings):
    """What `nnunet-compress quantize` was asked to do (its options, checked)."""

    label = "quantize"

    calibration_images: Path | None = None
    calibration_dataset: str | None = None
    validation_labels: Path | None = None
    subset_size: int = 32
    validation_patches: int = 16
    foreground_share: float = 0.5
    max_cases: int = 8
    max_dice_drop: float = 0.01
    preset: str = "mixed"
    seed: int = 0
    max_class_drop: float | None = None  # None: twice max_dice_drop (1 or more: no limit per class)

    @property
    def class_drop_limit(self) -> float:
        return self.max_class_drop if self.max_class_drop is not None else 2 * self.max_dice_drop

    def validate(self) -> "QuantizeSettings":
        if (self.calibration_images is None) == (self.calibration_dataset is None):
            raise CompressError("pass exactly one calibration source: --calibration-images DIR (raw images of "
                                "your own) or --calibration-dataset ID (nnU-Net's preprocessed training cases)")
        if self.validation_labels is not None and self.calibration_images is None:
            raise CompressError("--validation-labels goes with --calibration-images (they are the labels of those "
                                "images); a --calibration-dataset brings its own labels")
        if not 0 < self.max_dice_drop < 1:
            raise CompressError(f"--max-dice-drop {self.max_dice_drop} is outside (0, 1); e.g. 0.01 for one Dice "
                                "point")
        if self.max_class_drop is not None and self.max_class_drop < self.max_dice_drop:
            raise CompressError(f"--max-class-drop {self.max_class_drop} must be at least --max-dice-drop "
                                f"({self.max_dice_drop}): one class may lose at least what the mean may, e.g. 0.02")
        if self.subset_size < 1 or self.validation_patches < 1 or self.max_cases < 1:
            raise CompressError("--subset-size, --validation-patches and --max-cases must be at least 1")
        if not 0 <= self.foreground_share <= 1:
            raise CompressError(f"--foreground-share {self.foreground_share} is outside [0, 1]")
        check_choice("--nncf-preset", self.preset, PRESETS)
        return self


@dataclass
class FoldReport:
    """What quantising one fold did (the fold's manifest)."""

    fold: str
    convolutions: int
    f32_layers: list[str]
    dice_f32: dict[str, float]
    dice_int8: dict[str, float]
    mean_dice_f32: float
    mean_dice_int8: float
    calibration_patches: int
    calibration_foreground_patches: int
    validation_patches: int
    calibration_cases: list[str]
    validation_cases: list[str]
    validation_source: str
    seconds: float
    versions: dict = field(default_factory=dict)


def versions() -> dict:
    import nncf
    import openvino

    import nnunet_compress
    return {"openvino": openvino.__version__, "nncf": nncf.__version__, "torch": torch.__version__,
            "nnunet_compress": getattr(nnunet_compress, "__version__", "unknown")}


def int8_plans(plans: dict, configuration: str, summary: dict) -> dict:
    """The folder's plans with `configuration` as a CompressedUNet whose checkpoints carry an INT8 model."""
    cfg = resolved_configuration(plans, configuration)
    arch = compressed_arch_kwargs(cfg, engine_int8=True)
    if cfg["architecture"]["network_class_name"] == NETWORK_CLASS_NAME:  # keep per-fold channels of pruned folders
        arch["arch_kwargs"]["per_fold_channels"] = cfg["architecture"]["arch_kwargs"].get("per_fold_channels", False)
        section = copy.deepcopy(cfg.get(SECTION, {}))
    else:
        section = {"method": "convert", "parent_plans": plans.get("plans_name")}
    out = copy.deepcopy(plans)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.pop("inherits_from", None)
    new_cfg["architecture"] = arch
    new_cfg[SECTION] = {**section, "int8": summary}
    out["configurations"][configuration] = new_cfg
    return out


def float_twin(plans: dict, configuration: str) -> dict:
    """The same plans without the INT8 model (the network the engine converts and NNCF quantises)."""
    out = copy.deepcopy(plans)
    out["configurations"][configuration]["architecture"]["arch_kwargs"].pop("engine_int8", None)
    return out


def class_names(dataset_json: dict) -> dict[int, str]:
    """Foreground label -> name (nnU-Net's dataset.json maps names to labels; regions are not supported here)."""
    out = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            raise CompressError("this dataset uses region-based labels, which quantize cannot grade yet; quantise "
                                "with a label-based model")
        if int(value) > 0:
            out[int(value)] = name
    return out


@dataclass
class FoldCases:
    """The cases one fold is calibrated on and graded on (`validation` None: other tiles of `calibration`)."""

    calibration: list[Case]
    validation: list[Case] | None
    source: str


def load_cases(settings: QuantizeSettings, plans: dict, dataset_json: dict, configuration: str,
               folds: list[str]) -> dict[str, FoldCases]:
    """Each fold's calibration and validation cases (raw images are preprocessed once, for every fold)."""
    if settings.calibration_images is not None:
        cases = cases_from_images(settings.calibration_images, plans, dataset_json, configuration,
                                  settings.validation_labels, settings.max_cases)
        return {fold: FoldCases(cases, None, "other tiles of the calibration images") for fold in folds}
    dataset, out = settings.calibration_dataset, {}
    for fold in folds:
        split = fold_split(dataset, fold)
        if split is None:
            cases = cases_from_dataset(dataset, plans, configuration, settings.max_cases)
            out[fold] = FoldCases(cases, None, f"other tiles of the same training cases (fold {fold} has no "
                                               f"validation cases in splits_final.json)")
        else:
            train, val = split
            out[fold] = FoldCases(cases_from_dataset(dataset, plans, configuration, settings.max_cases, names=train),
                                  cases_from_dataset(dataset, plans, configuration, settings.max_cases, names=val),
                                  f"fold {fold}'s validation cases in splits_final.json (never trained on)")
    return out


def quantize_network(net: nn.Module, cases: FoldCases, patch: tuple[int, ...], classes: list[int],
                     settings: QuantizeSettings) -> tuple[int8.Int8Result, list[Patch], list[Patch]]:
    """INT8 model of `net` (f32, eval) with its calibration and validation tiles."""
    import openvino as ov

    channels = cases.calibration[0].image.shape[0]
    shape = (1, channels, *patch)
    threads = torch.get_num_threads()
    with plain_inference():
        model = openvino_engine.convert(net.eval(), torch.zeros(shape))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                      "INFERENCE_PRECISION_HINT": "f32"})

    def predict(image: np.ndarray) -> np.ndarray:
        return int8.predict_labels(compiled, image)

    calibration = draw_patches(cases.calibration, patch, settings.subset_size, settings.foreground_share,
                               settings.seed, predict=predict)
    used = {(p.case, p.start) for p in calibration}
    validation = draw_patches(cases.validation or cases.calibration, patch, settings.validation_patches,
                              settings.foreground_share, settings.seed + 1, exclude=used, predict=predict)
    targets = [int8.ValidationPatch(p.image, p.labels if p.labels is not None else predict(p.image))
               for p in validation]
    result = int8.quantize(model, [p.image for p in calibration], targets, classes, settings.max_dice_drop,
                           settings.preset, threads, max_class_drop=settings.class_drop_limit)
    return result, calibration, validation


def quantize_model_folder(source: str | Path, output: str | Path, settings: QuantizeSettings,
                          folds: list[str] | None = None, configuration: str | None = None, overwrite: bool = False,
                          checkpoint_name: str = CHECKPOINT_FINAL, progress=print) -> dict:
    """Write `output`: the model of `source` with an INT8 engine model in every fold's checkpoint; returns the
    report (per fold: kept-f32 layers, per-class Dice f32 vs INT8, calibration summary)."""
    settings.validate()
    source, output = Path(source), Path(output)
    folder = open_model_folder(source, folds, checkpoint_name)
    check_output_location(folder.path, output)
    first_fold = load_fold_network(folder, next(iter(folder.folds)), configuration)
    configuration = first_fold[2]
    names = class_names(folder.dataset_json)
    patch = tuple(int(p) for p in resolved_configuration(folder.plans, configuration)["patch_size"])
    channels = input_channels_of(folder.plans, folder.dataset_json, configuration)
    source_name = (f"images {settings.calibration_images}" if settings.calibration_images is not None
                   else f"dataset {settings.calibration_dataset}")
    progress(f"reading calibration cases ({source_name})")
    cases = load_cases(settings, folder.plans, folder.dataset_json, configuration, list(folder.folds))
    first = next(iter(cases.values()))
    if first.calibration[0].image.shape[0] != channels:
        raise CompressError(f"the calibration cases have {first.calibration[0].image.shape[0]} channel(s) but the "
                            f"model expects {channels}")
    labelled = all(c.labels is not None for c in first.calibration)
    summary = {"max_dice_drop": settings.max_dice_drop, "max_class_drop": settings.class_drop_limit,
               "preset": settings.preset,
               "graded_against": "labels" if labelled else "the f32 model's own predictions (label-free)",
               "calibration": {"source": source_name, "max_cases": settings.max_cases,
                               "subset_size": settings.subset_size, "validation_patches": settings.validation_patches,
                               "foreground_share": settings.foreground_share, "seed": settings.seed}}
    plans = int8_plans(folder.plans, configuration, summary)
    f32_plans = float_twin(plans, configuration)
    reports: list[FoldReport] = []

    def derive(fold: str, parent: nn.Module) -> tuple[nn.Module, dict]:
        t0 = time.perf_counter()
        progress(f"fold {fold}: calibrating on {settings.subset_size} tiles and validating on "
                 f"{settings.validation_patches} (max Dice drop {settings.max_dice_drop}, per class "
                 f"{settings.class_drop_limit:g})")
        net = build_network(f32_plans, folder.dataset_json, configuration)
        # same architecture as the parent (CompressedUNet keeps the parent's keys); pruned folds reshape on load
        net.load_state_dict({k: v for k, v in parent.state_dict().items() if k not in int8.PAYLOAD_KEYS})
        fold_cases = cases[fold]
        result, calibration, validation = quantize_network(net, fold_cases, patch, sorted(names), settings)
        xml, weights = int8.serialize(result.model)
        quantised = build_network(plans, folder.dataset_json, configuration)
        quantised.load_state_dict({**net.state_dict(), int8.XML_KEY: torch.from_numpy(xml),
                                   int8.BIN_KEY: torch.from_numpy(weights)})
        report = FoldReport(
            fold, result.convolutions, result.f32_layers,
            {names[c]: v for c, v in result.dice_f32.items()}, {names[c]: v for c, v in result.dice_int8.items()},
            result.mean_dice_f32, result.mean_dice_int8, len(calibration),
            sum(p.labels is not None and bool((p.labels > 0).any()) for p in calibration), len(validation),
            [c.name for c in fold_cases.calibration], sorted({p.case for p in validation}), fold_cases.source,
            time.perf_counter() - t0, versions())
        reports.append(report)
        progress(f"fold {fold}: {result.convolutions - len(result.f32_layers)}/{result.convolutions} convolutions "
                 f"INT8; mean Dice f32 {report.mean_dice_f32:.4f} -> INT8 {report.mean_dice_int8:.4f} "
                 f"({report.seconds:.0f} s)")
        return quantised, plans

    def finish(tmp: Path) -> None:
        for r in reports:
            write_json(tmp / f"fold_{r.fold}" / MANIFEST, asdict(r))
        write_json(tmp / f"{REPORT}.json", report_dict(source, configuration, summary, reports))
        (tmp / f"{REPORT}.md").write_text(report_markdown(source, configuration, summary, reports))

    write_derived_model_folder(folder, output, configuration, derive, overwrite, checkpoint_name, finish=finish,
                               first_fold=first_fold[:2])
    return report_dict(source, configuration, summary, reports)


def report_dict(source: Path, configuration: str, summary: dict, reports: list[FoldReport]) -> dict:
    return {"source": str(source), "configuration": configuration, **summary, "folds": [asdict(r) for r in reports]}


def report_markdown(source: Path, configuration: str, summary: dict, reports: list[FoldReport]) -> str:
    lines = [f"# INT8 quantisation of {source} ({configuration})", "",
             f"NNCF post-training quantisation ({summary['preset']} preset) with accuracy control: mean foreground "
             f"Dice on validation tiles within {summary['max_dice_drop']} of f32 and no class more than "
             f"{summary['max_class_drop']:g} lower, graded against {summary['graded_against']}. Calibration: "
             f"{summary['calibration']['source']}.", ""]
    for r in reports:
        lines += [f"## fold {r.fold}", "",
                  f"{r.convolutions - len(r.f32_layers)} of {r.convolutions} convolutions run in INT8; kept in f32: "
                  f"{', '.join(r.f32_layers) or 'none'}.", "",
                  f"Calibration tiles: {r.calibration_patches} ({r.calibration_foreground_patches} with labelled "
                  f"foreground) from cases {', '.join(r.calibration_cases)}; validation tiles: "
                  f"{r.validation_patches} from {r.validation_source}: {', '.join(r.validation_cases)}; "
                  f"{r.seconds:.0f} s.", "",
                  "| class | Dice f32 | Dice INT8 | change |", "|---|---:|---:|---:|"]
        for name, f32 in r.dice_f32.items():
            q = r.dice_int8.get(name, float("nan"))
            lines.append(f"| {name} | {f32:.4f} | {q:.4f} | {q - f32:+.4f} |")
        lines += [f"| **mean** | {r.mean_dice_f32:.4f} | {r.mean_dice_int8:.4f} | "
                  f"{r.mean_dice_int8 - r.mean_dice_f32:+.4f} |", "",
                  "Versions: " + json.dumps(r.versions), ""]
    return "\n".join(lines)
