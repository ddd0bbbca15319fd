"""Sub-commands of ``nnunet-compress`` for trying it on synthetic data: ``demo-data`` and ``demo``."""

from __future__ import annotations

import os
from pathlib import Path

from nnunet_compress.demo.run import run_demo
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.synthetic import write_synthetic_dataset


def cmd_demo_data(args) -> None:
    raw = args.output or os.environ.get("nnUNet_raw")
    if not raw:
        raise CompressError("no output folder: pass -o or set nnUNet_raw")
    folder = write_synthetic_dataset(raw, args.dataset_id, name=args.name, num_train=args.num_train,
                                     num_test=args.num_test, seed=args.seed, overwrite=args.overwrite)
    print(folder)


def cmd_demo(args) -> None:
    run_demo(Path(args.workdir), fast=args.fast, seed=args.seed)


def register(sub) -> None:
    p = sub.add_parser("demo-data", help="write a synthetic CT-like nnU-Net raw dataset")
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("-o", "--output", help="raw data root (default: $nnUNet_raw)")
    p.add_argument("--name", default="SyntheticCT")
    p.add_argument("--num-train", type=int, default=12)
    p.add_argument("--num-test", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="the end-to-end demo on synthetic data")
    p.add_argument("--workdir", default="demo_work")
    p.add_argument("--fast", action="store_true", help="shorter training (for a quick look)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic dataset and of every training run and random choice in it (0); "
                        "each seed repeats exactly (data loading runs in the training process)")
    p.set_defaults(func=cmd_demo)

