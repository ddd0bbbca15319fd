"""benchmarks/distillation.py's arithmetic over seeds: mean ± std per row and the two aims per seed."""

import statistics

import pytest

from benchmarks import distillation


def seed_run(seed, untuned, labels, free, both):
    rows = [("base", "base", 0.95), ("taylor", "Taylor F0.5, one-shot, no fine-tuning", untuned),
            ("taylor", "+ labels", labels), ("taylor", "+ label-free distillation", free),
            ("taylor", "+ labels + distillation (alpha 0.5)", both)]
    return {"seed": seed, "methods": ["taylor"], "classes": ["liver"],
            "rows": [{"method": m, "model": n, "mean_dice": d, "dice": {"liver": d}, "params": 1, "flops": 2e9}
                     for m, n, d in rows]}


def test_rows_and_aims_over_seeds():
    second = seed_run(1, 0.80, 0.805, 0.81, 0.79)
    second["rows"][4].update(flops=1e9, params=3)  # pruned to another size in this seed
    agg = distillation.over_seeds([seed_run(0, 0.70, 0.90, 0.88, 0.91), second])
    both = next(r for r in agg["rows"] if r["model"].startswith("+ labels + distillation"))
    assert both["flops"] == pytest.approx(1.5e9) and both["params"] == 2
    assert both["mean_dice"] == pytest.approx(0.85) and both["min"] == 0.79
    assert both["std"] == pytest.approx(statistics.pstdev([0.91, 0.79]))
    aims = agg["aims"]["taylor"]
    # seed 0: (0.88 - 0.70) / (0.90 - 0.70) = 90%; seed 1: labels gained 0.005 < MIN_GAIN, so no share is claimed
    assert aims["share_recovered_per_seed"][0] == pytest.approx(0.9) and aims["share_recovered_per_seed"][1] is None
    assert aims["labels_distill_minus_labels_per_seed"] == pytest.approx([0.01, -0.015])
    assert aims["labels_distill_minus_labels"]["mean"] == pytest.approx(-0.0025)
    notes = distillation.seeds_notes(agg)
    assert "90%, n/a" in notes[0] and "+0.010, -0.015" in notes[0]
    assert "0.850 ± 0.060" in distillation.table(agg)


def test_seeds_must_hold_the_same_rows():
    other = seed_run(1, 0.8, 0.9, 0.9, 0.9)
    other["rows"][2]["model"] = "something else"
    with pytest.raises(ValueError, match="same rows"):
        distillation.over_seeds([seed_run(0, 0.7, 0.9, 0.88, 0.91), other])


def test_a_pseudo_dataset_already_preprocessed_is_not_made_again(tmp_path, monkeypatch):
    """nnUNetv2_preprocess writes into the folder the parent's plans name (their data identifier), so that is what
    says the pseudo-dataset is done; re-making it would delete and retrain every label-free model of the seed."""
    import argparse
    import json

    from nnunet_compress.demo import tiny
    monkeypatch.setattr(distillation.os, "environ", {})
    bench = distillation.Bench(argparse.Namespace(workdir=tmp_path, unlabelled=3, epochs=1, iterations=1, lr=1e-3),
                               seed=0)
    made = []
    monkeypatch.setattr(bench, "unlabelled_images", lambda: tmp_path / "images")
    monkeypatch.setattr(tiny, "label_unlabelled_cases", lambda *a, **k: made.append(a))
    bench.pseudo_dataset(tmp_path / "base")
    assert len(made) == 1  # nothing there yet
    plans = bench.pseudo.plans_path(tiny.TINY_PLANS)
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"configurations": {tiny.CONFIGURATION: {"data_identifier": "nnUNetPlans_3d"}}}))
    bench.pseudo.raw_dataset.mkdir(parents=True)
    (bench.pseudo.raw_dataset / "dataset.json").write_text(json.dumps({"numTraining": 3}))
    bench.pseudo_dataset(tmp_path / "base")
    assert len(made) == 2  # the plans are there, the preprocessed data not
    (plans.parent / "nnUNetPlans_3d").mkdir()
    bench.pseudo_dataset(tmp_path / "base")
    assert len(made) == 2
