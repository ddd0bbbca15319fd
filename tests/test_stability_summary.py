"""benchmarks/stability.py's arithmetic: spread over seeds, the worst run, and which rows the aims apply to."""

import statistics

import pytest

from benchmarks import stability


def row(model, dice, per_class):
    return {"model": model, "dice": dice, "dice_per_class": per_class, "params": 10, "gflops": 1.0}


def test_spread_and_minimum_per_class():
    runs = {0: [row("base", 0.9, {"1": 0.9, "2": 0.9}), row("Taylor F0.5 + fine-tuning", 0.8, {"1": 0.9, "2": 0.7})],
            1: [row("base", 0.8, {"1": 0.8, "2": 0.8}), row("Taylor F0.5 + fine-tuning", 0.45, {"1": 0.9, "2": 0.0})]}
    summary = {s["model"]: s for s in stability.summarise(runs)}
    taylor = summary["Taylor F0.5 + fine-tuning"]
    assert taylor["mean_dice"]["mean"] == pytest.approx(0.625)
    assert taylor["mean_dice"]["std"] == pytest.approx(statistics.pstdev([0.8, 0.45]))
    assert taylor["mean_dice"]["min"] == 0.45 and taylor["lowest_class_dice"] == 0.0
    assert taylor["per_class"]["2"] == pytest.approx({"mean": 0.35, "std": 0.35, "min": 0.0})
    # against each seed's own base: 0.8 - 0.9 and 0.45 - 0.8
    assert taylor["vs_base"]["per_seed"] == pytest.approx([-0.1, -0.35])
    assert taylor["vs_base"]["mean"] == pytest.approx(-0.225) and taylor["vs_base"]["min"] == pytest.approx(-0.35)
    assert summary["base"]["vs_base"]["std"] == 0.0
    lines = stability.aims(list(summary.values()))
    assert len(lines) == 1 and "MISSED: aim >= 0.5" in lines[0] and "MISSED: aim <= 0.03" in lines[0]


def test_the_larger_held_out_grading_is_summarised_from_its_own_keys():
    def graded(model, demo, more):
        return dict(row(model, demo, {"1": demo}), dice_held_out=more, dice_per_class_held_out={"1": more})
    results = {"held_out_cases": 16,
               "runs": {0: [graded("base", 0.9, 0.85), graded("tucker 0.5 + fine-tuning", 0.8, 0.84)],
                        1: [graded("base", 0.7, 0.83), graded("tucker 0.5 + fine-tuning", 0.6, 0.80)]}}
    stability.add_summaries(results)
    demo = {s["model"]: s for s in results["summary"]}["tucker 0.5 + fine-tuning"]
    more = {s["model"]: s for s in results["summary_held_out"]}["tucker 0.5 + fine-tuning"]
    assert demo["mean_dice"]["std"] == pytest.approx(0.1) and "MISSED: aim <= 0.03" in results["aims"][0]
    assert more["mean_dice"]["std"] == pytest.approx(0.02) and "ok: aim <= 0.03" in results["aims_held_out"][0]
    assert more["vs_base"]["per_seed"] == pytest.approx([-0.01, -0.03])
    assert [title for _, title in stability.gradings(results)][1] == "16 held-out cases per seed"
    assert stability.gradings({"held_out_cases": 0}) == stability.gradings({})[:1]


@pytest.mark.parametrize("model, tuned", [("tucker 0.5 (no fine-tuning)", False), ("tucker 0.5 + fine-tuning", True),
                                          ("L1 prune F0.5 (no fine-tuning)", False), ("base", False),
                                          ("Sauron (pruned while training)", True),
                                          ("tucker 0.25 + label-free distill", True)])
def test_which_rows_are_fine_tuned(model, tuned):
    assert stability.is_fine_tuned(model) is tuned


def test_rerun_replaces_only_the_rerun_methods_rows_and_keeps_the_others(tmp_path, monkeypatch):
    """--rerun: the rows the current code trained again replace their old ones in every seed (class keys as the
    JSON holds them), the other rows are kept as they were, and a seed the old JSON lacks is refused."""
    import json
    from types import SimpleNamespace

    def graded(model, demo, more):
        return dict(row(model, demo, {"1": demo}), latency_ms=1.0, dice_held_out=more,
                    dice_per_class_held_out={"1": more})
    previous = {"settings": {"seeds": [0, 1], "fast": False, "workdir": str(tmp_path / "work")},
                "held_out_cases": 16,
                "runs": {"0": [graded("base", 0.9, 0.9), graded("Sauron (pruned while training)", 0.5, 0.5)],
                         "1": [graded("base", 0.8, 0.8), graded("Sauron (pruned while training)", 0.6, 0.6)]}}
    source = tmp_path / "previous.json"
    source.write_text(json.dumps(previous))
    new_dice = {0: 0.88, 1: 0.79}

    def demo_rows_again(seed_root, seed, methods, fast):
        assert methods == ["sauron"] and seed_root == tmp_path / "work" / f"seed_{seed}"
        return [SimpleNamespace(model="Sauron (pruned while training)", dice=new_dice[seed],
                                dice_per_class={1: new_dice[seed]}, params=5, gflops=0.5, latency_ms=2.0)]
    monkeypatch.setattr(stability, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(stability, "demo_rows_again", demo_rows_again)
    monkeypatch.setattr(stability, "grade_on_more_cases", lambda root, seed, rows, n: {
        r.model: {"mean_foreground": r.dice - 0.01, "per_class": {1: r.dice - 0.01}} for r in rows})
    results = stability.main(["--rerun", "sauron", "--previous", str(source), "--seeds", "0", "1", "--tag", "t"])
    for seed, base in ((0, 0.9), (1, 0.8)):
        rows = {r["model"]: r for r in results["runs"][seed]}
        assert rows["base"]["dice"] == base
        sauron = rows["Sauron (pruned while training)"]
        assert sauron["dice"] == new_dice[seed] and sauron["dice_per_class"] == {"1": new_dice[seed]}
        assert sauron["dice_held_out"] == pytest.approx(new_dice[seed] - 0.01)
    summary = {s["model"]: s for s in results["summary_held_out"]}
    assert summary["Sauron (pruned while training)"]["vs_base"]["per_seed"] == pytest.approx([-0.03, -0.02])
    assert (tmp_path / "results" / "stability_t.json").is_file()
    with pytest.raises(SystemExit, match="no runs of seed"):
        stability.main(["--rerun", "sauron", "--previous", str(source), "--seeds", "0", "2"])


def test_rerun_makes_the_methods_one_shot_models_again_too(tmp_path, monkeypatch):
    """--rerun taylor: the one-shot L1 model comes from the same pruning code as Taylor's, so its folder is deleted
    before the demo's Taylor rows run again (the demo skips a model whose folder exists); Sauron's rerun leaves it."""
    from nnunet_compress.demo import run as demo
    from nnunet_compress.demo import tiny
    ws = tiny.default_workspace(tmp_path)
    base = tiny.checkpoint_path(ws.model_folder())
    base.parent.mkdir(parents=True)
    base.touch()
    one_shot = ws.root / "compressed" / "l1_F0.5"
    seen = []
    monkeypatch.setattr(demo, "taylor_rows", lambda *a: seen.append(("taylor", one_shot.exists())) or [])
    monkeypatch.setattr(demo, "sauron_rows", lambda *a: seen.append(("sauron", one_shot.exists())) or [])
    monkeypatch.setattr(stability.os, "environ", {})
    one_shot.mkdir(parents=True)
    stability.demo_rows_again(tmp_path, 0, ["sauron"], fast=True)
    stability.demo_rows_again(tmp_path, 0, ["taylor"], fast=True)
    assert seen == [("sauron", True), ("taylor", False)]
