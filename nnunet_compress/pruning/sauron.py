"""The maths of Sauron (Valverde, Shatillo & Tohka 2022, "Sauron U-Net: Simple automated redundancy elimination
in medical image segmentation via filter pruning"; reference code ``jmlipman/SauronUNet``).

Sauron prunes *during* training. Every prunable block's output feature maps are compared with each other:

* **δ_opt** (:func:`delta_opt`, differentiable): the RMS distance of every min-max normalised, average-pooled
  channel to channel 0. Adding λ·mean(δ_opt) to the loss (:func:`sauron_regulariser`) pulls the maps of a layer
  together, so that redundant channels become (nearly) copies of each other and can be removed without harm.
* **δ_prune** (:func:`delta_prune`, no gradient): the RMS distance of every average-pooled channel to a random
  reference channel (:func:`choose_reference`), divided per sample by the largest distance in the layer and
  averaged over the batch. Channels whose δ_prune is below the layer's threshold τ are removed
  (:func:`channels_to_keep`); the reference channel itself (distance 0) is always kept.
* **τ** (:class:`ThresholdState`) starts small and, whenever training has plateaued and the layer barely pruned
  anything last time, moves one of κ equal steps towards τ_max; after each move the layer waits ρ epochs.

This module is pure: no trainer, no network surgery. What a trainer does at the end of each epoch::

    converged = state.record_train_loss(mean_training_loss_of_the_epoch)     # includes the λ term
    for name, dprune, ref, n in layers:                                      # δ_prune measured this epoch
        tau = state.step(name, state.last_removed_fraction(name), converged)  # before pruning, as the reference
        keep = channels_to_keep(dprune, tau, ref)
        ...remove the other channels (and the matching input channels of the next layers)...
        state.record_pruning(name, channels_before=n, channels_after=len(keep))

Where this module deliberately differs from the reference code, the docstring of the function says so.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunet_compress.errors import CompressError
from nnunet_compress.pruning.class_guard import (
    DEFAULT_GUARD_FLOOR,
    DEFAULT_NOISE_EPOCHS,
    check_class_guard,
    check_guard_floor,
    check_noise_epochs,
    check_release_epochs,
)
from nnunet_compress.pruning.recovery import check_recovery_epochs
from nnunet_compress.settings import Settings

STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SauronConfig(Settings):
    """Hyper-parameters of Sauron; the defaults are those of the paper and of the reference code.

    lambda_:   weight λ of the δ_opt regulariser in the loss.
    tau_start: initial pruning threshold τ of every layer.
    tau_max:   the largest threshold; τ never exceeds it.
    kappa:     κ, the number of equal steps in which τ goes from tau_start to tau_max.
    rho:       ρ, the patience: the window of epochs of the plateau test, and the epochs a layer waits after a
               threshold increase before it may increase again.
    mu:        μ, a layer's τ only increases if it removed fewer than this fraction of its channels last time.
    pool:      average-pooling factor applied to the feature maps before distances are measured (cheaper, and
               less sensitive to pixel-level noise).

    Not from the paper:
    class_guard: an epoch's removal after which a class keeps less than this share of its validation pseudo Dice
               (measured at the next epoch's validation) is undone and its filters protected (0 turns it off);
               see nnunet_compress.pruning.class_guard.
    class_guard_floor: the guard judges a class only when its pseudo Dice before the removal is above this (and
               above its noise): from scratch, the first epochs' Dice of a class is noise, not a class to protect.
    class_guard_noise_epochs: the validations whose spread is a class's noise (0: no noise estimate).
    class_guard_release: filters protected after an undo are released this many epochs later (0: only when the
               class recovers); training from scratch changes what each filter does, so their verdict expires.
    seed:      seed of the reference-channel draws (plus the fold number); 12345 is what runs used before.
    recovery_epochs: the last epochs of the schedule remove nothing and do not move τ, so the saved network has
               recovered from the last removal (None: a quarter of the schedule, rounded up; 0: the network may
               change until the last epoch); see nnunet_compress.pruning.recovery.
    """

    label = "Sauron"

    lambda_: float = 0.5
    tau_start: float = 0.001
    tau_max: float = 0.3
    kappa: int = 15
    rho: int = 5
    mu: float = 0.02
    pool: int = 2
    class_guard: float = 0.5
    class_guard_floor: float = DEFAULT_GUARD_FLOOR
    class_guard_noise_epochs: int = DEFAULT_NOISE_EPOCHS
    class_guard_release: int = 5
    seed: int = 12345
    recovery_epochs: int | None = None

    def validate(self) -> "SauronConfig":
        """Raise :class:`CompressError` naming the first invalid field and its valid range; return self."""
        for name in ("lambda_", "tau_start", "tau_max", "mu"):
            _require_real(name, getattr(self, name))
        for name in ("kappa", "rho", "pool"):
            _require_positive_int(name, getattr(self, name))
        if not self.lambda_ >= 0:
            raise CompressError(f"Sauron lambda_ must be >= 0 (got {self.lambda_}); set e.g. lambda_=0.5")
        if not 0 < self.tau_max <= 1:
            raise CompressError(f"Sauron tau_max must lie in (0, 1] (got {self.tau_max}); δ_prune is normalised "
                                f"to [0, 1], so set e.g. tau_max=0.3")
        if not 0 <= self.tau_start <= self.tau_max:
            raise CompressError(f"Sauron tau_start must lie in [0, tau_max={self.tau_max}] (got {self.tau_start});"
                                f" set e.g. tau_start=0.001")
        if not 0 <= self.mu < 1:
            raise CompressError(f"Sauron mu must lie in [0, 1) (got {self.mu}); it is a fraction of channels, "
                                f"set e.g. mu=0.02")
        self.class_guard = check_class_guard(self.class_guard)
        self.class_guard_floor = check_guard_floor(self.class_guard_floor)
        self.class_guard_noise_epochs = check_noise_epochs(self.class_guard_noise_epochs)
        self.class_guard_release = check_release_epochs(self.class_guard_release)
        self.recovery_epochs = check_recovery_epochs(self.recovery_epochs)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise CompressError(f"--seed {self.seed!r} must be a non-negative integer, e.g. --seed 0")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SauronConfig":
        """As every settings class (unknown keys refused), with JSON's integers read as the floats they stand for."""
        config = super().from_dict(d)
        for name in ("lambda_", "tau_start", "tau_max", "mu"):
            setattr(config, name, float(getattr(config, name)))  # JSON may give 1 for 1.0
        return config


def _require_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CompressError(f"Sauron {name} must be a finite number, got {value!r}")


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CompressError(f"Sauron {name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Feature-map distances
# ----------------------------------------------------------------------------------------------------------------

def _check_fmap(fmap: Tensor) -> None:
    if not torch.is_tensor(fmap) or fmap.dim() not in (4, 5):
        shape = tuple(fmap.shape) if torch.is_tensor(fmap) else type(fmap).__name__
        raise ValueError(f"expected a feature map (B, C, H, W) or (B, C, D, H, W), got {shape}")
    if fmap.shape[1] < 1:
        raise ValueError(f"the feature map has no channels: {tuple(fmap.shape)}")


def _spatial_dims(fmap: Tensor) -> tuple[int, ...]:
    return tuple(range(2, fmap.dim()))


def pool_feature_map(fmap: Tensor, pool: int = 2) -> Tensor:
    """Average-pool the spatial dims by ``pool`` (kernel = stride = pool; an odd remainder is dropped).

    A spatial dim smaller than ``pool`` (the deepest stages of a U-Net, or a thin 2.5D patch) is pooled by its
    own size instead of failing, so every layer can use the same factor. ``pool=1`` returns ``fmap`` itself.
    """
    _check_fmap(fmap)
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    kernel = tuple(min(pool, size) for size in fmap.shape[2:])
    if all(k == 1 for k in kernel):
        return fmap
    pooling = F.avg_pool2d if fmap.dim() == 4 else F.avg_pool3d
    return pooling(fmap, kernel_size=kernel, stride=kernel)


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision activations (autocast) lose too much in squared differences; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pooled_wide(fmap: Tensor, pool: int) -> Tensor:
    """Pool, then widen to >= float32. On the GPU pooling runs in the activations' dtype so that autograd keeps
    no full-resolution float32 copy; on the CPU (no half-precision 3D pooling kernel) widen first."""
    if fmap.device.type == "cpu":
        return pool_feature_map(_at_least_float32(fmap), pool)
    return _at_least_float32(pool_feature_map(fmap, pool))


def _normalised_pooled(fmap: Tensor, pool: int) -> Tensor:
    """Min-max normalise every (sample, channel) map to [0, 1], then pool; >= float32, differentiable.

    The reference normalises the full-resolution map and pools afterwards (``Euclidean_norm``). Pooling is linear,
    so pool((x - min) / range) == (pool(x) - min) / range with min/max taken at full resolution: we pool first and
    normalise the small tensor. Same numbers, but autograd keeps only pooled-size tensors besides ``fmap`` itself
    (which the network keeps anyway; see :func:`_pooled_wide`). Note the order matters: min/max of the *pooled*
    map would differ.

    A constant map has range 0; it is divided by 1 instead, so it becomes all zeros rather than NaN.
    """
    dims = _spatial_dims(fmap)
    low = _at_least_float32(fmap.amin(dim=dims, keepdim=True))
    high = _at_least_float32(fmap.amax(dim=dims, keepdim=True))
    span = high - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (_pooled_wide(fmap, pool) - low) / span


def _rms(diff: Tensor) -> Tensor:
    """sqrt(mean over spatial dims of diff²), shape (B, C), with a zero (not NaN) gradient where it is 0.

    d sqrt(u)/du is infinite at u = 0, so two identical maps (e.g. two dead channels) would otherwise turn every
    gradient of the network into NaN. The double ``where`` keeps the value exact and the gradient finite.
    """
    mean_square = diff.pow(2).mean(dim=_spatial_dims(diff))
    positive = mean_square > 0
    safe = torch.where(positive, mean_square, torch.ones_like(mean_square))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(mean_square))


def delta_opt(fmap: Tensor, pool: int = 2) -> Tensor:
    """δ_opt, shape (C,): RMS distance of every normalised pooled channel to channel 0, averaged over the batch.

    Differentiable; this is what the regulariser minimises. Channel 0's distance is 0 by construction. Each map is
    min-max normalised per sample and channel, so δ_opt measures differences in *pattern*, not in scale or offset:
    the loss cannot shrink it by merely scaling activations down.

    Differs from the reference in 3D only: ``Euclidean_norm`` takes min/max and the mean over axes (2, 3), which
    for a 5-D tensor normalises and measures each slice of the last axis separately; here the whole volume is one
    map, as in the paper's definition and in the reference's 2D behaviour. Computed in float32 (float64 input stays float64).
    """
    _check_fmap(fmap)
    maps = _normalised_pooled(fmap, pool)
    return _rms(maps - maps[:, :1]).mean(dim=0)


@torch.no_grad()
def delta_prune(fmap: Tensor, ref: int, pool: int = 2) -> Tensor:
    """δ_prune, shape (C,), in [0, 1]: RMS distance of every pooled channel to channel ``ref``, divided per sample
    by the largest such distance in the layer, averaged over the batch. No gradient.

    As in the reference (``Euclidean_rand``), the maps are pooled but NOT min-max normalised here: δ_prune compares
    the raw maps, and the division by the per-sample maximum makes it invariant to a common scale/offset of the
    whole layer and comparable with one threshold across layers. If every channel equals the reference (maximum
    0) all distances are 0 (the reference adds 1e-15 to the divisor; same result). ``δ_prune[ref]`` is 0.
    """
    _check_fmap(fmap)
    _check_channel(ref, fmap.shape[1], "ref")
    maps = _pooled_wide(fmap, pool)
    distances = _rms(maps - maps[:, ref:ref + 1])
    largest = distances.amax(dim=1, keepdim=True)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    return (distances / largest).mean(dim=0)


def _check_channel(index: int, num_channels: int, what: str) -> None:
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < num_channels:
        raise ValueError(f"{what} must be a channel index in [0, {num_channels}), got {index!r}")


def sauron_regulariser(fmaps: Sequence[Tensor], lambda_: float, pool: int = 2) -> Tensor:
    """λ · (1/L) Σ_layers mean_{c ≥ 1} δ_opt_layer[c]: the term added to the training loss.

    The averaging follows the reference (``DS_CrossEntropyDiceLoss_Distance``): first the mean of δ_opt within
    each layer, over the batch and over channels 1..C-1 (the reference never computes channel 0's distance to
    itself, so the constant 0 is not averaged in), then the plain mean of those per-layer values over the L
    layers, so every layer weighs the same regardless of its width. Layers with a single channel have nothing to
    pull together and are left out of L. (The reference also counts its un-pruned segmentation heads as constant
    1s in L, which only rescales the gradient by L_pruned / L_all; we do not reproduce that artefact.)

    Returns a 0-dim tensor, float32 or wider (0 if no layer has two channels).
    """
    if not fmaps:
        raise ValueError("sauron_regulariser needs the feature maps of at least one layer")
    per_layer = [delta_opt(f, pool)[1:].mean() for f in fmaps if f.shape[1] > 1]
    if not per_layer:
        return torch.zeros((), dtype=torch.float32, device=fmaps[0].device)
    return lambda_ * torch.stack(per_layer).mean()


# ----------------------------------------------------------------------------------------------------------------
# Choosing channels
# ----------------------------------------------------------------------------------------------------------------

def choose_reference(num_channels: int, generator: torch.Generator) -> int:
    """A uniformly random reference channel for δ_prune, drawn from ``generator`` (a CPU generator) so that a
    seeded run prunes reproducibly. The reference draws a new one on every forward pass with the global RNG."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
    return int(torch.randint(0, int(num_channels), (1,), generator=generator).item())


def channels_to_keep(dprune: Tensor, tau: float, ref: int, min_channels: int = 1) -> list[int]:
    """Sorted indices of the channels that survive: δ_prune >= τ, plus always ``ref``.

    The reference channel has δ_prune = 0 only because it is the reference, so it is never removed (as in the
    reference). If fewer than ``min_channels`` survive (capped at C), the highest-δ_prune other channels are added
    (lower index first on ties), so a layer is never emptied. A non-finite δ_prune (NaN activations) keeps its
    channel: pruning must not act on a meaningless number.
    """
    if dprune.dim() != 1 or dprune.numel() < 1:
        raise ValueError(f"dprune must be a non-empty vector (C,), got shape {tuple(dprune.shape)}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    values = dprune.detach().float().cpu()
    num_channels = values.numel()
    _check_channel(ref, num_channels, "ref")
    keep = {i for i, v in enumerate(values.tolist()) if not math.isfinite(v) or v >= tau}
    keep.add(int(ref))
    if len(keep) < min(min_channels, num_channels):
        by_distance = sorted((i for i in range(num_channels) if i not in keep), key=lambda i: (-values[i].item(), i))
        keep.update(by_distance[:min(min_channels, num_channels) - len(keep)])
    return sorted(keep)


# ----------------------------------------------------------------------------------------------------------------
# Threshold schedule
# ----------------------------------------------------------------------------------------------------------------

def training_converged(train_losses: Sequence[float], rho: int) -> bool:
    """Has training plateaued? True iff there are at least ρ+1 epochs and the last epoch's training loss lies
    within [min, max] of the ρ epochs before it (neither a new low, still improving, nor a new high, unstable).

    This is the test of the reference's ``_end_epoch_prune`` (``convergence``). Its third test, "validation loss
    reached a new best", compares the last validation loss with a minimum that includes that same value and
    therefore never fires; it is omitted, so no validation loss is needed. Its fourth test (few channels removed
    last time) is per layer and lives in :meth:`ThresholdState.step`. The loss is the mean training loss of the
    epoch including the λ term, as in the reference. A window holding a NaN/inf loss never counts as converged.
    """
    if len(train_losses) < rho + 1:
        return False
    window = [float(x) for x in train_losses[-rho - 1:]]
    if not all(math.isfinite(x) for x in window):
        return False
    last, previous = window[-1], window[:-1]
    return min(previous) <= last <= max(previous)


class ThresholdState:
    """Per-layer thresholds τ and patience counters, plus the training-loss history the plateau test needs.

    Each layer keeps the number k of threshold steps taken (τ = tau_start + k·(tau_max - tau_start)/κ, so τ lands
    on exactly the grid ``linspace(tau_start, tau_max, κ+1)`` of the reference and reaches tau_max exactly), its
    patience counter, and the fraction of its channels removed at the last pruning. Integers, not accumulated
    floats, so a resumed run continues bit-for-bit. Layers are created on first use.
    """

    def __init__(self, config: SauronConfig | None = None):
        self.config = (config or SauronConfig()).validate()
        self.train_losses: list[float] = []
        self._steps: dict[str, int] = {}
        self._patience: dict[str, int] = {}
        self._removed: dict[str, float] = {}

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self._steps)

    def tau(self, layer: str) -> float:
        """The layer's current threshold (tau_start for a layer never stepped)."""
        return self._tau_at(self._steps.get(layer, 0))

    def patience(self, layer: str) -> int:
        return self._patience.get(layer, 0)

    def last_removed_fraction(self, layer: str) -> float:
        """Fraction of the layer's channels removed at its last :meth:`record_pruning` (0 before any)."""
        return self._removed.get(layer, 0.0)

    def _tau_at(self, steps: int) -> float:
        c = self.config
        if steps >= c.kappa:
            return float(c.tau_max)
        return c.tau_start + steps * ((c.tau_max - c.tau_start) / c.kappa)  # numpy.linspace's arithmetic

    # -- epoch-end updates -------------------------------------------------------------------------------------
    def record_train_loss(self, loss: float) -> bool:
        """Append this epoch's mean training loss and return whether training has converged (plateaued)."""
        self.train_losses.append(float(loss))
        return self.converged()

    def converged(self) -> bool:
        return training_converged(self.train_losses, self.config.rho)

    def step(self, layer: str, removed_fraction_last_time: float, converged: bool) -> float:
        """Advance the layer's schedule by one epoch and return the τ to prune with now.

        As the reference's ``_end_epoch_prune``: if the layer is still waiting (patience > 0) its patience is
        decremented and nothing else happens; otherwise, if training has converged AND the layer removed fewer
        than μ of its channels last time (the reference's ``removed < ceil(μ·n_before)``, the same for integer
        counts), τ moves one step of (tau_max - tau_start)/κ up (never past tau_max) and the layer waits ρ epochs.
        Call it once per layer per epoch, before choosing the channels to remove.
        """
        self._ensure(layer)
        if self._patience[layer] > 0:
            self._patience[layer] -= 1
        elif converged and removed_fraction_last_time < self.config.mu:
            self._patience[layer] = self.config.rho
            self._steps[layer] = min(self._steps[layer] + 1, self.config.kappa)
        return self.tau(layer)

    def record_pruning(self, layer: str, channels_before: int, channels_after: int) -> None:
        """Remember what fraction of the layer's channels this epoch's pruning removed (read by the next step)."""
        if not 0 < channels_after <= channels_before:
            raise ValueError(f"need 0 < channels_after <= channels_before, got {channels_after}, {channels_before}")
        self._ensure(layer)
        self._removed[layer] = (channels_before - channels_after) / channels_before

    def _ensure(self, layer: str) -> None:
        if layer not in self._steps:
            self._steps[layer] = 0
            self._patience[layer] = 0
            self._removed[layer] = 0.0

    # -- persistence -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able snapshot (ints, floats, strings, lists, dicts) for resuming exactly."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "train_losses": list(self.train_losses),
            "layers": {name: {"steps": self._steps[name], "patience": self._patience[name],
                              "last_removed_fraction": self._removed[name]} for name in self._steps},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Its config must equal this object's: resuming under another schedule
        would make the saved step counts mean different thresholds."""
        try:
            if state["version"] != STATE_VERSION:
                raise CompressError(f"Sauron threshold state has version {state['version']!r}, this code reads "
                                    f"version {STATE_VERSION}; resume with the nnunet-compress that wrote it")
            saved = SauronConfig.from_dict(state["config"])
            losses = [float(x) for x in state["train_losses"]]
            layers = {str(name): (int(v["steps"]), int(v["patience"]), float(v["last_removed_fraction"]))
                      for name, v in state["layers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CompressError(f"the saved Sauron threshold state is malformed ({e!r}); restore an intact "
                                f"checkpoint or restart the Sauron training") from e
        if saved != self.config:
            raise CompressError(f"the saved Sauron state was made with {saved.to_dict()}, but this run uses "
                                f"{self.config.to_dict()}; resume with the original Sauron settings")
        for name, (steps, patience, _) in layers.items():
            if not 0 <= steps <= saved.kappa or not 0 <= patience <= saved.rho:
                raise CompressError(f"the saved Sauron state of layer {name!r} is out of range (steps={steps}, "
                                    f"patience={patience}); restore an intact checkpoint")
        self.train_losses = losses
        self._steps = {name: v[0] for name, v in layers.items()}
        self._patience = {name: v[1] for name, v in layers.items()}
        self._removed = {name: v[2] for name, v in layers.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ThresholdState":
        """A new state with the saved config and values."""
        try:
            config = SauronConfig.from_dict(state["config"])
        except (KeyError, TypeError) as e:
            raise CompressError(f"the saved Sauron threshold state is malformed ({e!r}); restore an intact "
                                f"checkpoint or restart the Sauron training") from e
        restored = cls(config)
        restored.load_state_dict(state)
        return restored
