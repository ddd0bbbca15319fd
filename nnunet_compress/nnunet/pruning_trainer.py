"""What every in-training pruning trainer needs from nnU-Net's trainer, written once.

Removing channels mid-training replaces parameters, so the optimizer (and any torch.compile / DDP wrapper) must
be rebuilt around the new ones; the checkpoint must carry the pruned shape and the method's state so that
``nnUNetv2_train ... --c`` resumes exactly; and the model folder's plans.json must end up describing the pruned
network so that ``nnUNetv2_predict`` rebuilds it. The methods (Taylor, Sauron) only decide *which* channels go.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from nnunet_compress.costs import count_parameters, patch_flops
from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet, unwrap
from nnunet_compress.nnunet.model_folder import atomic_write_file, read_json, write_json
from nnunet_compress.nnunet.plans import SECTION
from nnunet_compress.nnunet.training import CheckpointExtrasMixin, compression_section
from nnunet_compress.pruning.class_guard import (
    StepGuard,
    dice_from_counts,
    foreground_class_names,
    network_snapshot,
    restore_network,
)
from nnunet_compress.pruning.dependency import prunable_groups
from nnunet_compress.pruning.surgery import channel_counts, prune_channels, set_channel_counts

CHECKPOINT_KEY = "nnunet_compress"


def sliced_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, keep: dict) -> dict[str, dict]:
    """Per-parameter optimizer state (e.g. SGD momentum) sliced to the kept channels, by parameter name.

    The state tensors have the parameters' shapes, so a shadow copy of the network whose parameters hold the
    state is pruned by the very same surgery; that keeps the slicing rule in one place.
    """
    names = {id(p): n for n, p in net.named_parameters()}
    by_name = {names[id(p)]: s for p, s in optimizer.state.items() if id(p) in names}
    keys = sorted({k for s in by_name.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    result: dict[str, dict] = {n: {k: v for k, v in s.items() if not (torch.is_tensor(v) and v.dim() > 0)}
                               for n, s in by_name.items()}
    for key in keys:
        shadow = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in shadow.named_parameters():
                if n in by_name and key in by_name[n]:
                    p.data = by_name[n][key].detach().clone()
                else:
                    p.data = torch.full_like(p.data, float("nan"))
        prune_channels(shadow, keep)
        for n, p in shadow.named_parameters():
            if n in by_name and key in by_name[n]:
                result[n][key] = p.data
    return result


def _process_group_rank() -> int | None:
    """This process's rank in an initialised process group of more than one process, else None."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank()


def agree_across_ranks(obj):
    """Rank 0's `obj` on every rank of an initialised process group (else `obj` itself).

    Under DDP each rank scores channels on its own batches, so left alone the ranks would remove different
    channels and their parameters would stop matching; rank 0 decides and the others follow.
    """
    rank = _process_group_rank()
    if rank is None:
        return obj
    import torch.distributed as dist
    holder = [obj if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def measured_on_rank_zero(measure):
    """`measure()` run on rank 0 alone and its result given to every rank of an initialised process group (without
    one: just `measure()`).

    For measurements a decision rests on (a latency fraction: is the target met, how large is the next step): each
    rank's own timing differs with its CPU's load, so ranks deciding from their own would prune differently. The
    other ranks wait rather than time too, so they do not load the CPU that rank 0 is timing.
    """
    rank = _process_group_rank()
    if rank is None:
        return measure()
    return agree_across_ranks(measure() if rank == 0 else None)


def _cpu_copy(obj):
    """`obj` (nested dicts/lists of tensors, e.g. an optimizer state_dict) with every tensor cloned to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class PruningTrainerMixin(CheckpointExtrasMixin):
    """Mixed into an nnUNetTrainer subclass; the subclass decides what to prune and calls apply_pruning."""

    method: str = ""

    # ---- setup -------------------------------------------------------------------------------------------
    def pruning_section(self) -> dict:
        return compression_section(self.configuration_manager, required_method=self.method)

    @property
    def plain_network(self) -> CompressedUNet:
        net = unwrap(self.network)
        if not isinstance(net, CompressedUNet):
            raise CompressError(f"{type(self).__name__} needs plans made by `nnunet-compress plan {self.method}` "
                                f"(network class CompressedUNet), got {type(net).__name__}")
        if net.tucker_ranks:
            raise CompressError("pruning a Tucker-factorised network is not supported; prune first, then factorise")
        return net

    def prunable_groups(self):
        return prunable_groups(self.plain_network)

    def current_cost(self) -> tuple[int, int]:
        net = self.plain_network
        return count_parameters(net), patch_flops(net, self.num_input_channels, self.configuration_manager.patch_size)

    # ---- the one operation: remove channels ----------------------------------------------------------------
    def apply_pruning(self, keep: dict[str, list[int]], carry_optimizer_state: bool = True) -> None:
        """Physically remove channels, then rebuild optimizer, LR scheduler and wrappers around the new weights."""
        keep = agree_across_ranks(keep) if self.is_ddp else keep
        if not keep:
            return
        net = self.plain_network
        state = sliced_optimizer_state(net, self.optimizer, keep) if carry_optimizer_state else {}
        prune_channels(net, keep)
        self.rebuild_after_pruning(net, state)

    def rebuild_after_pruning(self, net: CompressedUNet, state: dict[str, dict] | None = None) -> None:
        net.to(self.device)
        self.network = net
        if self._do_i_compile():
            # the old graphs are for the old shapes; without a reset every pruning step would use up one of
            # dynamo's limited recompilations and it would eventually fall back to eager mode
            torch._dynamo.reset()
            self.network = torch.compile(self.network)
        if self.is_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            self.network = DDP(self.network, device_ids=device_ids)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if state:
            params = dict(net.named_parameters())
            for name, s in state.items():
                if name in params:
                    self.optimizer.state[params[name]] = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                                                          for k, v in s.items()}

    # ---- undoing a step (the class guard) ----------------------------------------------------------------
    def snapshot_for_rollback(self) -> dict:
        """Shape, weights and optimizer state of the network now (CPU copies): what undoing a step restores."""
        return {**network_snapshot(self.plain_network), "optimizer": _cpu_copy(self.optimizer.state_dict())}

    def restore_from_snapshot(self, snapshot: dict) -> None:
        """Give the network back the shape and weights of `snapshot` and the optimizer its state then."""
        net = self.plain_network
        restore_network(net, snapshot)
        self.rebuild_after_pruning(net)
        self.optimizer.load_state_dict(snapshot["optimizer"])

    def make_class_guard(self, settings) -> StepGuard:
        """The class guard with the plans' rule (Taylor's and Sauron's settings name its options alike)."""
        return StepGuard(settings.class_guard, self.class_names(), settings.class_guard_floor,
                         settings.class_guard_noise_epochs, settings.class_guard_release)

    def class_guard_after_validation(self, epoch: int) -> None:
        """After `epoch`'s validation and the judgement of any step due at it: record its per-class Dice (the
        noise of each class comes from these) and release the protections that are over, saying so in the log.
        Every rank decides alike: nnU-Net logs the pseudo Dice of all ranks' validation batches together."""
        dice = self.logged_class_dice(epoch)
        self.class_guard.observe(epoch, dice)
        for rollback in self.class_guard.release(epoch, dice):
            self.print_to_log_file(f"[{self.method}] class guard: {StepGuard.describe_release(rollback)}")

    def log_unguarded_classes(self) -> None:
        """Say which classes fell at the last judgement without being guarded (not learned, or within noise)."""
        if self.class_guard.last_unguarded:
            self.print_to_log_file(f"[{self.method}] class guard: {self.class_guard.describe_unguarded()}")

    def class_names(self) -> list[str]:
        """Names of the classes (regions) in the order of nnU-Net's logged per-class pseudo Dice."""
        return foreground_class_names(self.dataset_json.get("labels", {}))

    def validation_class_dice(self) -> list[float]:
        """Per-class pseudo Dice of the network now, on fresh validation batches, computed as nnU-Net's
        on_validation_epoch_end does but logged nowhere (for a pruning step before any validation has run)."""
        import numpy as np

        self.on_validation_epoch_start()
        with torch.no_grad():
            outputs = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
        self.network.train()
        counts = [np.sum([o[k] for o in outputs], 0) for k in ("tp_hard", "fp_hard", "fn_hard")]
        if self.is_ddp:
            import torch.distributed as dist
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, counts)
            counts = [np.sum([g[i] for g in gathered], 0) for i in range(3)]
        return dice_from_counts(*counts)

    def logged_class_dice(self, epoch: int) -> list[float] | None:
        """nnU-Net's logged per-class pseudo Dice of `epoch`'s validation, None if that epoch has none."""
        values = self.logger.get_value("dice_per_class_or_region", step=None)
        if epoch < 0 or len(values) <= epoch:
            return None
        return [float(v) for v in values[epoch]]

    # ---- logging ------------------------------------------------------------------------------------------
    def log_pruning_status(self, removed: int = 0) -> None:
        params, flops = self.current_cost()
        counts = channel_counts(self.plain_network)
        self.print_to_log_file(f"[{self.method}] removed {removed} channels; now {params:,} params, "
                               f"{flops / 1e9:.3f} GFLOPs/patch ({params / self.initial_cost[0]:.3f} / "
                               f"{flops / self.initial_cost[1]:.3f} of the start)")
        self.print_to_log_file(f"[{self.method}] channels per layer: {list(counts.values())}")

    def on_train_start(self):
        super().on_train_start()
        self.initial_cost = getattr(self, "initial_cost", None) or self.current_cost()
        self._epoch_wall_start = time.time()

    def on_epoch_start(self):
        self._epoch_wall_start = time.time()
        super().on_epoch_start()

    # ---- checkpoints: shape + method state --------------------------------------------------------------
    def pruning_state(self) -> dict:
        """Method state to save (subclasses extend)."""
        return {"initial_cost": list(self.initial_cost) if getattr(self, "initial_cost", None) else None}

    def load_pruning_state(self, state: dict) -> None:
        cost = state.get("initial_cost")
        self.initial_cost = tuple(cost) if cost else None

    def checkpoint_extras(self) -> dict:
        return {**super().checkpoint_extras(),
                CHECKPOINT_KEY: {"method": self.method, "channels": channel_counts(self.plain_network),
                                 "state": self.pruning_state()}}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        extra = checkpoint.get(CHECKPOINT_KEY)
        if extra is not None:
            net = self.plain_network
            set_channel_counts(net, extra["channels"])
            self.rebuild_after_pruning(net)
            self.load_pruning_state(extra.get("state", {}))
        if isinstance(filename_or_checkpoint, dict):
            # nnU-Net 2.8's load_checkpoint only works when given a file name (its dict branch never binds the
            # checkpoint), so hand it one
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "checkpoint.pth")
                torch.save(checkpoint, path)
                super().load_checkpoint(path)
        else:
            super().load_checkpoint(str(filename_or_checkpoint))

    # ---- the model folder describes the pruned network --------------------------------------------------
    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            self.write_pruned_plans()
            self.write_pruning_report()

    def pruning_report(self) -> dict | None:
        """What the fold's pruning_report.json says (subclasses extend; None writes none)."""
        return None

    def write_pruning_report(self) -> None:
        """fold_X/pruning_report.json: the steps kept, the steps the class guard undid (and when their protection
        ended), the final channels, and the cost at the start and at the end (parameters, FLOPs per patch)."""
        report = self.pruning_report()
        if report is None:
            return
        params, flops = self.current_cost()
        start = getattr(self, "initial_cost", None) or (None, None)
        report = {"method": self.method, "fold": self.fold, **report,
                  "final_channels": channel_counts(self.plain_network),
                  "start_cost": {"params": start[0], "flops": start[1]}, "final_cost": {"params": params, "flops": flops}}
        atomic_write_file(Path(self.output_folder) / "pruning_report.json", lambda tmp: write_json(tmp, report))

    def write_pruned_plans(self) -> None:
        """Record this fold's final channel counts in the model folder's plans.json (atomically)."""
        path = Path(self.output_folder_base) / "plans.json"
        if not path.is_file():
            return
        plans = read_json(path)
        cfg = plans["configurations"][self.configuration_name]
        cfg["architecture"]["arch_kwargs"]["channels"] = channel_counts(self.plain_network)
        cfg.setdefault(SECTION, {})["channels_from_fold"] = self.fold
        atomic_write_file(path, lambda tmp: write_json(tmp, plans))
