"""The search of ``nnunet-compress auto``: build, time and grade every candidate, cheapest first; keep the fastest
one within the Dice budget on the choosing cases; confirm it on the held-out cases.

Work area (``OUT_auto_work`` beside OUT, kept so that ``--resume`` can continue a killed search):

- ``search.json``: the settings and the case split of the search (a resumed search must use the same);
- ``quality/{choose,held_out}/``: the two parts of the quality data (links to the user's files), and
  ``quality/fine_tune/`` the cases an ``--images`` fine-tune trains on;
- ``fine_tune_data/``: their nnU-Net dataset (nnunet_compress.auto.fine_tune_data);
- ``parent/``: the parent's predictions, Dice and timing;
- ``candidates/<name>/model/``: each candidate's model folder (written atomically by its workflow; a fine-tuned
  candidate ``<name>+ft_epochsE`` also keeps its training logs and ``fine_tune_plans.json`` there) and
  ``candidates/<name>/result.json`` (written atomically once the candidate is timed and graded, or has failed);
- ``auto.log``: the steps' own progress lines.

A candidate whose ``result.json`` exists is finished: ``--resume`` reads it instead of building it again. The
winner is the candidate with the largest speed-up per patch over the parent (timed side by side) whose mean
foreground Dice on the choosing cases is within ``--max-dice-drop`` of the parent's, among the cheap candidates
and, with ``--fine-tune-epochs``, the frontier ones fine-tuned after them (nnunet_compress.auto.fine_tune). It is
then graded once on the held-out cases; where it exceeds the budget there, the parent stays the answer (the
held-out cases veto, they never rank: ranking on them would make the reported drop a chosen one).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nnunet_compress.auto import report as R
from nnunet_compress.auto.build import BuildContext, ensure_built
from nnunet_compress.auto.candidates import Candidate, parse_candidates
from nnunet_compress.auto.fine_tune import FineTuneSettings, check_fine_tune_options, frontier
from nnunet_compress.auto.fine_tune_data import DATASET as FINE_TUNE_DATASET
from nnunet_compress.auto.fine_tune_data import FineTuneData, prepare_fine_tune_data
from nnunet_compress.auto.grading import ParentTimer, Speed, mean_foreground_dice, predict
from nnunet_compress.auto.quality_data import (
    CHOOSE,
    HELD_OUT,
    QualityData,
    check_quality_options,
    prepare_quality_data,
)
from nnunet_compress.errors import CompressError, first_line
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    atomic_output_folder,
    atomic_write_file,
    check_output_location,
    configuration_name,
    input_channels_of,
    load_checkpoint,
    open_model_folder,
)
from nnunet_compress.progress import bar
from nnunet_compress.settings import Settings

SEARCH = "search.json"
RESULT = "result.json"
OK, FAILED, SKIPPED = "graded", "failed", "not tried (time budget)"


@dataclass
class AutoSettings(Settings):
    """What `nnunet-compress auto` was asked to do (its options, checked)."""

    label = "auto"

    model_folder: Path
    output: Path
    max_dice_drop: float = 0.01
    dataset: str | None = None
    images: Path | None = None
    labels: Path | None = None
    candidates: list[str] | None = None
    time_budget: float | None = None      # minutes
    resume: bool = False
    overwrite: bool = False
    folds: list[str] | None = None
    configuration: str | None = None
    checkpoint: str = CHECKPOINT_FINAL
    held_out_fraction: float = 0.5
    max_cases: int | None = None
    seed: int = 0
    timing_runs: int = 5
    work_dir: Path | None = None
    fine_tune_epochs: int | None = None
    fine_tune_count: int = 2
    fine_tune_iterations: int = 250   # nnU-Net's iterations per epoch
    fine_tune_fraction: float = 0.5   # --images: share of the cases fine-tuned on (never chosen or graded on)

    def validate(self) -> "AutoSettings":
        if not 0 < self.max_dice_drop < 1:
            raise CompressError(f"--max-dice-drop {self.max_dice_drop} is outside (0, 1); e.g. 0.01 for one Dice "
                                f"point")
        if self.time_budget is not None and not self.time_budget > 0:
            raise CompressError(f"--time-budget {self.time_budget} must be a positive number of minutes")
        if self.timing_runs < 1:
            raise CompressError("--timing-runs must be at least 1")
        check_quality_options(self.dataset, self.images, self.labels, self.held_out_fraction)
        check_fine_tune_options(self.fine_tune_epochs, self.fine_tune_count, self.fine_tune_iterations,
                                self.fine_tune_fraction)
        if self.max_cases is not None and self.max_cases < 2:
            raise CompressError("--max-cases must be at least 2 (one case to choose on, one held out)")
        return self

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else self.output.parent / f"{self.output.name}_auto_work"


@dataclass
class Row:
    """One model of the search as the report shows it."""

    name: str
    spec: str
    status: str
    commands: list[str] = field(default_factory=list)
    speed: dict | None = None
    choose: dict | None = None          # {"mean_dice", "dice_per_class"} on the choosing cases
    held_out: dict | None = None
    error: str | None = None
    build_seconds: float | None = None
    fine_tuned_from: str | None = None  # the graded candidate this one fine-tunes (its Dice before fine-tuning)
    resumed: bool = False               # read from an earlier run's result.json (--resume)

    @property
    def seconds(self) -> float | None:
        return (self.speed or {}).get("seconds")

    @property
    def dice(self) -> float | None:
        return (self.choose or {}).get("mean_dice")


class Search:
    """One run of the search (see the module docstring)."""

    def __init__(self, settings: AutoSettings, progress: Callable[[str], None] = print):
        self.s = settings.validate()
        self.progress = progress
        self.t0 = time.perf_counter()
        source = Path(settings.model_folder)
        self.folder = open_model_folder(source, settings.folds, settings.checkpoint)
        check_output_location(self.folder.path, settings.output)
        check_output_location(self.folder.path, settings.work)
        if settings.output.exists() and not settings.overwrite:
            raise CompressError(f"output {settings.output} already exists; choose another folder or pass --overwrite")
        self.candidates = parse_candidates(settings.candidates)
        first = sorted(self.folder.folds)[0]
        self.configuration = configuration_name(self.folder, settings.configuration,
                                                load_checkpoint(self.folder.folds[first]))
        self.channels = input_channels_of(self.folder.plans, self.folder.dataset_json, self.configuration)
        self.work = settings.work
        self._check_work_area()
        self.data: QualityData = prepare_quality_data(
            self.folder, self.channels, self.work / "quality", settings.dataset, settings.images, settings.labels,
            settings.held_out_fraction, settings.seed, settings.max_cases,
            settings.fine_tune_fraction if settings.fine_tune_epochs is not None else None)
        self._record_search()
        self.timer = ParentTimer(self.folder.path, first, settings.timing_runs)

    # ---- work area ---------------------------------------------------------------------------------------------

    def _check_work_area(self) -> None:
        if (self.work / SEARCH).is_file() and not self.s.resume:
            raise CompressError(f"{self.work} holds an earlier search; pass --resume to continue it, or delete the "
                                f"folder to start again")
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = self.work / "auto.log"

    def log(self, line: str) -> None:
        with open(self.log_file, "a") as f:
            f.write(line.rstrip() + "\n")

    def _record_search(self) -> None:
        # the budget is not part of a search's identity: a finished candidate's speed and Dice do not depend on
        # it, so --resume with another --max-dice-drop chooses again among the same results (an INT8 step's own
        # accuracy control used the budget it was built with; its command in the report says which)
        record = {"parent": str(self.folder.path.resolve()), "folds": sorted(self.folder.folds),
                  "configuration": self.configuration, "checkpoint": self.s.checkpoint,
                  "quality": self.data.to_dict()}
        path = self.work / SEARCH
        if path.is_file():
            old = json.loads(path.read_text())
            changed = [k for k in record if old.get(k) != record[k]]
            if changed:
                raise CompressError(f"--resume: the search in {self.work} was started with other "
                                    f"{', '.join(changed)}; resume with the same options or delete the folder")
            return
        write_json_atomic(path, record)

    # ---- the parent --------------------------------------------------------------------------------------------

    def grade(self, model_folder: Path, part: str, where: Path, folds: list[str] | None) -> dict:
        cases = self.data.choose if part == CHOOSE else self.data.held_out
        predictions = predict(model_folder, folds or sorted(self.folder.folds), cases, where / f"pred_{part}",
                              self.s.checkpoint, self.work / "logs" / f"predict_{where.name}_{part}.log")
        return mean_foreground_dice(predictions, cases.labels, self.folder.plans, self.folder.dataset_json,
                                    where / f"dice_{part}.json")

    def parent_row(self) -> Row:
        where = self.work / "parent"
        where.mkdir(parents=True, exist_ok=True)
        folds = sorted(self.folder.folds)
        if not self.data.labelled:  # the parent's predictions are the reference of the label-free mode
            for part, cases in ((CHOOSE, self.data.choose), (HELD_OUT, self.data.held_out)):
                predict(self.folder.path, folds, cases, where / f"pred_{part}", self.s.checkpoint,
                        self.work / "logs" / f"predict_parent_{part}.log")
                cases.labels = where / f"pred_{part}"
        self.progress(f"parent: grading on {len(self.data.choose.cases)} choosing and "
                      f"{len(self.data.held_out.cases)} held-out cases ({self.data.source}; against "
                      f"{self.data.graded_against})")
        row = Row("parent", "parent", OK, [], speed=self.timer.time(self.folder.path, folds[0],
                                                                     self.s.checkpoint).to_dict())
        row.choose = self.grade(self.folder.path, CHOOSE, where, folds)
        row.held_out = self.grade(self.folder.path, HELD_OUT, where, folds)
        return row

    # ---- candidates --------------------------------------------------------------------------------------------

    def context(self) -> BuildContext:
        return BuildContext(self.folder.path, self.s.folds, self.configuration, self.s.checkpoint,
                            self.data.choose.images, self.data.choose.labels if self.data.labelled else None,
                            self.s.max_dice_drop, self.work / "candidates", self.log,
                            fine_tune=self.fine_tune_settings(), parent_plans_name=self.folder.plans["plans_name"],
                            parent_folds=sorted(self.folder.folds), fine_tune_setup=self.fine_tune_setup())

    def fine_tune_setup(self) -> list[str] | None:
        data = self.fine_tune_data()
        if data is None:
            return None
        return data.setup_commands(self.folder.path, self.data.train, self.configuration, self.s.checkpoint,
                                   self.folder.plans["plans_name"], sorted(self.folder.folds))

    def fine_tune_data(self) -> FineTuneData | None:
        """Where an --images fine-tune's training dataset goes (None: --dataset, the model's own is trained on)."""
        if self.s.fine_tune_epochs is None or self.data.train is None:
            return None
        return FineTuneData(self.work / "fine_tune_data", distil=not self.data.labelled)

    def fine_tune_settings(self) -> FineTuneSettings | None:
        if self.s.fine_tune_epochs is None:
            return None
        import torch
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        schedule = (self.folder.plans["configurations"][self.configuration].get("nnunet_compress") or {}) \
            .get("schedule", {})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        data = self.fine_tune_data()
        if data is None:
            return FineTuneSettings(maybe_convert_to_dataset_name(self.s.dataset), self.s.fine_tune_epochs,
                                    self.s.fine_tune_iterations, 1e-3, schedule, device)
        teachers = {f: str(path) for f, path in self.folder.folds.items()} if data.distil else None
        return FineTuneSettings(FINE_TUNE_DATASET, self.s.fine_tune_epochs, self.s.fine_tune_iterations, 1e-3,
                                schedule, device, preprocessed=data.preprocessed, teachers=teachers)

    def result_file(self, candidate: Candidate) -> Path:
        return self.work / "candidates" / candidate.name / RESULT

    def finished(self, candidate: Candidate) -> bool:
        return self.result_file(candidate).is_file()

    def run_candidate(self, candidate: Candidate, ctx: BuildContext, fine_tuned_from: str | None = None) -> Row:
        result_file = self.result_file(candidate)
        commands = candidate.commands(self.folder.path, ctx.data_options())
        if self.s.resume and self.finished(candidate):  # finished before the search was stopped: read, not rebuilt
            row = Row(**json.loads(result_file.read_text()))
            row.resumed = True
            return row
        row = Row(candidate.name, candidate.spec, OK, commands, fine_tuned_from=fine_tuned_from)
        t0 = time.perf_counter()
        try:
            model = ensure_built(candidate, ctx)
            row.build_seconds = time.perf_counter() - t0
            row.speed = self.timer.time(model, sorted(self.folder.folds)[0], self.s.checkpoint).to_dict()
            row.choose = self.grade(model, CHOOSE, model.parent, None)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a candidate that cannot be built (a target out of reach) is a result, not the end
            row.status, row.error = FAILED, first_line(e, with_type=not isinstance(e, CompressError))
            self.log(f"{candidate.spec}: failed: {row.error}")
        write_json_atomic(result_file, {k: v for k, v in row.__dict__.items() if k != "resumed"})
        return row

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.s.time_budget is not None and self.elapsed() >= self.s.time_budget * 60

    def run(self) -> dict:
        parent = self.parent_row()
        ctx = self.context()
        rows: list[Row] = []
        n = len(self.candidates)
        stopped = None
        durations: list[float] = []
        for k, candidate in enumerate(bar(self.candidates, "auto search", "candidate"), 1):
            if self.out_of_time() and not (self.s.resume and self.finished(candidate)):
                stopped = k - 1
                rows += [Row(c.name, c.spec, SKIPPED, c.commands(self.folder.path, ctx.data_options()))
                         for c in self.candidates[k - 1:]]
                self.progress(f"time budget of {self.s.time_budget:g} min spent after {k - 1} of {n} candidates; "
                              f"keeping the best so far")
                break
            t0 = time.perf_counter()
            row = self.run_candidate(candidate, ctx)
            if time.perf_counter() - t0 > 1:
                durations.append(time.perf_counter() - t0)
            rows.append(row)
            self.progress(candidate_line(k, n, row, parent, self.s.max_dice_drop, self.elapsed(),
                                         eta(durations, n - k)))
        if self.s.fine_tune_epochs is not None and stopped is None:
            rows += self.fine_tune(parent, rows, ctx)
        winner = choose_winner(parent, rows, self.s.max_dice_drop)
        verdict = R.NO_CANDIDATE
        if winner is not None:
            winner.held_out = self.grade(self.work / "candidates" / winner.name / "model", HELD_OUT,
                                         self.work / "candidates" / winner.name, None)
            drop = parent.held_out["mean_dice"] - winner.held_out["mean_dice"]
            verdict = R.WINNER if drop <= self.s.max_dice_drop + 1e-9 else R.HELD_OUT_VETO
        summary = R.summary(self.s, self.data, parent, rows, winner, verdict, stopped, self.elapsed())
        self.write_output(summary, winner if verdict == R.WINNER else None)
        return summary

    def fine_tune(self, parent: Row, rows: list[Row], ctx: BuildContext) -> list[Row]:
        """Fine-tune the frontier of the cheap search (see nnunet_compress.auto.fine_tune) and grade it again."""
        by_name = {c.name: c for c in self.candidates}
        chosen = frontier(rows, parent.dice, self.s.max_dice_drop, self.s.fine_tune_count, speedup,
                          lambda r: by_name[r.name].f32)
        if not chosen:
            self.progress("fine-tuning: no graded candidate is faster than the best one within the budget; nothing "
                          "to fine-tune")
            return []
        data = self.fine_tune_data()
        if data is not None:
            prepare_fine_tune_data(data, self.folder, self.data.train, self.configuration, self.s.checkpoint,
                                   self.log)
        out: list[Row] = []
        durations: list[float] = []
        n = len(chosen)
        for k, source in enumerate(chosen, 1):
            candidate = by_name[source.name].fine_tuned(self.s.fine_tune_epochs)
            if self.out_of_time() and not (self.s.resume and self.finished(candidate)):
                for r in chosen[k - 1:]:
                    c = by_name[r.name].fine_tuned(self.s.fine_tune_epochs)
                    out.append(Row(c.name, c.spec, SKIPPED, c.commands(self.folder.path, ctx.data_options()),
                                   fine_tuned_from=r.name))
                self.progress(f"time budget of {self.s.time_budget:g} min spent after {k - 1} of {n} fine-tunes; "
                              f"keeping the best so far")
                break
            self.progress(f"fine-tune {k}/{n} {source.spec} ({self.s.fine_tune_epochs} epoch(s) x "
                          f"{self.s.fine_tune_iterations} iterations; Dice before {source.dice:.4f})")
            t0 = time.perf_counter()
            row = self.run_candidate(candidate, ctx, fine_tuned_from=source.name)
            if time.perf_counter() - t0 > 1:
                durations.append(time.perf_counter() - t0)
            out.append(row)
            self.progress("fine-tune " + candidate_line(k, n, row, parent, self.s.max_dice_drop, self.elapsed(),
                                                        eta(durations, n - k)).removeprefix("candidate "))
        return out

    def write_output(self, summary: dict, winner: Row | None) -> None:
        """OUT: the winner's model folder with the reports, or (the parent is the answer) the reports only, so that
        nothing at OUT can be mistaken for a compressed model."""
        R.write_reports(self.work / "report", summary)
        with atomic_output_folder(self.s.output, self.s.overwrite) as tmp:
            if winner is not None:
                shutil.copytree(self.work / "candidates" / winner.name / "model", tmp, dirs_exist_ok=True)
            R.write_reports(tmp, summary)


def choose_winner(parent: Row, rows: list[Row], budget: float) -> Row | None:
    """The fastest graded candidate within `budget` of the parent's Dice on the choosing cases (ties: the higher
    Dice); None where none is.

    Fastest by the speed-up over the parent timed beside it, not by raw seconds: candidates are timed minutes
    apart, and on a shared machine the load between them moves raw seconds more than the compression does, while
    a ratio measured round-robin in one process cancels it.
    """
    eligible = [r for r in rows if r.status == OK and r.dice is not None and speedup(r) is not None
                and parent.dice - r.dice <= budget + 1e-9]
    return max(eligible, key=lambda r: (speedup(r), r.dice), default=None)


def speedup(row: Row) -> float | None:
    return (row.speed or {}).get("speedup_same_engine")


def eta(durations: list[float], remaining: int) -> float | None:
    return sum(durations) / len(durations) * remaining if durations else None


def candidate_line(k: int, n: int, row: Row, parent: Row, budget: float, elapsed: float, left: float | None) -> str:
    clock = f"elapsed {minutes(elapsed)}" + (f", ETA {minutes(left)}" if left is not None else "")
    if row.resumed:
        clock = "finished in an earlier run, read from its result.json; " + clock
    if row.status != OK:
        return f"candidate {k}/{n} {row.spec}: {row.status}: {row.error} ({clock})"
    speed = Speed(**{k2: row.speed[k2] for k2 in ("variant", "seconds", "parent_engine_seconds",
                                                  "parent_torch_seconds")})
    drop = parent.dice - row.dice
    fits = "within budget" if drop <= budget + 1e-9 else "over budget"
    return (f"candidate {k}/{n} {row.spec}: {fmt_x(speed.speedup_same_engine)} vs the parent on the same engine, "
            f"Dice {row.dice:.4f} (drop {drop:+.4f}, {fits}) ({clock})")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def fmt_x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "n/a"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def run_auto(settings: AutoSettings, progress: Callable[[str], None] = print) -> dict:
    """The whole search; returns the summary also written to ``auto_report.json``."""
    return Search(settings, progress).run()
