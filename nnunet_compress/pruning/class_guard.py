"""The class guard: undo a pruning step after which a segmentation class collapsed, and never repeat it.

Why: a pruning step ranks filters by importance summed over a few batches, and a filter that only one small
class needs can rank low (its class was rare in those batches, or its contribution is carried by few voxels).
Removing it can delete that class outright, and fine-tuning does not bring it back: a fresh-clone demo run of
Taylor F0.5 ended with one class at Dice 0.000 while another run of the same command reached 0.938. Measuring
every class before a step and again after its fine-tuning catches that case; the step is undone and the filters
it removed are protected (never chosen again), so the next step removes other filters instead.

This module is the decision logic and the bookkeeping, without nnU-Net: which classes collapsed
(:func:`collapsed_classes`), per-class Dice from counts (:func:`dice_from_counts`, :func:`agreement_counts`),
which filters a step removed (:func:`removed_channels`), the protected set that survives later re-indexing
(:class:`ProtectedChannels`), and a network snapshot to restore (:func:`network_snapshot`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.importance import full_resolution_output
from nnunet_compress.pruning.surgery import channel_counts, set_channel_counts

DEFAULT_CLASS_GUARD = 0.5


def check_class_guard(value: float, option: str = "--class-guard") -> float:
    """`value` as a float in [0, 1), or CompressError naming the option (0 turns the guard off)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CompressError(f"{option} {value!r} is not a number; give a share in [0, 1), e.g. {option} 0.5 "
                            f"(0 turns the guard off)") from None
    if not 0 <= value < 1:
        raise CompressError(f"{option} {value} is outside [0, 1); it is the share of a class's Dice before a pruning "
                            f"step that must remain after it, e.g. {option} 0.5 (0 turns the guard off)")
    return value


@dataclass
class ClassDrop:
    """One class that fell below its share: its position in the per-class list, its name, Dice before/after."""

    index: int
    name: str
    before: float
    after: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name} {self.before:.3f} -> {self.after:.3f}"


def present(dice: float) -> bool:
    """A class counts as present when its Dice is a positive number: 0 or NaN means it was not found at all, and
    nothing can be lost from a class that was not there."""
    return dice is not None and math.isfinite(float(dice)) and float(dice) > 0


def collapsed_classes(before: Sequence[float], after: Sequence[float], share: float,
                      names: Sequence[str] | None = None) -> list[ClassDrop]:
    """The classes present before a step (Dice > 0, not NaN) whose Dice after it is below `share` × before.

    An after-value of NaN (the class neither predicted nor in the labels of the batches measured) says nothing
    about the class and does not count as a collapse. `share` 0 turns the guard off (never a collapse).
    """
    share = check_class_guard(share, "class guard")
    if len(before) != len(after):
        raise CompressError(f"per-class Dice lists differ in length ({len(before)} before, {len(after)} after the "
                            f"step); both must list the same classes")
    names = list(names) if names is not None else [f"class {i + 1}" for i in range(len(before))]
    if share == 0:
        return []
    drops = []
    for i, (b, a) in enumerate(zip(before, after)):
        if not present(b) or a is None or math.isnan(float(a)):
            continue
        if float(a) < share * float(b):
            drops.append(ClassDrop(i, names[i], float(b), float(a)))
    return drops


def dice_from_counts(tp, fp, fn) -> list[float]:
    """Per-class Dice 2tp / (2tp + fp + fn), NaN where a class is neither predicted nor present (as nnU-Net)."""
    return [2 * t / (2 * t + p + n) if (2 * t + p + n) > 0 else float("nan")
            for t, p, n in zip(map(float, tp), map(float, fp), map(float, fn))]


def agreement_counts(reference: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """tp, fp, fn (rows) of `prediction` against `reference` for the foreground classes 1..num_classes-1.

    Both are label maps of the same shape. Used without ground truth: the reference is the unpruned network's
    argmax, so the Dice measures how much of each class the pruned network still finds where its parent did.
    """
    if reference.shape != prediction.shape:
        raise CompressError(f"label maps differ in shape: {tuple(reference.shape)} vs {tuple(prediction.shape)}")
    counts = torch.zeros(3, max(0, num_classes - 1), dtype=torch.float64)
    for c in range(1, num_classes):
        ref, pred = reference == c, prediction == c
        counts[0, c - 1] = float((ref & pred).sum())
        counts[1, c - 1] = float((~ref & pred).sum())
        counts[2, c - 1] = float((ref & ~pred).sum())
    return counts


def removed_channels(sizes: Mapping[str, int], keep: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Indices (before the step) of the channels a `keep` request removes, by group; groups losing none omitted."""
    removed = {}
    for name, kept in keep.items():
        gone = sorted(set(range(int(sizes[name]))) - {int(i) for i in kept})
        if gone:
            removed[name] = gone
    return removed


class ProtectedChannels:
    """Channels that no pruning step may remove again, by group and *current* index.

    Indices shift whenever earlier channels of a group are removed, so every removal must be reported through
    :meth:`after_pruning`, which maps the protected indices to their new positions. Protected channels are never
    removed (:meth:`protect_scores` gives them infinite importance and :meth:`floors` keeps room for them), so
    the mapping always finds them.
    """

    def __init__(self, by_group: Mapping[str, Sequence[int]] | None = None):
        self.by_group: dict[str, set[int]] = {name: {int(i) for i in idx} for name, idx in (by_group or {}).items()
                                              if idx}

    def add(self, channels: Mapping[str, Sequence[int]]) -> None:
        for name, indices in channels.items():
            if indices:
                self.by_group.setdefault(name, set()).update(int(i) for i in indices)

    def count(self, group: str) -> int:
        return len(self.by_group.get(group, ()))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_group.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def after_pruning(self, keep: Mapping[str, Sequence[int]]) -> None:
        """Re-index after a removal that kept `keep[group]` (old indices, in any order) of each group named."""
        for name, kept in keep.items():
            if name not in self.by_group:
                continue
            new_position = {old: new for new, old in enumerate(sorted(int(i) for i in kept))}
            lost = self.by_group[name] - set(new_position)
            if lost:
                raise CompressError(f"protected channels {sorted(lost)} of group {name!r} were removed; choose the "
                                    f"channels to remove with the protected set applied")
            self.by_group[name] = {new_position[i] for i in self.by_group[name]}

    def protect_scores(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores with the protected channels set to +inf (apply after any normalisation: inf would spoil it)."""
        out = {}
        for name, values in scores.items():
            values = torch.as_tensor(values).detach().float().clone()
            for i in self.by_group.get(name, ()):
                if i < len(values):
                    values[i] = float("inf")
            out[name] = values
        return out

    def floors(self, floors: Mapping[str, int]) -> dict[str, int]:
        """Per-group floors raised to at least the number of protected channels, so that removing the lowest
        scores never reaches an (infinite-score) protected channel."""
        return {name: max(int(f), self.count(name)) for name, f in floors.items()}

    def state(self) -> dict[str, list[int]]:
        return {name: sorted(idx) for name, idx in self.by_group.items() if idx}


def network_snapshot(net: nn.Module) -> dict:
    """What restores `net` exactly after a removal: its channel counts and a CPU copy of its weights."""
    return {"channels": channel_counts(net),
            "weights": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}


def restore_network(net: nn.Module, snapshot: Mapping) -> None:
    """Give `net` back the shape and weights of `snapshot` (in place, like the surgery itself)."""
    set_channel_counts(net, snapshot["channels"])
    net.load_state_dict(snapshot["weights"])


def foreground_class_names(labels: Mapping[str, object]) -> list[str]:
    """Names of the foreground classes (or regions) of a dataset.json "labels" map, in nnU-Net's order: the
    order of the per-class pseudo Dice it logs (label value order; regions in the order they are listed)."""
    items = [(name, value) for name, value in labels.items() if value not in (0, [0], (0,))]
    if all(isinstance(v, int) for _, v in items):
        items.sort(key=lambda item: item[1])
    return [name for name, _ in items]


class ParentAgreement:
    """How much of each class a pruned network still finds where its unpruned parent found it.

    Why: one-shot pruning has calibration images but no labels, so the guard measures each class as the Dice of
    the pruned network's argmax against the parent's argmax on the same calibration patches. A class the parent
    predicts has agreement 1.0 with itself; a class that collapses falls towards 0.
    """

    def __init__(self, parent: nn.Module, batches: Sequence[torch.Tensor]):
        if not batches:
            raise CompressError("the class guard needs calibration patches; pass -i IMAGES_FOLDER or turn the "
                                "guard off with --class-guard 0")
        self.batches = list(batches)
        self.reference = predicted_labels(parent, self.batches)
        self.num_classes = self._num_classes(parent)

    def _num_classes(self, net: nn.Module) -> int:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            channels = full_resolution_output(net(self.batches[0][:1])).shape[1]
        net.train(was_training)
        return channels

    def dice(self, net: nn.Module) -> list[float]:
        """Per foreground class: Dice of `net`'s argmax against the parent's (NaN where neither predicts it)."""
        counts = sum(agreement_counts(ref, pred, self.num_classes)
                     for ref, pred in zip(self.reference, predicted_labels(net, self.batches)))
        return dice_from_counts(*counts)

    @property
    def before(self) -> list[float]:
        """The parent against itself: 1.0 for every class it predicts somewhere, NaN for the others."""
        counts = sum(agreement_counts(ref, ref, self.num_classes) for ref in self.reference)
        return dice_from_counts(*counts)


def predicted_labels(net: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """argmax label map of `net` (in eval mode, no gradients) for every batch; the training mode is restored."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return [full_resolution_output(net(b)).argmax(1).to(torch.int16).cpu() for b in batches]
    finally:
        net.train(was_training)


class StepGuard:
    """Bookkeeping of the class guard across in-training pruning steps (no nnU-Net in here).

    A trainer calls :meth:`begin_step` right after removing channels (with the per-class Dice measured before,
    the `keep` request and a snapshot of everything it would need to undo the step), and :meth:`finish_step` with
    the per-class Dice at the validation that precedes the next step. If a class collapsed, finish_step returns
    the snapshot to restore, protects the removed channels (as indices of the restored network), and records the
    rollback; otherwise it returns None. :meth:`state` / :meth:`load_state` carry all of it through checkpoints,
    including a pending step, so that ``--c`` resumes with the same protected set and rollback list.
    """

    def __init__(self, share: float, names: Sequence[str] | None = None):
        self.share = check_class_guard(share)
        self.names = list(names) if names is not None else None
        self.protected = ProtectedChannels()
        self.rollbacks: list[dict] = []
        self.pending: dict | None = None
        self.baseline: list[float] | None = None  # Dice of the network restored by the last rollback

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def begin_step(self, epoch: int, before: Sequence[float] | None, sizes: Mapping[str, int],
                   keep: Mapping[str, Sequence[int]], snapshot: dict, record: dict | None = None) -> None:
        """Note a step that just removed channels (`sizes`: group sizes before it) and re-index the protected set."""
        protected_before = self.protected.state()
        self.protected.after_pruning(keep)
        self.baseline = None
        if not self.enabled or before is None:
            return  # off, or nothing measured before the step to judge it by
        self.pending = {"epoch": int(epoch), "before": [float(v) for v in before],
                        "removed": removed_channels(sizes, keep), "protected_before": protected_before,
                        "snapshot": snapshot, "record": dict(record or {})}

    def due(self, epoch: int, every: int, last_epoch: int) -> bool:
        """Whether the validation of `epoch` is the one to judge the pending step by: the last before the next
        step (`every` epochs after it), or the last of the training."""
        if self.pending is None:
            return False
        return epoch + 1 - self.pending["epoch"] >= every or epoch >= last_epoch

    def finish_step(self, after: Sequence[float] | None, epoch: int) -> dict | None:
        """Judge the pending step by the per-class Dice `after` it; the snapshot to restore if it is undone."""
        pending, self.pending = self.pending, None
        if pending is None or after is None:
            return None
        drops = collapsed_classes(pending["before"], list(after), self.share, self.names)
        if not drops:
            return None
        self.protected = ProtectedChannels(pending["protected_before"])
        self.protected.add(pending["removed"])
        self.baseline = pending["before"]
        self.rollbacks.append({"step_epoch": pending["epoch"], "checked_epoch": int(epoch),
                               "classes": [d.to_dict() for d in drops], "protected": pending["removed"],
                               "step": pending["record"]})
        return pending["snapshot"]

    def describe_last_rollback(self) -> str:
        r = self.rollbacks[-1]
        classes = ", ".join(f"{c['name']} Dice {c['before']:.3f} -> {c['after']:.3f}" for c in r["classes"])
        protected = {name: idx for name, idx in r["protected"].items()}
        epoch = r["step"].get("epoch", r["step_epoch"])
        return (f"undid the pruning step of epoch {epoch}: {classes} (below {self.share} of its value "
                f"before the step); restored the network and optimizer from before the step and protected the "
                f"{sum(len(v) for v in protected.values())} filters it removed: {protected}")

    def state(self) -> dict:
        return {"share": self.share, "protected": self.protected.state(), "rollbacks": self.rollbacks,
                "pending": self.pending, "baseline": self.baseline}

    def load_state(self, state: Mapping | None) -> None:
        state = state or {}
        self.protected = ProtectedChannels(state.get("protected", {}))
        self.rollbacks = list(state.get("rollbacks", []))
        self.pending = state.get("pending")
        self.baseline = state.get("baseline")
