"""Every command of ours fed bad input: one clear line on stderr, exit code != 0, no traceback, source untouched.

The model folders fed in are damaged COPIES of the tiny base model; the base itself and every copy are
checksummed before and after each command.
"""

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cli
from nnunet_compress.demo import tiny

pytestmark = pytest.mark.e2e


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def damaged(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Copies of the base model folder, each broken in one way."""
    root = tmp_path_factory.mktemp("damaged")
    folders = {}

    def copy(name: str) -> Path:
        folders[name] = shutil.copytree(tiny_base, root / name)
        return folders[name]

    copy("no_checkpoint").joinpath("fold_0", "checkpoint_final.pth").unlink()
    copy("empty_checkpoint").joinpath("fold_0", "checkpoint_final.pth").write_bytes(b"")
    ckpt = copy("corrupt_checkpoint").joinpath("fold_0", "checkpoint_final.pth")
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    copy("not_a_checkpoint").joinpath("fold_0", "checkpoint_final.pth").write_bytes(b"hello, not torch")
    copy("plans_wrong_shape").joinpath("plans.json").write_text(json.dumps({"plans_name": "x", "foo": [1, 2]}))
    copy("plans_not_json").joinpath("plans.json").write_text("{ this is not json")
    copy("no_dataset_json").joinpath("dataset.json").unlink()
    # a folder whose plans describe another network than its checkpoint (e.g. weights of another configuration)
    plans_path = copy("other_configuration").joinpath("plans.json")
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]
    plans_path.write_text(json.dumps(plans))
    # images that do not fit the model: wrong ending, wrong channel count, not nnU-Net naming
    images = root / "images"
    for name, content in {"wrong_ending": ["case_0000.nrrd"], "two_channels": ["case_0000.nii.gz", "case_0001.nii.gz"],
                          "bad_naming": ["case.nii.gz"]}.items():
        (images / name).mkdir(parents=True)
        for f in content:
            src = next((tiny_base.parent.parent.parent / "nnUNet_raw").glob("*/imagesTs/*_0000.nii.gz"))
            shutil.copy(src, images / name / f)
    folders["images"] = images
    return folders


def catalogue(base: Path, d: dict[str, Path], tmp: Path):
    """(case name, argv, text the error must contain)."""
    out = tmp / "out"
    yield "missing checkpoint", ["tucker", d["no_checkpoint"], "-o", out, "--rank-ratio", "0.5"], "holds no fold_X"
    yield "empty checkpoint", ["tucker", d["empty_checkpoint"], "-o", out, "--rank-ratio", "0.5"], "is empty"
    yield "corrupt checkpoint", ["prune", d["corrupt_checkpoint"], "-o", out, "--method", "l1", "--target-flops",
                                 "0.5"], "corrupt"
    yield "not a checkpoint", ["profile", d["not_a_checkpoint"]], "cannot be read"
    yield "plans of the wrong shape", ["tucker", d["plans_wrong_shape"], "-o", out, "--rank-ratio", "0.5"], \
        "no 'configurations' section"
    yield "plans not JSON", ["profile", d["plans_not_json"]], "not valid JSON"
    yield "no dataset.json", ["tucker", d["no_dataset_json"], "-o", out, "--rank-ratio", "0.5"], "dataset.json is missing"
    yield "checkpoint of another architecture", ["tucker", d["other_configuration"], "-o", out, "--rank-ratio", "0.5"], \
        "does not match"
    yield "unknown configuration", ["tucker", base, "-o", out, "-c", "4d_fullres", "--rank-ratio", "0.5"], \
        "configuration '4d_fullres' does not exist"
    yield "model of another configuration", ["tucker", base, "-o", out, "-c", "2d", "--rank-ratio", "0.5"], \
        "trained with configuration '3d_fullres', not '2d'"
    yield "unknown fold", ["tucker", base, "-o", out, "-f", "3", "--rank-ratio", "0.5"], "fold(s) 3"
    yield "not a model folder", ["profile", tmp], "plans.json is missing"
    yield "rank ratio out of range", ["tucker", base, "-o", out, "--rank-ratio", "0"], "outside (0, 1]"
    yield "min rank below 1", ["tucker", base, "-o", out, "--rank-ratio", "0.5", "--min-rank", "0"], "--min-rank"
    yield "rank multiple below 1", ["tucker", base, "-o", out, "--rank-ratio", "0.5", "--rank-multiple", "0"], \
        "--rank-multiple"
    yield "FLOP target out of range", ["tucker", base, "-o", out, "--target-flops", "1"], "outside (0, 1)"
    yield "latency target out of range", ["tucker", base, "-o", out, "--target-latency", "1.5"], "outside (0, 1)"
    yield "latency target no allowed ranks can meet", ["tucker", base, "-o", out, "--target-latency", "0.02"], \
        "cannot be reached"
    yield "pruning latency target out of range", ["prune", base, "-o", out, "--method", "l1", "--target-latency",
                                                  "0"], "outside (0, 1)"
    yield "prune target out of range", ["prune", base, "-o", out, "--method", "l1", "--target-params", "0"], \
        "outside (0, 1)"
    yield "unwritable output", ["tucker", base, "-o", "/proc/nnunet_compress/out", "--rank-ratio", "0.5"], \
        "cannot write to"
    yield "output is the source", ["tucker", base, "-o", base, "--rank-ratio", "0.5"], "is the source folder"
    yield "output inside the source", ["prune", base, "-o", base / "fold_0" / "x", "--method", "l1",
                                       "--target-flops", "0.5"], "inside it"
    yield "output contains the source", ["tucker", base, "-o", base.parent, "--rank-ratio", "0.5", "--overwrite"], \
        "contains the source"
    yield "calibration images with the wrong ending", ["prune", base, "-o", out, "--method", "taylor",
                                                        "--target-flops", "0.5", "-i", d["images"] / "wrong_ending"], \
        "no .nii.gz images"
    yield "calibration images with two channels", ["prune", base, "-o", out, "--method", "taylor", "--target-flops",
                                                   "0.5", "-i", d["images"] / "two_channels"], "expects 1"
    yield "calibration images not named as nnU-Net", ["prune", base, "-o", out, "--method", "taylor",
                                                      "--target-flops", "0.5", "-i", d["images"] / "bad_naming"], \
        "naming"
    yield "profile patch of the wrong dimension", ["profile", base, "--patch", "32", "32"], "is 3d"


def test_bad_input_catalogue(tiny_ws, tiny_base, damaged, tmp_path):
    before = {"base": checksums(tiny_base), **{k: checksums(v) for k, v in damaged.items()}}
    shared_out = tmp_path / "out"
    # each case writes (or rather must not write) its own output folder, so two cases can run at once and a folder
    # left behind names its case
    cases = [(name, [tmp_path / f"out_{i}" if a == shared_out else a for a in argv], expected, tmp_path / f"out_{i}")
             for i, (name, argv, expected) in enumerate(catalogue(tiny_base, damaged, tmp_path))]
    # two commands at a time, one thread each: most of a refusal is the interpreter importing torch, so the
    # catalogue takes half as long on two cores
    env = {**tiny_ws.env(), "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda case: run_cli(*case[1], env=env), cases))
    failures = []
    for (name, _, expected, out), proc in zip(cases, procs):
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        ok = (proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1
              and expected in lines[0] and lines[0].startswith("error:"))
        if not ok:
            failures.append(f"{name}: exit {proc.returncode}, stderr: {proc.stderr.strip()[-600:]!r}")
        if out.exists():
            failures.append(f"{name}: an output folder was left behind")
    assert not failures, "\n".join(failures)
    after = {"base": checksums(tiny_base), **{k: checksums(v) for k, v in damaged.items()}}
    assert after == before, "a source folder was modified"


def test_debug_flag_shows_the_traceback(tiny_ws, damaged, tmp_path):
    proc = run_cli("--debug", "tucker", damaged["empty_checkpoint"], "-o", tmp_path / "o", "--rank-ratio", "0.5",
                   env=tiny_ws.env())
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "is empty" in proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["plan", "tucker", "-c", "3d_fullres", "--rank-ratio", "0.5", "-d", "999"], "dataset 999 not found"),
    (["plan", "tucker", "-d", "501", "-c", "4d_superres", "--rank-ratio", "0.5"], "4d_superres"),
    (["plan", "tucker", "-d", "501", "-c", "3d_fullres", "-p", "nnUNetPlans_missing", "--rank-ratio", "0.5"],
     "nnUNetPlans_missing"),
    (["plan", "tucker", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--energy", "0.9"], "--weights"),
    (["plan", "tucker", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--rank-ratio", "0.5", "--epochs",
      "0"], "must be positive"),
    (["plan", "taylor", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--target-flops", "0.5", "--step",
      "1.5"], "--step"),
    (["plan", "taylor", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS], "exactly one of"),
    (["plan", "taylor", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--target-flops", "0.5",
      "--min-keep-fraction", "1"], "--min-keep-fraction"),
    (["plan", "sauron", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--mu", "2"], "mu"),
    (["plan", "sauron", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--recovery-epochs", "-1"],
     "--recovery-epochs"),
    (["plan", "tucker", "-d", "501", "-c", "3d_fullres", "-p", tiny.TINY_PLANS, "--preset", "sauron_paper"],
     "is for `plan sauron`"),
])
def test_plan_modifiers_bad_input(tiny_ws, argv, expected):
    plans_dir = tiny_ws.plans_path(tiny.TINY_PLANS).parent
    before = checksums(plans_dir)
    proc = run_cli(*argv, env=tiny_ws.env())
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert checksums(plans_dir) == before, "a plans file was written or changed"
