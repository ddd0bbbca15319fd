"""The end of a pruning schedule: epochs in which nothing is removed, so the network recovers before it is saved.

Why: without such epochs, pruning inside a short fine-tuning schedule goes on until the target is met or the
schedule ends, and a step taken one epoch before the end leaves no time to recover from it. On the tiny demo, a
Taylor step at epoch 7 of 8 leaves two classes at 0.77 and 0.69 pseudo Dice in the saved model, and a Sauron run
that removes filters until its last epoch loses 0.106 mean Dice against its base where runs that stop sooner lose
0.02-0.05; the spread over seeds comes mostly from how late and how far the last removals go. So the last
``recovery`` epochs of the schedule train the network as it is: ``--recovery-epochs`` (default: a quarter of the schedule, rounded up).

Taylor pruning must still reach its target in the epochs that remain for pruning. When steps of the user's
``--step`` would not get there in time, :func:`catch_up_step` makes the remaining steps larger, so that they all
grow by the same factor instead of one large step at the deadline. The per-layer cap (``--max-layer-step``) and the
floors still bound every step; if they stop it, the target is reported as not reached.
"""

from __future__ import annotations

import math

from nnunet_compress.errors import CompressError

DEFAULT_RECOVERY_SHARE = 0.25  # share of the schedule's epochs with no pruning step when --recovery-epochs is not given
MAX_CATCH_UP_STEP = 0.5  # no catch-up step removes more than half of the prunable channels


def check_recovery_epochs(value) -> int | None:
    """``None`` (the default share) or a non-negative integer; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CompressError(f"--recovery-epochs {value!r} must be a whole number >= 0 (0: prune until the last epoch; "
                            f"leave it out for a quarter of the schedule)")
    return value


def recovery_epochs(requested: int | None, num_epochs: int) -> int:
    """How many epochs at the end of a `num_epochs` schedule take no pruning step.

    `requested` None: a quarter of the schedule, rounded up. Never all of it: the first epoch may always prune.
    """
    wanted = math.ceil(DEFAULT_RECOVERY_SHARE * num_epochs) if requested is None else requested
    return max(0, min(wanted, num_epochs - 1))


def may_prune(epoch: int, num_epochs: int, recovery: int) -> bool:
    """Whether a pruning step may change the network that trains in `epoch` (0-based)."""
    return epoch < num_epochs - recovery


def pruning_epochs_left(epoch: int, num_epochs: int, recovery: int, every: int) -> int:
    """The pruning steps still possible from `epoch` on (this one included) with a step every `every` epochs."""
    return sum(1 for e in range(epoch, num_epochs - recovery) if e % every == 0)


def catch_up_step(step: float, fraction: float, target: float, steps_left: int,
                  last_step: tuple[float, float] | None = None) -> float:
    """The share of prunable channels the next step removes: `step`, or more if `steps_left` steps of `step` would
    leave the cost `fraction` above `target`.

    The remaining steps share the way to the target equally: each must keep ``(target / fraction) ** (1 /
    steps_left)`` of the cost. How much of the cost a share of channels carries is read from `last_step` — (share
    removed, cost after / cost before) of the previous step — assuming the log of the cost falls in proportion to
    the share removed. Without it, from the shapes: a conv's cost scales with its input times its output channels,
    so removing a share ``s`` everywhere keeps about ``(1 - s)²``. Taylor's global ranking takes cheap channels of
    the deep, coarse layers first, so the measured rate is the better guide once there is one; either way the
    trainer re-plans after every step, so an estimate's error does not pile up.
    """
    if steps_left <= 0 or fraction <= target:
        return step
    keep_per_step = (target / fraction) ** (1.0 / steps_left)
    if last_step is not None and last_step[0] > 0 and 0 < last_step[1] < 1:
        rate = math.log(last_step[1]) / last_step[0]  # log of the cost kept per unit share removed (< 0)
        needed = math.log(keep_per_step) / rate
    else:
        needed = 1.0 - math.sqrt(keep_per_step)
    return min(max(step, needed), max(step, MAX_CATCH_UP_STEP))
