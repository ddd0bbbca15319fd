"""The candidates ``nnunet-compress auto`` tries: short specs, the folder each one is built into, and the commands
that rebuild it by hand.

A candidate is a chain of steps, each an existing one-command method applied to the previous step's model folder:
``tucker:latency=0.5`` (Tucker to half the parent's measured seconds per patch), ``tucker:ratio=0.5``,
``l1:flops=0.5`` / ``taylor:flops=0.5`` (one-shot filter pruning to half the FLOPs), ``int8`` (post-training
quantisation with NNCF's accuracy control), joined with ``+``: ``l1:flops=0.5+tucker:ratio=0.5+int8``. Why
chains of the existing commands rather than new code paths: every candidate is then a model folder a user could
have made themselves, and the report can print the exact commands that rebuild it.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from nnunet_compress.errors import CompressError

# method -> the targets it accepts (key -> the CLI option of the command that applies it)
TARGETS = {
    "tucker": {"latency": "--target-latency", "ratio": "--rank-ratio", "flops": "--target-flops",
               "params": "--target-params"},
    "l1": {"flops": "--target-flops", "params": "--target-params", "latency": "--target-latency"},
    "taylor": {"flops": "--target-flops", "params": "--target-params", "latency": "--target-latency"},
    "int8": {},
}

# rough relative build cost of one step, so the search tries the cheap candidates first: measured budgets time
# the network on the engine, Taylor scores need backward passes, INT8 runs NNCF's accuracy control
STEP_COST = {("tucker", "ratio"): 1.0, ("tucker", "flops"): 1.0, ("tucker", "params"): 1.0,
             ("tucker", "latency"): 3.0, ("l1", "flops"): 1.0, ("l1", "params"): 1.0, ("l1", "latency"): 3.0,
             ("taylor", "flops"): 2.0, ("taylor", "params"): 2.0, ("taylor", "latency"): 4.0, ("int8", ""): 3.0,
             ("ft", "epochs"): 10.0}

# the fine-tuning step (``ft:epochs=E``) is added by the search to frontier candidates (``--fine-tune-epochs``),
# never given in --candidates: it needs the labelled dataset and comes after the cheap search
FINE_TUNE = "ft"

# the default search: Tucker at several rank ratios and one measured latency target, L1 and Taylor pruning at
# several FLOPs targets, pruning followed by Tucker; each also with INT8. Tucker's rank ratios rather than only
# latency targets: on narrow networks (the demo's 8-64 channels) the rank floor stops a measured latency target
# near 0.75 of the parent's time, while a ratio always builds; a target the network cannot reach is reported as
# a failed candidate and the search goes on (so is a pruning target the class guard refuses to reach: on the
# demo's model L1 pruning to 0.3 of the FLOPs undoes every further step).
BASE_SPECS = ("tucker:ratio=0.5", "tucker:ratio=0.25", "tucker:latency=0.8",
              "l1:flops=0.7", "l1:flops=0.5", "l1:flops=0.4", "taylor:flops=0.5", "taylor:flops=0.4",
              "l1:flops=0.5+tucker:ratio=0.5", "taylor:flops=0.5+tucker:ratio=0.5")
DEFAULT_SPECS = tuple(s for base in BASE_SPECS for s in (base, f"{base}+int8"))


@dataclass(frozen=True)
class Step:
    method: str
    key: str = ""      # the target's kind ("latency", "ratio", "flops", "params"); "" for int8
    value: float = 0.0

    @property
    def spec(self) -> str:
        return self.method if not self.key else f"{self.method}:{self.key}={self.value:g}"

    @property
    def cost(self) -> float:
        return STEP_COST[(self.method, self.key)]


@dataclass(frozen=True)
class Candidate:
    steps: tuple[Step, ...]

    @property
    def spec(self) -> str:
        return "+".join(s.spec for s in self.steps)

    @property
    def name(self) -> str:
        """A file-name-safe form of the spec (the candidate's folder in the work area)."""
        return "+".join(s.spec.replace(":", "_").replace("=", "") for s in self.steps)

    @property
    def cost(self) -> float:
        return sum(s.cost for s in self.steps)

    @property
    def prefix(self) -> "Candidate | None":
        """The candidate whose model this one's last step starts from (None: the parent)."""
        return Candidate(self.steps[:-1]) if len(self.steps) > 1 else None

    def commands(self, parent: Path, data_options: dict[str, str]) -> list[str]:
        """Shell commands that rebuild this candidate from `parent` (`data_options`: the calibration options
        the search used: images for pruning and Tucker budgets, the INT8 calibration/validation source)."""
        out, source = [], str(parent)
        for i, step in enumerate(self.steps):
            target = Candidate(self.steps[: i + 1]).name
            if step.method == FINE_TUNE:
                out += fine_tune_commands(source, target, data_options)
            else:
                out.append(shlex.join(step_command(step, source, target, data_options)))
            source = target
        return out

    @property
    def f32(self) -> "Candidate":
        """This candidate without its INT8 step (the network a fine-tune trains)."""
        return Candidate(self.steps[:-1]) if self.steps[-1].method == "int8" else self

    def fine_tuned(self, epochs: int) -> "Candidate":
        """This candidate with its f32 network fine-tuned for `epochs` epochs before any INT8 step."""
        ft = Step(FINE_TUNE, "epochs", float(epochs))
        return Candidate(self.f32.steps + (ft,) + self.steps[len(self.f32.steps):])


def fine_tune_commands(source: str, output: str, data: dict[str, str]) -> list[str]:
    from nnunet_compress.auto.fine_tune import plans_name_of, rebuild_commands

    plans_name = plans_name_of({"plans_name": data["plans_name"]}, output)
    setup = data.get("fine_tune_setup")
    return rebuild_commands(source, output, data["dataset"], data["configuration"], data["folds"].split(","),
                            str(Path(data["candidates_root"]) / output), plans_name, data["checkpoint"],
                            data["device"], per_fold_plans=data.get("distil") == "yes",
                            setup=setup.splitlines() if setup else None)


def step_command(step: Step, source: str, output: str, data: dict[str, str]) -> list[str]:
    if step.method == "int8":
        args = ["nnunet-compress", "quantize", source, "-o", output, "--calibration-images", data["images"]]
        if data.get("labels"):
            args += ["--validation-labels", data["labels"]]
        return args + ["--max-dice-drop", data["max_dice_drop"], "--subset-size", data["subset_size"],
                       "--validation-patches", data["validation_patches"]]
    option = TARGETS[step.method][step.key]
    if step.method == "tucker":
        args = ["nnunet-compress", "tucker", source, "-o", output, option, f"{step.value:g}"]
        return args + (["-i", data["images"]] if step.key != "ratio" else [])
    return ["nnunet-compress", "prune", source, "-o", output, "--method", step.method, option, f"{step.value:g}",
            "-i", data["images"]]


def parse_step(text: str, spec: str) -> Step:
    method, _, target = text.strip().partition(":")
    if method not in TARGETS:
        raise CompressError(f"candidate {spec!r}: unknown method {method!r}; use {', '.join(TARGETS)} (e.g. "
                            f"tucker:latency=0.5, l1:flops=0.5+int8)")
    if method == "int8":
        if target:
            raise CompressError(f"candidate {spec!r}: int8 takes no target (its Dice budget is --max-dice-drop)")
        return Step("int8")
    key, _, value = target.partition("=")
    if key not in TARGETS[method]:
        raise CompressError(f"candidate {spec!r}: {method} needs one of {', '.join(k + '=X' for k in TARGETS[method])}"
                            f" (e.g. {method}:{next(iter(TARGETS[method]))}=0.5)")
    try:
        number = float(value)
    except ValueError:
        raise CompressError(f"candidate {spec!r}: {value!r} is not a number") from None
    if not (0 < number < 1) or math.isnan(number):
        raise CompressError(f"candidate {spec!r}: the target {number:g} is outside (0, 1); it is a fraction of the "
                            f"parent's cost")
    return Step(method, key, number)


def parse_candidate(spec: str) -> Candidate:
    steps = tuple(parse_step(part, spec) for part in spec.split("+"))
    if not steps:
        raise CompressError(f"candidate {spec!r} is empty")
    methods = [s.method for s in steps]
    if "int8" in methods[:-1] or methods.count("int8") > 1:
        raise CompressError(f"candidate {spec!r}: int8 can only be the last step (the INT8 model is made from the "
                            f"final f32 network)")
    if methods.count("tucker") > 1 or ("tucker" in methods and any(m in ("l1", "taylor")
                                                                    for m in methods[methods.index("tucker"):])):
        raise CompressError(f"candidate {spec!r}: Tucker comes once, after any pruning (a factorised network "
                            f"cannot be pruned)")
    return Candidate(steps)


def parse_candidates(specs: list[str] | None) -> list[Candidate]:
    """The candidates to try (the default search when `specs` is None), cheapest first, each once."""
    out: list[Candidate] = []
    for spec in specs if specs is not None else DEFAULT_SPECS:
        candidate = parse_candidate(spec)
        if candidate not in out:
            out.append(candidate)
    if not out:
        raise CompressError("--candidates is empty; give at least one spec, e.g. tucker:latency=0.5")
    return cheap_first(out)


def cheap_first(candidates: list[Candidate]) -> list[Candidate]:
    """Cheapest build first; a chain after its prefix (its build starts from the prefix's folder)."""
    return sorted(candidates, key=lambda c: (c.cost, len(c.steps), c.spec))
