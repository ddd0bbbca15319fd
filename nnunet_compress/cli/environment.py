"""Sub-command of ``nnunet-compress`` that points nnU-Net at the plugin: ``trainers-path`` prints the folder of
the compressing trainers, the value of ``nnUNet_extTrainer`` (nnU-Net finds trainers only in its own package or
there)."""

from __future__ import annotations

from nnunet_compress.nnunet.env import trainers_path


def cmd_trainers_path(args) -> None:
    print(trainers_path())


def register(sub) -> None:
    p = sub.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=cmd_trainers_path)
