"""`--seed` of the plan commands: recorded in the plans' schedule (what seeds the trainer), Sauron's references too."""

import pytest

from nnunet_compress.cli.main import build_parser
from nnunet_compress.cli.options import schedule_from_args
from nnunet_compress.errors import CompressError

COMMON = ["-d", "501", "-c", "3d_fullres"]


@pytest.mark.parametrize("method, options", [("tucker", ["--rank-ratio", "0.5"]), ("taylor", ["--target-flops", "0.5"]),
                                             ("sauron", [])])
def test_seed_goes_into_the_schedule(method, options):
    args = build_parser().parse_args(["plan", method, *COMMON, *options, "--seed", "7", "--epochs", "3"])
    assert schedule_from_args(args) == {"num_epochs": 3, "seed": 7}


@pytest.mark.parametrize("method, options", [("tucker", ["--rank-ratio", "0.5"]), ("sauron", [])])
def test_without_seed_the_training_stays_unseeded(method, options):
    args = build_parser().parse_args(["plan", method, *COMMON, *options])
    assert "seed" not in schedule_from_args(args)


def test_negative_seed_is_refused():
    args = build_parser().parse_args(["plan", "tucker", *COMMON, "--rank-ratio", "0.5", "--seed", "-1"])
    with pytest.raises(CompressError, match="--seed must be a non-negative integer"):
        schedule_from_args(args)


def test_tiny_plans_offset_the_training_seed():
    from nnunet_compress.demo import tiny
    parent = {"configurations": {tiny.CONFIGURATION: {"architecture": {"arch_kwargs": {}}}}}
    assert tiny.tiny_plans(parent, 1, 1)["configurations"][tiny.CONFIGURATION]["nnunet_compress"]["schedule"][
        "seed"] == tiny.TRAINING_SEED
    assert tiny.tiny_plans(parent, 1, 1, training_seed=3)["configurations"][tiny.CONFIGURATION]["nnunet_compress"][
        "schedule"]["seed"] == tiny.TRAINING_SEED + 3
