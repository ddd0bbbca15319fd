"""benchmarks/totalseg_cli.py's table: ratios against whichever original homes were run (--homes)."""

from benchmarks import totalseg_cli


def home(key, label, walls, first=100.0, prepare=None):
    runs = [{"wall_s": w, "cpu_s": w * 0.9, "peak_rss_gb": 4.0, "output": f"{key}.nii.gz"} for w in walls]
    return {"key": key, "label": label, "first": {"wall_s": first}, "runs": runs, "agreement_with_first_home": 1.0,
            "prepare_s": prepare}


def report(homes, warmup=None, prepared=False):
    return {"task": "total", "ct": {"size": [512, 512, 400], "spacing": [0.8] * 3}, "cpu": "x86_64, 2 cores",
            "command": "TotalSegmentator -i CT --ml -d cpu -o OUT", "weights": "stand-in", "runs": 2,
            "warmup_ct": warmup, "homes": homes, "prepared": prepared}


def test_ratios_against_the_engine_original_only_when_torch_was_not_run():
    table = totalseg_cli.markdown(report([home("original_engine", "original (openvino)", [300.0, 320.0]),
                                          home("compressed", "compressed", [100.0, 110.0])],
                                         warmup={"size": [170, 170, 170], "spacing": [0.8] * 3}))
    header = next(line for line in table.splitlines() if line.startswith("| home"))
    assert "× vs original (engine)" in header and "× vs original (torch)" not in header
    assert "first run on [170, 170, 170] voxels (conversion)" in header
    compressed = next(line for line in table.splitlines() if line.startswith("| compressed"))
    assert "| 2.95 |" in compressed  # median 310 / median 105


def test_all_three_homes_give_both_ratios():
    table = totalseg_cli.markdown(report([home("original_torch", "original (torch)", [60.0, 60.0]),
                                          home("original_engine", "original (openvino)", [50.0, 50.0]),
                                          home("compressed", "compressed", [30.0, 30.0])]))
    compressed = next(line for line in table.splitlines() if line.startswith("| compressed"))
    assert "| 2.00 | 1.67 |" in compressed


def test_prepared_engine_homes_show_the_install_time_and_a_plain_first_run():
    table = totalseg_cli.markdown(report([home("original_torch", "original (torch)", [60.0, 60.0], first=61.0),
                                          home("compressed", "compressed", [30.0, 30.0], first=31.0, prepare=12.5)],
                                         prepared=True))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| home"))
    assert "| prepare-engine at install s | first run s |" in header
    assert next(line for line in lines if line.startswith("| original (torch)")).startswith(
        "| original (torch) | – | 61.0 | 60.0 | 60.0 |")
    assert next(line for line in lines if line.startswith("| compressed")).startswith("| compressed | 12.5 | 31.0 |")
