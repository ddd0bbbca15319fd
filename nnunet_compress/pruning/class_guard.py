"""The class guard: undo a pruning step after which a learned segmentation class collapsed.

Why: a pruning step ranks filters by importance summed over a few batches, and a filter that only one small
class needs can rank low (its class was rare in those batches, or its contribution is carried by few voxels).
Removing it can delete that class outright, and fine-tuning does not bring it back: a fresh-clone demo run of
Taylor F0.5 ended with one class at Dice 0.000 while another run of the same command reached 0.938. Measuring
every class before a step and again after its fine-tuning catches that case; the step is undone and the filters
it removed are protected (not chosen again while protected), so the next step removes other filters instead.

Only classes the network has learned are judged (:func:`judge_classes`). In training from scratch (Sauron's
main mode) the first epochs' pseudo Dice is noise: a class at 0.039 after one epoch that reads 0.005 after the
next says nothing about the filters a step removed, yet undoing that step protected its 57 filters for good and
left the run at 0.82 of the FLOPs instead of ~0.70. So a class counts only when its Dice before the step is above
a floor (``--class-guard-floor``) by more than its own noise: twice the standard deviation of its last few
validations (``--class-guard-noise-epochs``); its fall must also exceed that noise. The others are reported, not
guarded. Protection can end, too (``--class-guard-release``): after a number of epochs, or once the class that
triggered the undo has risen past its value before the step by more than its noise (the network has learned it
anew, so the filters deserve a fresh judgement).

This module is the decision logic and the bookkeeping, without nnU-Net: which classes collapsed
(:func:`judge_classes`, :func:`collapsed_classes`), a class's noise (:func:`class_noise`), per-class Dice from counts (:func:`dice_from_counts`, :func:`agreement_counts`),
which filters a step removed (:func:`removed_channels`), the protected set that survives later re-indexing
(:class:`ProtectedChannels`), a network snapshot to restore (:func:`network_snapshot`), and the in-training
bookkeeping with its releases (:class:`StepGuard`).
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.importance import full_resolution_output
from nnunet_compress.pruning.surgery import channel_counts, set_channel_counts

DEFAULT_CLASS_GUARD = 0.5
# a class is judged only when its pseudo Dice before the step is above this by more than its noise: from scratch
# (benchmarks/class_guard.py, 5 seeds) the guard that judged every class present undid removals on classes at
# 0.001-0.145, and unlearned classes read up to 0.54 before falling back; the Taylor runs from a trained parent kept
# every fine-tuned class at 0.68 or more (5 seeds), well clear of it
DEFAULT_GUARD_FLOOR = 0.3
# validations whose spread is a class's noise: enough for a standard deviation, few enough to follow training
DEFAULT_NOISE_EPOCHS = 5
# a class's noise is this many standard deviations of its recent pseudo Dice (about 95% of its epoch-to-epoch moves)
NOISE_STDS = 2.0


def _share_in_unit_interval(value, option: str, what: str, example: str, meaning: str) -> float:
    """`value` as a float in [0, 1), or CompressError naming the option, what it means and an example."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CompressError(f"{option} {value!r} is not a number; give {what} in [0, 1), e.g. {option} "
                            f"{example}") from None
    if not 0 <= value < 1:
        raise CompressError(f"{option} {value} is outside [0, 1); it is {meaning}, e.g. {option} {example}")
    return value


def check_class_guard(value: float, option: str = "--class-guard") -> float:
    """`value` as a float in [0, 1), or CompressError naming the option (0 turns the guard off)."""
    return _share_in_unit_interval(value, option, "a share", "0.5 (0 turns the guard off)",
                                   "the share of a class's Dice before a pruning step that must remain after it")


def check_guard_floor(value: float, option: str = "--class-guard-floor") -> float:
    """`value` as a float in [0, 1), or CompressError naming the option (0 judges every class present)."""
    return _share_in_unit_interval(value, option, "a pseudo Dice", f"{DEFAULT_GUARD_FLOOR}",
                                   "the pseudo Dice a class must exceed before a pruning step for the class guard "
                                   "to judge it")


def check_epochs(value: int, option: str, meaning: str) -> int:
    """`value` as a non-negative integer, or CompressError naming the option and what 0 means."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CompressError(f"{option} {value!r} must be a non-negative integer of epochs ({meaning})")
    return int(value)


def check_noise_epochs(value: int, option: str = "--class-guard-noise-epochs") -> int:
    return check_epochs(value, option, "0: no noise estimate, the floor alone decides")


def check_release_epochs(value: int, option: str = "--class-guard-release") -> int:
    return check_epochs(value, option, "0: protected filters are released only when their class recovers")


@dataclass
class ClassDrop:
    """One class that fell below its share: its position in the per-class list, its name, Dice before/after, and
    what it was judged against (the floor, its noise: None where too few validations measured it) and, for a class
    that was not guarded, why not (`unguarded`, empty for a collapse)."""

    index: int
    name: str
    before: float
    after: float
    floor: float = 0.0
    noise: float | None = None
    unguarded: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name} {self.before:.3f} -> {self.after:.3f}"


def class_noise(values: Sequence[float], epochs: int = DEFAULT_NOISE_EPOCHS) -> float | None:
    """A class's noise: NOISE_STDS standard deviations of its last `epochs` pseudo Dice values (NaN skipped).

    Why a spread and not a fixed margin: pseudo Dice on a few validation batches moves little for a settled class
    of a trained network (the demo's base model, last five validations: noise 0.005-0.049 at Dice 0.83 and above)
    and by as much as the value itself for a class that is just appearing. None with fewer
    than two values: nothing to measure a spread by (the floor alone then decides).
    """
    finite = [float(v) for v in list(values)[-epochs:] if v is not None and math.isfinite(float(v))] \
        if epochs > 0 else []
    return NOISE_STDS * statistics.pstdev(finite) if len(finite) >= 2 else None


def why_unguarded(before: float, after: float, floor: float, noise: float | None) -> str:
    """Why a class that fell is not judged, or "" when it is.

    Not learned yet: its Dice before the step was not above the floor, or not by more than its noise (from
    scratch, a class read 0.26 and 0.45 in its first two validations and 0.00 in the third with every other class:
    the network, not a step, had lost it). Or nothing the step did: its fall was no larger than its noise.
    Where the noise is unmeasured (fewer than two validations), the floor alone decides.
    """
    spread = 0.0 if noise is None else noise
    if before <= floor:
        return f"its Dice before the step was not above the floor {floor}"
    if before - spread <= floor:
        return f"its Dice before the step was within its noise {spread:.3f} of the floor {floor}"
    if before - after <= spread:
        return f"its fall was within its noise {spread:.3f}"
    return ""


def judge_classes(before: Sequence[float], after: Sequence[float], share: float,
                  names: Sequence[str] | None = None, floor: float = 0.0,
                  noise: Sequence[float | None] | None = None) -> tuple[list[ClassDrop], list[ClassDrop]]:
    """(collapsed, unguarded): the classes that fell below `share` × their Dice before a step, split into those
    the network had learned (a collapse: undo the step) and those it had not (reported only).

    A class present before (Dice > 0, not NaN) and measured after (not NaN) fell when after < share × before. It
    collapsed when, in addition, its Dice before was above `floor` by more than its `noise`, and the fall exceeds
    that noise (see :func:`why_unguarded`). `share` 0 turns the guard off; `floor` 0 with no noise judges every class
    present, learned or not (the rule benchmarks/class_guard.py compares with this one).
    """
    share = check_class_guard(share, "class guard")
    if len(before) != len(after):
        raise CompressError(f"per-class Dice lists differ in length ({len(before)} before, {len(after)} after the "
                            f"step); both must list the same classes")
    names = list(names) if names is not None else [f"class {i + 1}" for i in range(len(before))]
    noise = list(noise) if noise is not None else [None] * len(before)
    collapsed, unguarded = [], []
    if share == 0:
        return collapsed, unguarded
    for i, (b, a) in enumerate(zip(before, after)):
        if not present(b) or a is None or math.isnan(float(a)) or not float(a) < share * float(b):
            continue
        reason = why_unguarded(float(b), float(a), floor, noise[i])
        drop = ClassDrop(i, names[i], float(b), float(a), floor, noise[i], reason)
        (unguarded if reason else collapsed).append(drop)
    return collapsed, unguarded


def present(dice: float) -> bool:
    """A class counts as present when its Dice is a positive number: 0 or NaN means it was not found at all, and
    nothing can be lost from a class that was not there."""
    return dice is not None and math.isfinite(float(dice)) and float(dice) > 0


def collapsed_classes(before: Sequence[float], after: Sequence[float], share: float,
                      names: Sequence[str] | None = None) -> list[ClassDrop]:
    """The classes present before a step (Dice > 0, not NaN) whose Dice after it is below `share` × before.

    An after-value of NaN (the class neither predicted nor in the labels of the batches measured) says nothing
    about the class and does not count as a collapse. `share` 0 turns the guard off (never a collapse). No floor
    and no noise: one-shot pruning judges agreement with the parent, 1.0 for every class it predicts.
    """
    return judge_classes(before, after, share, names)[0]


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

    A trainer calls :meth:`observe` with every validation's per-class Dice once any pending step has been judged
    (the recent values give each class its noise), :meth:`begin_step` right after removing channels (with the
    per-class Dice measured before, the `keep` request and a snapshot of everything it would need to undo the
    step), and :meth:`finish_step` with the per-class Dice at the validation that precedes the next step. If a
    learned class collapsed (:func:`judge_classes`), finish_step returns the snapshot to restore, protects the
    removed channels (as indices of the restored network) and records the rollback; otherwise it returns None.
    :meth:`release` ends protections that have served their time or whose class recovered. :meth:`state` /
    :meth:`load_state` carry all of it through checkpoints, including a pending step, so that ``--c`` resumes
    with the same protected set, rollback list and noise history.
    """

    def __init__(self, share: float, names: Sequence[str] | None = None, floor: float = DEFAULT_GUARD_FLOOR,
                 noise_epochs: int = DEFAULT_NOISE_EPOCHS, release_epochs: int = 0):
        self.share = check_class_guard(share)
        self.floor = check_guard_floor(floor)
        self.noise_epochs = check_noise_epochs(noise_epochs)
        self.release_epochs = check_release_epochs(release_epochs)
        self.names = list(names) if names is not None else None
        self.protected = ProtectedChannels()  # every channel protected now, whatever protects it
        self.protections: list[dict] = []  # per rollback still in force: its index and the channels it protects
        self.rollbacks: list[dict] = []
        self.unguarded: list[dict] = []  # judged steps after which a class fell without being guarded
        self.last_unguarded: list[ClassDrop] = []  # ... of the last judgement, for the trainer's log
        self.history: list[list] = []  # [epoch, per-class Dice] of recent validations of networks that were kept
        self.discard_through = -1  # validations up to this epoch measured a network that was undone
        self.pending: dict | None = None
        self.baseline: list[float] | None = None  # Dice of the network restored by the last rollback

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def rule(self) -> dict:
        """The settings a step is judged by, as the report records them."""
        return {"share": self.share, "floor": self.floor, "noise_epochs": self.noise_epochs,
                "noise_stds": NOISE_STDS, "release_epochs": self.release_epochs}

    # ---- the noise: recent validations of the network as it was kept ------------------------------------------
    def observe(self, epoch: int, dice: Sequence[float] | None) -> None:
        """Record a validation's per-class Dice (call it after the judgement of a step due at that validation:
        the Dice of a network that was then undone is not the noise of the one restored)."""
        if dice is None or epoch <= self.discard_through or self.noise_epochs == 0:
            return
        self.history = [h for h in self.history if h[0] != int(epoch)] + [[int(epoch), [float(v) for v in dice]]]
        self.history = self.history[-self.noise_epochs:]

    def noise(self, num_classes: int) -> list[float | None]:
        """Each class's noise now (:func:`class_noise` of its recorded validations; None where fewer than two)."""
        return [class_noise([values[i] for _, values in self.history if i < len(values)], self.noise_epochs)
                for i in range(num_classes)]

    # ---- a step: begin, judge -------------------------------------------------------------------------------
    def begin_step(self, epoch: int, before: Sequence[float] | None, sizes: Mapping[str, int],
                   keep: Mapping[str, Sequence[int]], snapshot: dict, record: dict | None = None) -> None:
        """Note a step that just removed channels (`sizes`: group sizes before it) and re-index the protected set."""
        protected_before = self.protected.state()
        protections_before = [dict(p, channels=dict(p["channels"])) for p in self.protections]
        self.protected.after_pruning(keep)
        for p in self.protections:
            channels = ProtectedChannels(p["channels"])
            channels.after_pruning(keep)
            p["channels"] = channels.state()
        self.baseline = None
        if not self.enabled or before is None:
            return  # off, or nothing measured before the step to judge it by
        self.pending = {"epoch": int(epoch), "before": [float(v) for v in before],
                        "noise": self.noise(len(before)), "removed": removed_channels(sizes, keep),
                        "protected_before": protected_before, "protections_before": protections_before,
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
        self.last_unguarded = []
        if pending is None or after is None:
            return None
        drops, unguarded = judge_classes(pending["before"], list(after), self.share, self.names, self.floor,
                                         pending.get("noise"))
        if unguarded:
            self.last_unguarded = unguarded
            self.unguarded.append({"step_epoch": pending["epoch"], "checked_epoch": int(epoch),
                                   "classes": [d.to_dict() for d in unguarded]})
        if not drops:
            return None
        self.undo(pending, drops, epoch)
        return pending["snapshot"]

    def undo(self, pending: dict, drops: Sequence[ClassDrop], epoch: int) -> None:
        """Bookkeeping of an undone step: the protected set as before it plus the channels it removed, the noise
        history without the undone network's validations, and the rollback's record."""
        self.protected = ProtectedChannels(pending["protected_before"])
        self.protected.add(pending["removed"])
        self.protections = pending.get("protections_before", [])
        self.protections.append({"rollback": len(self.rollbacks), "channels": pending["removed"]})
        self.history = [h for h in self.history if h[0] < pending["epoch"]]
        self.discard_through = int(epoch)
        self.baseline = pending["before"]
        self.rollbacks.append({"step_epoch": pending["epoch"], "checked_epoch": int(epoch),
                               "classes": [d.to_dict() for d in drops], "protected": pending["removed"],
                               "rule": self.rule(), "released": None, "step": pending["record"]})

    # ---- protection that ends --------------------------------------------------------------------------------
    def release(self, epoch: int, dice: Sequence[float] | None) -> list[dict]:
        """End the protections whose time is up (`release_epochs` after their undo; 0: never by time) or whose
        classes all recovered: rose above their Dice before the undone step by more than their noise then. Returns
        the rollbacks released now. Nothing is released while a step is pending: undoing it restores the protected
        set of before it."""
        if self.pending is not None:
            return []
        released = []
        for p in list(self.protections):
            rollback = self.rollbacks[p["rollback"]]
            reason = self.release_reason(rollback, epoch, dice)
            if reason:
                self.protections.remove(p)
                rollback["released"] = {"epoch": int(epoch), "reason": reason,
                                        "filters": sum(len(v) for v in p["channels"].values())}
                self.unprotect(p["channels"])
                released.append(rollback)
        return released

    def release_reason(self, rollback: Mapping, epoch: int, dice: Sequence[float] | None) -> str:
        """Why a rollback's protection ends at the validation of `epoch`, or "" while it stands."""
        if self.release_epochs and epoch - rollback["checked_epoch"] >= self.release_epochs:
            return f"{epoch - rollback['checked_epoch']} epochs after the undo (--class-guard-release)"
        if dice is None or epoch <= rollback["checked_epoch"] or not rollback["classes"]:
            return ""
        recovered = []
        for c in rollback["classes"]:
            now = float(dice[c["index"]]) if c["index"] < len(dice) else float("nan")
            if c.get("noise") is None or not now > c["before"] + c["noise"]:
                return ""
            recovered.append(f"{c['name']} {now:.3f} > {c['before']:.3f} + noise {c['noise']:.3f}")
        return "recovered: " + ", ".join(recovered)

    def unprotect(self, channels: Mapping[str, Sequence[int]]) -> None:
        """Drop `channels` from the protected set, except those another protection still holds."""
        held = ProtectedChannels()
        for p in self.protections:
            held.add(p["channels"])
        for name, indices in channels.items():
            group = self.protected.by_group.get(name, set())
            group -= set(indices) - held.by_group.get(name, set())
            if not group:
                self.protected.by_group.pop(name, None)

    # ---- the log ---------------------------------------------------------------------------------------------
    def describe_last_rollback(self) -> str:
        r = self.rollbacks[-1]
        classes = ", ".join(f"{c['name']} Dice {c['before']:.3f} -> {c['after']:.3f} (noise "
                            f"{describe_noise(c.get('noise'))})" for c in r["classes"])
        protected = {name: idx for name, idx in r["protected"].items()}
        epoch = r["step"].get("epoch", r["step_epoch"])
        release = (f"after {self.release_epochs} epochs or " if self.release_epochs else "")
        return (f"undid the pruning step of epoch {epoch}: {classes} (below {self.share} of its value before the "
                f"step, above the floor {self.floor} by more than its noise); restored the network and optimizer "
                f"from before the step and protected the {sum(len(v) for v in protected.values())} filters it removed until "
                f"{release}the class recovers: {protected}")

    def describe_unguarded(self) -> str:
        """The classes of the last judgement that fell below their share without being guarded, and why not."""
        return "; ".join(f"{d.name} Dice {d.before:.3f} -> {d.after:.3f} fell below {self.share} of its value but "
                         f"is not guarded: {d.unguarded}" for d in self.last_unguarded)

    @staticmethod
    def describe_release(rollback: Mapping) -> str:
        r = rollback["released"]
        return (f"released the {r['filters']} filters protected by the undo at epoch {rollback['checked_epoch']} "
                f"({r['reason']})")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"share": self.share, "protected": self.protected.state(), "rollbacks": self.rollbacks,
                "pending": self.pending, "baseline": self.baseline, "protections": self.protections,
                "unguarded": self.unguarded, "history": self.history, "discard_through": self.discard_through}

    def load_state(self, state: Mapping | None) -> None:
        """Resume from :meth:`state`; a checkpoint from before protections could end keeps its set for good."""
        state = state or {}
        self.protected = ProtectedChannels(state.get("protected", {}))
        self.rollbacks = list(state.get("rollbacks", []))
        self.pending = state.get("pending")
        self.baseline = state.get("baseline")
        self.protections = list(state.get("protections", []))
        self.unguarded = list(state.get("unguarded", []))
        self.history = list(state.get("history", []))
        self.discard_through = int(state.get("discard_through", -1))


def describe_noise(noise: float | None) -> str:
    return "unmeasured" if noise is None else f"{noise:.3f}"
