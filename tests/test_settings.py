"""Every settings class follows one protocol: validate() returns the object, to_dict()/from_dict() round-trip
(unset values left out), and from_dict() refuses unknown keys with a message naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_compress.distillation.loss import DistillationSettings
from nnunet_compress.errors import CompressError
from nnunet_compress.evaluation.compare import CompareSettings
from nnunet_compress.inference.settings import EngineSettings
from nnunet_compress.pruning.sauron import SauronConfig
from nnunet_compress.pruning.taylor import TaylorSettings
from nnunet_compress.settings import Settings
from nnunet_compress.tucker.ranks import RankPolicy

EXAMPLES = [
    RankPolicy(ratio=0.3, min_rank=4),
    RankPolicy(target_flops=0.2, budget_error="best", calibration_seed=3),
    TaylorSettings(target_flops=0.5, step=0.1, scope="layer"),
    SauronConfig(tau_max=0.4, kappa=4),
    DistillationSettings(alpha=1.0, temperature=3.0),
    EngineSettings(engine="torch", precision="f32"),
]


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip_and_validate_returns_self(settings):
    assert isinstance(settings, Settings)
    assert settings.validate() is settings
    d = settings.to_dict()
    assert None not in d.values()
    again = type(settings).from_dict(d)
    assert again.to_dict() == d


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: type(s).__name__)
def test_unknown_keys_are_refused_by_name(settings):
    with pytest.raises(CompressError, match=r"unknown .* setting\(s\) \['tau_mxa'\]"):
        type(settings).from_dict({**settings.to_dict(), "tau_mxa": 1})


def test_compare_settings_validate_returns_self_and_refuses_a_bad_correction(tmp_path: Path):
    s = CompareSettings(base=tmp_path, compressed=[tmp_path], images=tmp_path, labels=tmp_path, output=tmp_path)
    assert s.validate() is s
    s.correction = "bonferoni"
    with pytest.raises(CompressError, match="--correction 'bonferoni' unknown; choose holm, bh, none"):
        s.validate()


def test_sauron_reads_json_integers_as_floats():
    config = SauronConfig.from_dict({"tau_max": 1, "lambda_": 0})
    assert isinstance(config.tau_max, float) and isinstance(config.lambda_, float)


def test_cli_choices_are_the_settings_tuples():
    from nnunet_compress.cli.main import build_parser
    from nnunet_compress.pruning.taylor import IMPORTANCE_MODES, PRUNE_METHODS, SCOPES
    from nnunet_compress.tucker.ranks import BUDGET_ERRORS
    parser = build_parser()
    actions = {}
    stack = [parser]
    while stack:
        p = stack.pop()
        for a in p._actions:
            if a.choices and isinstance(a.choices, dict):
                stack.extend(a.choices.values())
            elif a.choices:
                actions.setdefault(a.dest, set()).add(tuple(a.choices))
    assert actions["budget_error"] == {BUDGET_ERRORS}
    assert actions["scope"] == {SCOPES}
    assert actions["importance"] == {IMPORTANCE_MODES}
    assert actions["method"] >= {PRUNE_METHODS}


def test_plans_written_with_explicit_nulls_still_load():
    """Plans written before the one protocol stored unset values as null (e.g. the distillation teacher)."""
    assert DistillationSettings.from_dict({"alpha": 1.0, "temperature": 2.0, "teacher": None}).teacher is None
    assert TaylorSettings.from_dict({"target_flops": 0.5, "target_params": None}).target == 0.5
