"""Plan presets: every shipped preset names real options of its command; explicit options win."""

import pytest

from nnunet_compress.cli.main import build_parser
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.presets import apply_preset, available_presets


def parse(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("name", sorted(available_presets()))
def test_every_preset_applies_to_its_command(name):
    preset = available_presets()[name]
    args = parse("plan", preset["method"], "-d", "1", "-c", "3d_fullres", "--preset", name)
    apply_preset(args, args._parser)
    for key, value in preset["options"].items():
        assert getattr(args, key) == value, key


def test_explicit_options_win_over_the_preset():
    args = parse("plan", "tucker", "-d", "1", "-c", "3d_fullres", "--preset", "tucker_paper", "--rank-ratio", "0.5")
    apply_preset(args, args._parser)
    assert args.rank_ratio == 0.5 and args.min_rank == 8 and args.include_stem and args.num_epochs == 50


def test_wrong_or_unknown_preset_is_refused():
    args = parse("plan", "sauron", "-d", "1", "-c", "3d_fullres", "--preset", "tucker_paper")
    with pytest.raises(CompressError, match="is for `plan tucker`"):
        apply_preset(args, args._parser)
    args = parse("plan", "tucker", "-d", "1", "-c", "3d_fullres", "--preset", "nope")
    with pytest.raises(CompressError, match="unknown preset 'nope'; available: sauron_paper"):
        apply_preset(args, args._parser)
