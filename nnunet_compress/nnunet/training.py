"""Thin glue between nnU-Net's trainer and our compression: schedule from plans, pretrained-weights loading.

Everything a compression run needs to know (method, ranks, targets, fine-tuning schedule) is recorded in the
plans configuration under the key ``nnunet_compress`` — the "compression section" — so that it travels with the
model folder and ``nnUNetv2_train`` needs no extra flags.
"""

from __future__ import annotations

from typing import Any

import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet, refuse_int8_weights, unwrap
from nnunet_compress.nnunet.model_folder import load_checkpoint, save_checkpoint
from nnunet_compress.nnunet.plans import SECTION

# nnU-Net's own defaults, used where the plans say nothing.
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr",
                 "weight_decay", "save_every", "augmentation", "seed")


def compression_section(configuration_manager, required_method: str | None = None) -> dict[str, Any]:
    """The plans configuration's compression section (empty dict when absent and not required)."""
    section = configuration_manager.configuration.get(SECTION)
    if required_method is None:
        return section or {}
    if not section:
        raise CompressError(f"these plans have no '{SECTION}' section; create plans for this trainer with "
                            f"`nnunet-compress plan {required_method} -d DATASET -c CONFIGURATION ...` and pass "
                            f"them with -p")
    if section.get("method") != required_method:
        raise CompressError(f"these plans were made for method {section.get('method')!r}, not "
                            f"{required_method!r}; use the matching trainer or make plans with "
                            f"`nnunet-compress plan {required_method}`")
    return section


class ScheduleFromPlansMixin:
    """Take epochs, iterations, learning rate etc. from the plans' compression section.

    nnU-Net fixes these in trainer code (1000 epochs of 250 iterations at lr 1e-2); fine-tuning a compressed
    model needs far fewer epochs at a lower rate, and the values belong with the model, not in a class name.
    """

    default_schedule: dict[str, Any] = {}
    augmentation: str = "nnunet"
    seed: int | None = None

    def apply_schedule_from_plans(self) -> None:
        section = compression_section(self.configuration_manager)
        schedule = {**self.default_schedule, **section.get("schedule", {})}
        for key, value in schedule.items():
            if key not in SCHEDULE_KEYS:
                raise CompressError(f"unknown schedule entry {key!r} in the plans' {SECTION} section "
                                    f"(known: {', '.join(SCHEDULE_KEYS)})")
            setattr(self, key, value)
        if self.augmentation not in ("nnunet", "none"):
            raise CompressError(f"schedule entry augmentation={self.augmentation!r} unknown; use 'nnunet' (default) "
                                f"or 'none'")
        if schedule:
            self.print_to_log_file(f"nnunet-compress schedule from plans: {schedule}")

    def initialize(self):
        """Seed Python, NumPy and torch before nnU-Net builds the network and its data loaders, if the plans ask.

        nnU-Net seeds nothing, so two runs of one plans file differ; a short CPU run (the tiny demo and test model)
        then sometimes misses its smallest class. With ``seed`` set, and data loading in the training process
        (``nnUNet_n_proc_DA=0``: nnU-Net's augmentation workers draw unseeded), the run repeats exactly on one
        machine.
        """
        if self.seed is not None and not self.was_initialized:
            seed_everything(int(self.seed))
        super().initialize()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.augmentation == "none":
            # no spatial transform crops the loader's enlarged patch back, so load the patch size itself
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, self.configuration_manager.patch_size, None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's augmentation, or with ``augmentation: none`` only the transforms training needs.

        'none' exists for the tiny CPU demo and tests, whose synthetic train and test cases come from one
        distribution and where nnU-Net's spatial augmentation would dominate the run time on two cores.
        """
        import inspect

        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        if self.augmentation == "nnunet":
            return nnUNetTrainer.get_training_transforms(*args, **kwargs)
        bound = inspect.signature(nnUNetTrainer.get_training_transforms).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return nnUNetTrainer.get_validation_transforms(a["deep_supervision_scales"], a["is_cascaded"],
                                                       a["foreground_labels"], a["regions"], a["ignore_label"])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CheckpointExtrasMixin:
    """Entries of ours in nnU-Net's checkpoint files, added in one re-write of the file per save.

    nnU-Net assembles and writes its checkpoint dict inside ``save_checkpoint`` with no hook, so state that a
    resumed run needs (pruned shapes, method state, the distillation teacher's path) is added to the written file.
    Every mixin contributes through :meth:`checkpoint_extras` (cooperatively, via ``super()``), so a trainer that
    prunes *and* distils still re-writes its checkpoint once.
    """

    def checkpoint_extras(self) -> dict:
        return {}

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        extras = self.checkpoint_extras()
        if not extras:
            return
        from pathlib import Path

        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        checkpoint.update(extras)
        save_checkpoint(checkpoint, Path(filename))


# Where -pretrained_weights came from, kept on the network it initialised: the default distillation teacher.
PARENT_CHECKPOINT_ATTR = "_nnunet_compress_parent_checkpoint"


def load_checkpoint_weights(fname: str) -> dict[str, torch.Tensor]:
    weights = load_checkpoint(fname)["network_weights"]
    refuse_int8_weights(weights)
    return weights


def load_pretrained_weights_into(network: torch.nn.Module, fname: str, verbose: bool = False) -> None:
    """Replacement for nnU-Net's loader used for our compressed networks (all layers, heads included)."""
    net = unwrap(network)
    assert isinstance(net, CompressedUNet)
    errors = net.load_parent_weights(load_checkpoint_weights(fname))
    from pathlib import Path
    setattr(net, PARENT_CHECKPOINT_ATTR, str(Path(fname).resolve()))
    print(f"nnunet-compress: initialised every layer (segmentation heads included) from {fname}")
    if errors and verbose:
        for name, err in errors.items():
            print(f"  {name}: relative reconstruction error {err:.4f}")


def install_pretrained_weights_hook() -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` initialise our compressed networks from their parent.

    nnU-Net's ``load_pretrained_weights`` demands identical keys and shapes and skips the segmentation heads; a
    compressed network has other keys (factorised layers) or shapes (pruned channels), and must start from all
    its parent's weights. ``nnunetv2.run.run_training`` calls the loader through its module global, and nnU-Net
    imports our trainer module (through nnUNet_extTrainer) before it loads weights, so our trainer modules wrap
    that global here. Networks that are not ours still go to nnU-Net's own loader unchanged.
    """
    import nnunetv2.run.run_training as run_training
    original = run_training.load_pretrained_weights
    if getattr(original, "_nnunet_compress_hook", False):
        return

    def load_pretrained_weights(network, fname, verbose=False):
        if isinstance(unwrap(network), CompressedUNet):
            return load_pretrained_weights_into(network, fname, verbose)
        return original(network, fname, verbose)

    load_pretrained_weights._nnunet_compress_hook = True
    run_training.load_pretrained_weights = load_pretrained_weights
