"""Taylor first-order (and L1) filter pruning: settings, one pruning step, and pruning to a target without training.

One step is: score every prunable channel (first-order Taylor importance summed over batches, or the filters' L1
norms), choose the least important ones within the per-layer floors and the per-step cap, and report what would
be kept; :func:`plan_step` does that for both users of it, the one-shot ``nnunet-compress prune`` (through
:func:`prune_until_target`) and ``nnUNetTrainerTaylorPruning``, which differ only in where the batches come from and
in how a step is judged afterwards (the class guard). Pure torch: the nnU-Net side lives in the trainer and in
:mod:`nnunet_compress.workflows.prune`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from nnunet_compress.costs import COST_MODELS, count_parameters, patch_flops
from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.class_guard import (
    DEFAULT_GUARD_FLOOR,
    DEFAULT_NOISE_EPOCHS,
    ParentAgreement,
    ProtectedChannels,
    check_class_guard,
    check_guard_floor,
    check_noise_epochs,
    check_release_epochs,
    collapsed_classes,
    network_snapshot,
    removed_channels,
    restore_network,
)
from nnunet_compress.pruning.dependency import ChannelGroup, prunable_groups
from nnunet_compress.pruning.importance import (
    TaylorImportance,
    cost_weighted_scores,
    l1_importance,
    normalize_per_layer,
    output_normalized_backward,
    select_channels_to_keep,
)
from nnunet_compress.pruning.recovery import check_recovery_epochs
from nnunet_compress.pruning.step_size import SIZED_METRICS, CostAfterStep, fewest_channels_reaching
from nnunet_compress.pruning.surgery import channel_counts, prune_channels
from nnunet_compress.settings import Settings, check_choice, format_number_tag

# the allowed values, defined once: the settings check them and the CLI offers them as its choices
IMPORTANCE_MODES = ("output_normalized", "loss")  # see pruning.importance
SCOPES = ("global", "layer")  # one ranking over all layers, or each layer ranked on its own
PRUNE_METHODS = ("taylor", "l1")  # what the one-shot `nnunet-compress prune --method` scores with


class SecondsPrediction(Protocol):
    """What a latency target needs of the predicted seconds (:class:`nnunet_compress.budgets.channels.
    PredictedSeconds`, built on the engine's timings above this layer): the network's predicted fraction of the
    original's time, the seconds one channel of each group saves, and the correction by a measurement."""

    def fraction(self, net: nn.Module) -> float: ...

    def channel_seconds(self, net: nn.Module, groups: list[ChannelGroup]) -> dict[str, float]: ...

    def calibrate(self, net: nn.Module, measured_fraction: float) -> None: ...


@dataclass
class TaylorSettings(Settings):
    """How far and how fast to prune; recorded in the plans' compression section."""

    label = "Taylor"

    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None     # fraction of the original's measured seconds per patch on the CPU
                                            # engine; channels ranked by importance lost per second saved
    cost_model: str = "measured"            # target_latency: per-conv seconds "measured" on this machine, or "flops"
    importance: str = "output_normalized"   # or "loss" (classic Molchanov) — see pruning.importance
    normalize: bool = True                  # layer-wise L2 normalisation before the global ranking
    balance_classes: bool = True            # output_normalized: each class gets an equal share of the gradient
    scope: str = "global"                   # or "layer"
    step: float = 0.05                      # fraction of the prunable channels removed per pruning step
    prune_every: int = 1                    # epochs between pruning steps
    accumulate_batches: int = 8             # training batches whose Taylor scores are summed per step
    max_accumulate_batches: int | None = None  # ... drawing more, up to this many (None: 32, or more if
                                               # accumulate_batches is larger), until every class has appeared
    min_channels: int = 2                   # never fewer channels than this in any layer
    min_keep_fraction: float = 0.25         # ... nor fewer than this share of the layer's channels at the start
    max_layer_step: float = 0.2             # no layer loses more than this share of its channels in one step
    class_guard: float = 0.5                # undo a step after which a class keeps less than this share of its
                                            # Dice (0: off) — see class_guard
    class_guard_floor: float = DEFAULT_GUARD_FLOOR  # in training: judge only classes above this pseudo Dice
    class_guard_noise_epochs: int = DEFAULT_NOISE_EPOCHS  # ... and above their spread over this many validations
    class_guard_release: int = 0            # release protected filters this many epochs after the undo (0: only
                                            # when the class recovers): a trained parent's collapse would recur
    recovery_epochs: int | None = None      # in training: the last epochs take no step (None: a quarter of the
                                            # schedule) — see recovery

    def validate(self) -> "TaylorSettings":
        targets = [t for t in (self.target_flops, self.target_params, self.target_latency) if t is not None]
        if len(targets) != 1:
            raise CompressError("give exactly one of --target-flops, --target-params and --target-latency")
        if not 0 < targets[0] < 1:
            raise CompressError(f"target {targets[0]} is outside (0, 1); it is the fraction of the original to keep, "
                                f"e.g. --target-flops 0.5")
        check_choice("--importance", self.importance, IMPORTANCE_MODES)
        check_choice("--cost-model", self.cost_model, COST_MODELS)
        check_choice("--scope", self.scope, SCOPES)
        if not 0 < self.step < 1:
            raise CompressError(f"--step {self.step} is outside (0, 1); e.g. 0.05 removes 5% of channels per step")
        if not 0 < self.max_layer_step <= 1:
            raise CompressError(f"--max-layer-step {self.max_layer_step} is outside (0, 1]; it is the largest share "
                                f"of a layer's channels one step may remove, e.g. 0.2")
        self.class_guard = check_class_guard(self.class_guard)
        self.class_guard_floor = check_guard_floor(self.class_guard_floor)
        self.class_guard_noise_epochs = check_noise_epochs(self.class_guard_noise_epochs)
        self.class_guard_release = check_release_epochs(self.class_guard_release)
        self.recovery_epochs = check_recovery_epochs(self.recovery_epochs)
        if not 0 <= self.min_keep_fraction < 1:
            raise CompressError(f"--min-keep-fraction {self.min_keep_fraction} is outside [0, 1)")
        for name in ("prune_every", "accumulate_batches", "min_channels"):
            if int(getattr(self, name)) < 1:
                raise CompressError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.max_accumulate_batches is not None and self.max_accumulate_batches < self.accumulate_batches:
            raise CompressError(f"--max-accumulate-batches {self.max_accumulate_batches} is below "
                                f"--accumulate-batches {self.accumulate_batches}; give at least as many")
        return self

    @property
    def scoring_batch_cap(self) -> int:
        """Most training batches one pruning step scores while waiting for every class to appear."""
        if self.max_accumulate_batches is not None:
            return self.max_accumulate_batches
        return max(32, self.accumulate_batches)

    @property
    def metric(self) -> str:
        """"flops", "params" or "seconds" (--target-latency)."""
        if self.target_latency is not None:
            return "seconds"
        return "flops" if self.target_flops is not None else "params"

    @property
    def target(self) -> float:
        return {"flops": self.target_flops, "params": self.target_params, "seconds": self.target_latency}[self.metric]

    def tag(self) -> str:
        letter = {"flops": "F", "params": "P", "seconds": "L"}[self.metric]
        return f"taylor{letter}{format_number_tag(self.target)}"

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.metric != "seconds":
            d.pop("cost_model", None)
        return d


def channels_to_remove(groups, fraction: float) -> int:
    total = sum(g.size for g in groups)
    return max(1, int(math.ceil(fraction * total)))

def layer_floors(settings: TaylorSettings, initial_counts: dict[str, int] | None) -> dict[str, int] | int:
    """Fewest channels each group may keep: min_channels, and min_keep_fraction of its count at the start.

    A global ranking alone tends to strip a few layers (often the last decoder stage, whose normalised scores are
    flat) down to a handful of channels, and small structures vanish with them; a per-layer floor keeps every
    layer able to carry what it carried before, while the ranking still decides where most channels go.
    """
    if not initial_counts:
        return settings.min_channels
    return {name: max(settings.min_channels, int(math.ceil(settings.min_keep_fraction * n)))
            for name, n in initial_counts.items()}

def _floor_of(floors):
    return (lambda g: floors.get(g.name, 1)) if isinstance(floors, dict) else (lambda g: floors)

def removable_channels(groups, floors) -> int:
    """How many channels can still go without breaking a floor."""
    floor_of = _floor_of(floors)
    return sum(max(0, g.size - floor_of(g)) for g in groups)

def step_floors(groups, floors, max_layer_step: float) -> dict[str, int]:
    """Floors for one pruning step: the layer floors, and no layer losing more than `max_layer_step` of its
    current channels (at least one may always go).

    Why: a global ranking can take a large share of one narrow layer in a single step — on the tiny nnU-Net the
    full-resolution decoder convs went from 8 to 5 channels in the first step, the FLOPs fell by 30% at once, and
    in about half of the runs a thin class never came back in the short fine-tuning. Capping the per-step share
    spreads that removal over several steps with fine-tuning in between; the ranking still decides where to cut.
    """
    floor_of = _floor_of(floors)
    return {g.name: max(floor_of(g), g.size - max(1, int(max_layer_step * g.size))) for g in groups}

def batches_covering_classes(draw: Callable[[], tuple[torch.Tensor, object]], num_classes: int, minimum: int,
                             maximum: int, on_missing: Callable[[list[int]], None] | None = None):
    """Yield at least `minimum` labelled batches from `draw()`, and keep drawing (up to `maximum`) until every
    foreground class 1..num_classes-1 has appeared in some batch's labels.

    Why: a filter that only serves a small structure gets a Taylor score of zero from every batch that does not
    contain that structure. nnU-Net's sampler puts a given small class into a patch only now and then, so a step
    scored on a few batches without it ranks that class's filters last and removes them — the tiny nnU-Net lost
    its lesion class this way in a test run. `on_missing` hears the classes still unseen after `maximum` batches.
    """
    if minimum < 1 or maximum < minimum:
        raise CompressError(f"need 1 <= minimum <= maximum scoring batches, got {minimum} and {maximum}")
    wanted, seen = set(range(1, num_classes)), set()
    for i in range(maximum):
        if i >= minimum and wanted <= seen:
            break
        data, target = draw()
        labels = target[0] if isinstance(target, (list, tuple)) else target
        seen.update(int(v) for v in torch.unique(labels).tolist())
        yield data, target
    if on_missing is not None and not wanted <= seen:
        on_missing(sorted(wanted - seen))

def taylor_scores(net: nn.Module, groups, batches: Iterable[tuple[torch.Tensor, object]], mode: str,
                  loss_fn: Callable | None = None, balance_classes: bool = True) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every channel, summed over `batches` of (input, target)."""
    was_training = net.training
    net.train()
    with TaylorImportance(net, groups, mode=mode) as importance:
        for data, target in batches:
            net.zero_grad(set_to_none=True)
            output = net(data)
            if mode == "loss":
                if loss_fn is None:
                    raise CompressError("loss-based Taylor importance needs labelled batches")
                loss_fn(output, target).backward()
            else:
                labels = target[0] if isinstance(target, (list, tuple)) else target
                output_normalized_backward(output, labels, balance_classes)
        scores = importance.scores()
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return scores

def choose_channels_to_keep(net: nn.Module, settings: TaylorSettings, scores: dict[str, torch.Tensor],
                            n_remove: int, initial_counts: dict[str, int] | None = None,
                            protected=None, channel_seconds: dict[str, float] | None = None,
                            groups: list[ChannelGroup] | None = None) -> dict[str, list[int]]:
    """The kept channels of every group that loses some in this step ({} when none can go).

    `protected` (a class_guard.ProtectedChannels) names channels whose removal once made a class collapse: they
    rank above every other channel and the floors leave room for them, so they are never chosen.
    `channel_seconds` (group -> predicted seconds saved per channel; latency targets) turns the ranking into
    importance lost per second saved (:func:`nnunet_compress.pruning.importance.cost_weighted_scores`).
    `groups`: the net's prunable groups where the caller has already found them (else found here).
    """
    groups = prunable_groups(net) if groups is None else groups
    if settings.normalize:
        scores = normalize_per_layer(scores)
    if channel_seconds:
        scores = cost_weighted_scores(scores, channel_seconds)
    floors = step_floors(groups, layer_floors(settings, initial_counts), settings.max_layer_step)
    if protected:
        scores = protected.protect_scores(scores)
        floors = protected.floors(floors)
    n_remove = min(n_remove, removable_channels(groups, floors))
    if n_remove == 0:
        return {}
    return select_channels_to_keep(scores, n_remove, min_channels=floors, scope=settings.scope, groups=groups)


@dataclass
class PruningStep:
    """What one pruning step removes: the prunable groups as they were before it, and the channels each group that
    loses some keeps (empty when every layer is at its floor)."""

    groups: list[ChannelGroup]
    keep: dict[str, list[int]]

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    @property
    def removed(self) -> int:
        return sum(g.size - len(self.keep[g.name]) for g in self.groups if g.name in self.keep)


def plan_step(net: nn.Module, settings: TaylorSettings, score: Callable[[list[ChannelGroup]], dict[str, torch.Tensor]],
              initial_counts: dict[str, int] | None, protected=None,
              latency: SecondsPrediction | None = None,
              reaches: Callable[[dict[str, list[int]]], bool] | None = None) -> PruningStep:
    """One pruning step's choice, shared by one-shot pruning and nnUNetTrainerTaylorPruning: score the prunable
    channels with `score(groups)` (Taylor over some batches, or L1), then keep all but the `settings.step` share
    with the lowest scores, within the floors and the per-step cap and never touching `protected` channels.

    `reaches(keep)`: whether the network would meet the target after removing all but `keep`. Given it, a step that
    would go past the target removes only the fewest of its lowest-ranked channels that reach it
    (:mod:`nnunet_compress.pruning.step_size`).

    The network is not changed: the caller removes ``step.keep``'s complement (after agreeing on it across DDP
    ranks, or snapshotting for the class guard), which is where the two users differ.
    """
    groups = prunable_groups(net)
    channel_seconds = latency.channel_seconds(net, groups) if latency is not None else None
    scores = score(groups)

    def choose(n_remove: int) -> dict[str, list[int]]:
        return choose_channels_to_keep(net, settings, scores, n_remove, initial_counts, protected, channel_seconds,
                                       groups)
    planned = channels_to_remove(groups, settings.step)
    keep = choose(planned) if reaches is None else fewest_channels_reaching(choose, reaches, planned)
    return PruningStep(groups, keep)


def target_check(net: nn.Module, settings: TaylorSettings, reference: float, input_channels: int, patch_size
                 ) -> Callable[[dict[str, list[int]]], bool] | None:
    """`plan_step`'s `reaches` for a FLOP or parameter target (`reference`: the cost the target is a fraction of);
    None for a latency target, which is measured after the step instead."""
    if settings.metric not in SIZED_METRICS:
        return None
    return CostAfterStep(net, settings.metric, reference, input_channels, patch_size).reaches(settings.target)


def prune_until_target(net: nn.Module, settings: TaylorSettings, method: str, input_channels: int, patch_size,
                       calibration: list[torch.Tensor] | None = None, progress=print,
                       class_names: list[str] | None = None, rollbacks: list | None = None,
                       latency: SecondsPrediction | None = None,
                       measure: Callable[[nn.Module], float] | None = None) -> list[dict]:
    """One-shot pruning without fine-tuning: score, remove a step, re-score ... until the target is met.

    With calibration patches and `settings.class_guard` > 0, every step is checked against the unpruned
    network (class_guard.ParentAgreement): a step after which a class the parent predicts keeps less than
    class_guard of its agreement is undone, its filters are protected, and the next step picks others. Each undone
    step is appended to `rollbacks` (if given) and reported through `progress`.

    A latency target (``settings.metric == "seconds"``) needs `latency` (the predicted seconds) and `measure`
    (network -> its measured fraction of the original's time): channels are ranked by importance per predicted
    second saved, and the whole network is measured after every step; pruning stops when the MEASURED fraction
    meets the target. The stop is measured, not predicted, because the engine's time is not smooth in the channel
    count: OpenVINO pads channels to blocks of 8/16, so one step can save a small share of its predicted time and
    the next far more, and a stop on predictions would prune well past the point where the target is met.
    """
    if settings.metric == "seconds" and (latency is None or measure is None):
        raise CompressError("a latency target needs the predicted seconds and a way to measure the network")

    def cost() -> float:
        if settings.metric == "flops":
            return patch_flops(net, input_channels, patch_size)
        if settings.metric == "seconds":
            return latency.fraction(net)
        return count_parameters(net)

    start, history = cost(), []
    rollbacks = rollbacks if rollbacks is not None else []
    initial_counts = channel_counts(net)
    guard = ParentAgreement(net, calibration) if calibration and settings.class_guard > 0 else None
    protected = ProtectedChannels()
    fraction = 1.0
    while fraction > settings.target:
        if removable_channels(prunable_groups(net), layer_floors(settings, initial_counts)) == 0:
            raise CompressError(f"cannot reach {settings.metric} {settings.target} without emptying layers (every "
                                f"layer is at its floor: --min-channels {settings.min_channels}, --min-keep-fraction "
                                f"{settings.min_keep_fraction}); lower those or raise the target")
        if method != "l1" and not calibration:
            raise CompressError("Taylor pruning needs calibration images: pass -i IMAGES_FOLDER")

        def score(groups):
            if method == "l1":
                return l1_importance(net, groups)
            return taylor_scores(net, groups, ((b, None) for b in calibration), "output_normalized",
                                 balance_classes=settings.balance_classes)
        reaches = target_check(net, settings, start, input_channels, patch_size)
        step = plan_step(net, settings, score, initial_counts, protected, latency, reaches)
        keep, removed = step.keep, step.removed
        if not keep and protected:
            raise CompressError(f"cannot reach {settings.metric} {settings.target}: the class guard undid "
                                f"{len(rollbacks)} step(s) and protects {protected.total} filters, and every other "
                                f"filter is at a floor; lower --class-guard (0 turns it off) or raise the target")
        if not keep:
            raise CompressError("no channel could be removed; lower --min-channels or raise the target")
        snapshot = network_snapshot(net) if guard else None
        prune_channels(net, keep)
        if guard:
            drops = collapsed_classes(guard.before, guard.dice(net), settings.class_guard, class_names)
            if drops:
                restore_network(net, snapshot)
                gone = removed_channels(step.sizes, keep)
                protected.add(gone)
                rollbacks.append({"step": len(history) + len(rollbacks), "classes": [d.to_dict() for d in drops],
                                  "protected": gone})
                progress(f"  undone: removing {removed} channels made {', '.join(d.describe() for d in drops)} "
                         f"(agreement with the unpruned network); those channels are now protected")
                continue
        protected.after_pruning(keep)
        fraction = cost() / start
        entry = {"removed": removed, "fraction": fraction}
        if settings.metric == "seconds":
            entry["predicted"] = fraction
            fraction = entry["fraction"] = entry["measured"] = measure(net)
            latency.calibrate(net, fraction)
        history.append(entry)
        measured = " (measured)" if "measured" in entry else ""
        progress(f"  removed {removed} channels -> {settings.metric} {fraction:.3f} of the original{measured}")
    return history
