"""What a TotalSegmentator user sees: its own CLI end to end on the CPU, original home vs compressed home.

    python -m benchmarks.totalseg_cli --task total_fast --runs 3            # example CT, 3 mm --fast model
    python -m benchmarks.totalseg_cli --task total --runs 1 --synthetic-ct 512 512 400 --spacing 0.8 \
        --homes original_engine compressed --warmup-size 170 170 170 --breakdown-runs 1 --tag total_wholebody

Per-patch speed-ups (benchmarks/speed.py) are not what a user gets: a TotalSegmentator run also starts Python,
imports torch, resamples the CT, loads the model, runs nnU-Net's sliding window and export, post-processes and
saves. This runs TotalSegmentator's CLI as a user would (``TotalSegmentator -i CT -o OUT --ml -d cpu``, plus
``--fast`` for ``total_fast``), one subprocess per run, on up to five homes, interleaved run by run:

* ``original (torch)``: a source home as TotalSegmentator ships it (PlainConvUNet on torch),
* ``original (openvino)``: the same weights through ``nnunet-compress totalseg --no-compression`` (the original
  network on our CPU engine: the fair baseline for the engine),
* ``compressed``: ``nnunet-compress totalseg --rank-ratio R`` (Tucker) of the same source home,
* ``original_int8`` and ``compressed_int8``: the same two with ``--int8``, calibrated on ``--calibration-images``
  (default: a synthetic phantom of ``--calibration-size`` voxels written under ``--work``): the original as a user
  quantises it in minutes, and compression and INT8 together.

With the stand-in's random weights the segmentation means nothing and flips under any rounding, so the INT8 homes
are quantised with an open Dice budget (``--int8-options``, default ``--max-dice-drop 0.99``): what is timed is the
INT8 network, not the accuracy control; with ``--source-home`` (real weights) the default budget of ``quantize``
applies unless ``--int8-options`` says otherwise.

``--homes`` picks some of them (a run of the 1.5 mm task on a whole-body CT takes tens of minutes per home), and
``--warmup-size`` runs the warm-up on a small synthetic CT: the engine converts per patch shape, and nnU-Net pads a
CT smaller than the patch up to it, so a small CT fills the same cache entries in a fraction of the time.

For each run: wall time, CPU time of the child and its reaped descendants (``os.wait4``: nnU-Net's spawned
preprocessing and export workers included) and peak RSS (the largest single process). The engine's cache of
converted models is a fresh one under ``--work``, emptied at every start. Then, as ``nnunet-compress totalseg``
does when it writes a home, ``nnunet-compress prepare-engine`` converts each engine home's models into it (timed:
"prepare-engine at install"); ``--no-prepare`` skips that, so the first run converts, as homes written before
``totalseg`` prepared the engine did. Each home first gets one run reported separately as "first run": what a
user sees on the first CT after installing the home. Then ``--breakdown-runs`` runs per home go through
benchmarks/totalseg_stages.py, TotalSegmentator's CLI with timers, for a table of where the seconds go.

The source home is a stand-in built here (nnunet_compress.totalseg.standin: TotalSegmentator's layout and
architectures, He-initialised random weights), unless ``--source-home`` names a home with real weights (never
written to: TotalSegmentator runs on a copy of its config.json with a link to its models). Random weights give
realistic network, resampling and saving times but not realistic segmentations, so TotalSegmentator's
post-processing (which depends on what was segmented) may differ from a real home's. Everything (homes, engine
cache, outputs, logs) lives under ``--work``; nothing is downloaded (the runs refuse internet connections).

Inputs: ``--ct`` (default: TotalSegmentator's full example CT, tests/data/totalsegmentator/example_ct.nii.gz,
122x101x112 at 3 mm), or ``--synthetic-ct X Y Z --spacing MM``: a simple CT-like phantom (body, lungs, liver,
spine, noise in HU) of a typical whole-body size, for timing only; no network has learnt anything about it.
Outputs a Markdown table on stdout and JSON + Markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, RESULTS, WORK, cpu_model
from nnunet_compress.totalseg.home import RESULTS as HOME_RESULTS

HOME_KEYS = ("original_torch", "original_engine", "compressed", "original_int8", "compressed_int8")
DEFAULT_HOMES = ("original_torch", "original_engine", "compressed")
# random weights: an open Dice budget, few tiles (the timing does not depend on the calibration values)
STANDIN_INT8_OPTIONS = "--max-dice-drop 0.99 --subset-size 8 --validation-patches 4"
STAGES_DRIVER = Path(__file__).resolve().parent / "totalseg_stages.py"
EXAMPLE_CT = REPO / "tests" / "data" / "totalsegmentator" / "example_ct.nii.gz"
BIN = Path(sys.executable).parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["total_fast", "total"], default="total_fast",
                    help="total_fast: the 3 mm model (297), TotalSegmentator --fast; total: the five 1.5 mm part "
                         "models (291-295)")
    ap.add_argument("--ct", type=Path, default=EXAMPLE_CT, help="input CT (NIfTI)")
    ap.add_argument("--synthetic-ct", nargs=3, type=int, metavar=("X", "Y", "Z"),
                    help="use a synthetic CT-like phantom of this many voxels instead of --ct (timing only)")
    ap.add_argument("--spacing", type=float, default=0.8, help="voxel spacing of --synthetic-ct in mm")
    ap.add_argument("--rank-ratio", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per home, after one first run each")
    ap.add_argument("--homes", nargs="+", choices=HOME_KEYS, default=list(DEFAULT_HOMES),
                    help="which homes to run (default: the three f32 ones; the 1.5 mm task on a whole-body CT takes "
                         "about an hour per run of the original on torch)")
    ap.add_argument("--calibration-images", type=Path,
                    help="INT8 homes: calibration CTs in nnU-Net naming (default: one synthetic phantom of "
                         "--calibration-size voxels at --spacing)")
    ap.add_argument("--calibration-size", nargs=3, type=int, default=(256, 256, 256), metavar=("X", "Y", "Z"))
    ap.add_argument("--int8-options", default=None,
                    help=f"extra options of `totalseg --int8` (default with the stand-in: '{STANDIN_INT8_OPTIONS}'; "
                         f"with --source-home: none)")
    ap.add_argument("--warmup-size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                    help="warm-up runs on a synthetic CT of this many voxels at --spacing instead of the timed CT: "
                         "they only fill the engine's cache, which depends on the patch, not on the CT")
    ap.add_argument("--breakdown-runs", type=int, default=1, help="runs per home with stage timers (0: none)")
    ap.add_argument("--ts-args", default="", help="extra TotalSegmentator options for every run, e.g. '-ns 1' "
                                                   "(nnU-Net starts that many export workers, each importing torch)")
    ap.add_argument("--engine", default="openvino", help="NNUNET_COMPRESS_CPU_ENGINE of the nnunet-compress homes")
    ap.add_argument("--source-home", type=Path, help="a TotalSegmentator home with real weights (default: build "
                                                     "a stand-in with random weights)")
    ap.add_argument("--work", type=Path, default=WORK,
                    help="homes, engine cache, outputs and logs (reused homes are kept between invocations)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the homes under --work")
    ap.add_argument("--no-prepare", action="store_true",
                    help="do not run nnunet-compress prepare-engine on the engine homes: their first run converts")
    ap.add_argument("--tag", default=None, help="suffix of the result files (default: task and CT)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ct = args.ct.resolve()
    if args.synthetic_ct:
        ct = work / f"synthetic_ct_{'x'.join(map(str, args.synthetic_ct))}_{args.spacing:g}mm.nii.gz"
        if not ct.is_file():
            write_synthetic_ct(ct, tuple(args.synthetic_ct), args.spacing)
    ct_info = describe_ct(ct)
    homes = build_homes(args, work)
    warmup_ct = ct
    if args.warmup_size:
        warmup_ct = work / f"synthetic_ct_{'x'.join(map(str, args.warmup_size))}_{args.spacing:g}mm.nii.gz"
        if not warmup_ct.is_file():
            write_synthetic_ct(warmup_ct, tuple(args.warmup_size), args.spacing)

    cache = work / "engine_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the warm-up run must convert, as a user's first run does
    base_env = dict(os.environ, NNUNET_COMPRESS_CACHE_DIR=str(cache))
    base_env.pop("TOTALSEG_WEIGHTS_PATH", None)
    out_dir = work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    ts_args = ["--ml", "-d", "cpu"] + (["--fast"] if args.task == "total_fast" else []) + shlex.split(args.ts_args)

    def run(home: dict, kind: str, i: int) -> dict:
        env = dict(base_env, TOTALSEG_HOME_DIR=str(home["path"]), **home["env"])
        out = out_dir / f"{home['key']}_{kind}{i}.nii.gz"
        timings = out_dir / f"{home['key']}_{kind}{i}_stages.json"
        cmd = ([sys.executable, str(STAGES_DRIVER), str(timings)] if kind == "breakdown"
               else [str(BIN / "TotalSegmentator")]) + ts_args + ["-i", str(warmup_ct if kind == "warmup" else ct),
                                                                  "-o", str(out)]
        result = run_child(cmd, env, out_dir / f"{home['key']}_{kind}{i}.log")
        print(f"  {home['label']:<34} {kind} {i}: {result['wall_s']:6.1f} s wall, {result['cpu_s']:6.1f} CPU-s, "
              f"{result['peak_rss_gb']:.2f} GB", flush=True)
        if kind == "breakdown":
            result["stages"] = stages(json.loads(timings.read_text()), result)
        result["output"] = str(out)
        return result

    for h in homes:
        h["prepare_s"] = None if h["key"] == "original_torch" or args.no_prepare else \
            prepare_engine(h, args.task, base_env, out_dir)
    print(f"TotalSegmentator -i CT {' '.join(ts_args)} on {ct_info['size']} voxels at {ct_info['spacing']} mm")
    for h in homes:
        h["first"] = run(h, "warmup", 0)
    for i in range(1, args.runs + 1):
        for h in homes:
            h.setdefault("runs", []).append(run(h, "run", i))
    for i in range(1, args.breakdown_runs + 1):
        for h in homes:
            h.setdefault("breakdown", []).append(run(h, "breakdown", i))
    reference = homes[0]["runs"][0]["output"]
    for h in homes:
        h["agreement_with_first_home"] = voxel_agreement(reference, h["runs"][0]["output"])

    report = {"task": args.task, "ct": ct_info, "rank_ratio": args.rank_ratio, "engine": args.engine,
              "runs": args.runs, "breakdown_runs": args.breakdown_runs, "prepared": not args.no_prepare,
              "warmup_ct": describe_ct(warmup_ct) if warmup_ct != ct else None,
              "weights": str(args.source_home) if args.source_home else "stand-in (random, He init)",
              "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
              "versions": versions(), "command": "TotalSegmentator -i CT " + " ".join(ts_args) + " -o OUT",
              "homes": [{k: v for k, v in h.items() if k != "env"} | {"path": str(h["path"])} for h in homes]}
    table = markdown(report)
    print(table)
    tag = args.tag or f"{args.task}_{ct.name.split('.')[0]}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"totalseg_cli_{tag}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"totalseg_cli_{tag}.md").write_text(table + "\n")
    print(f"wrote {RESULTS / f'totalseg_cli_{tag}.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------- homes

def build_homes(args, work: Path) -> list[dict]:
    """The homes of ``--homes`` (HOME_KEYS: original on torch, original on the engine, compressed), built once and
    reused; the source home is always built, as the other two are derived from it."""
    root = work / "homes" / args.task
    if args.rebuild:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if args.source_home:
        source = root / "original_real"  # TotalSegmentator writes its counter into config.json: not the user's
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        config = args.source_home / "config.json"
        if config.is_file():
            shutil.copy(config, source / "config.json")
        (source / "nnunet").symlink_to((args.source_home / "nnunet").resolve())
        models_from = args.source_home.resolve()
    else:
        source = root / "original_standin"
        if not (source / "config.json").is_file():  # written last: its presence means the home is complete
            from nnunet_compress.totalseg.standin import write_standin_home
            shutil.rmtree(source, ignore_errors=True)
            t0 = time.perf_counter()
            write_standin_home(source, [args.task])
            print(f"stand-in source home: {time.perf_counter() - t0:.0f} s")
        models_from = source
    converted = root / "original_converted"
    compressed = root / f"tucker{args.rank_ratio:g}"
    original_int8, compressed_int8 = root / "original_int8", root / f"tucker{args.rank_ratio:g}_int8"
    if "original_engine" in args.homes:
        derive(models_from, converted, args.task, ["--no-compression"])
    if "compressed" in args.homes:
        derive(models_from, compressed, args.task, ["--rank-ratio", str(args.rank_ratio)])
    if {"original_int8", "compressed_int8"} & set(args.homes):
        int8 = int8_options(args, work)
        if "original_int8" in args.homes:
            derive(models_from, original_int8, args.task, ["--no-compression", *int8])
        if "compressed_int8" in args.homes:
            derive(models_from, compressed_int8, args.task, ["--rank-ratio", str(args.rank_ratio), *int8])
    engine = {"NNUNET_COMPRESS_CPU_ENGINE": args.engine}
    homes = [{"key": "original_torch", "label": "original (torch)", "path": source, "env": {}},
            {"key": "original_engine", "label": f"original ({args.engine})", "path": converted, "env": engine},
            {"key": "compressed", "label": f"compressed, Tucker {args.rank_ratio:g} ({args.engine})",
             "path": compressed, "env": engine},
            {"key": "original_int8", "label": f"original ({args.engine} INT8)", "path": original_int8,
             "env": engine},
            {"key": "compressed_int8", "label": f"compressed, Tucker {args.rank_ratio:g} ({args.engine} INT8)",
             "path": compressed_int8, "env": engine}]
    return [h for h in homes if h["key"] in args.homes]


def int8_options(args, work: Path) -> list[str]:
    """`totalseg` options of the INT8 homes: --int8, the calibration CTs (a synthetic phantom unless given) and
    --int8-options (an open Dice budget for the stand-in's random weights)."""
    images = args.calibration_images
    if images is None:
        images = work / f"calibration_{'x'.join(map(str, args.calibration_size))}_{args.spacing:g}mm"
        if not (images / "phantom_0000.nii.gz").is_file():
            write_synthetic_ct(images / "phantom_0000.nii.gz", tuple(args.calibration_size), args.spacing, seed=1)
    extra = args.int8_options if args.int8_options is not None else \
        ("" if args.source_home else STANDIN_INT8_OPTIONS)
    return ["--int8", "--calibration-images", str(images.resolve()), *shlex.split(extra)]


def prepare_engine(home: dict, task: str, env: dict, logs: Path) -> float:
    """``nnunet-compress prepare-engine`` on every model folder of the home (what ``totalseg`` does after writing
    it), into the benchmark's cache; returns the wall seconds of all of them."""
    from nnunet_compress.totalseg.home import task_models
    t0 = time.perf_counter()
    for m in task_models([task]):
        cmd = [sys.executable, "-m", "nnunet_compress.cli", "prepare-engine", str(home["path"] / HOME_RESULTS /
                                                                                m.model_folder)]
        run_child(cmd, dict(env, **home["env"]), logs / f"{home['key']}_prepare_{m.dataset_id}.log")
    elapsed = time.perf_counter() - t0
    print(f"  {home['label']:<34} prepare-engine: {elapsed:6.1f} s", flush=True)
    return elapsed


def derive(source_home: Path, target: Path, task: str, options: list[str]) -> None:
    """`nnunet-compress totalseg` of `source_home` into `target`, unless a run with the same source is there.

    ``--no-engine-cache``: the benchmark prepares the engine itself, timed, into its own cache (not the user's)."""
    summary = target / "nnunet_compress_totalseg.json"
    if summary.is_file() and json.loads(summary.read_text())["source_results"] == \
            str((source_home / HOME_RESULTS).resolve()):
        return
    cmd = [sys.executable, "-m", "nnunet_compress.cli", "totalseg", "--task", task, "--source-home",
           str(source_home), "-o", str(target), "--overwrite", "--no-engine-cache", *options]
    print("$ nnunet-compress " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------------- inputs

def write_synthetic_ct(path: Path, size_xyz: tuple[int, int, int], spacing_mm: float, seed: int = 0) -> None:
    """A CT-like volume in HU (int16) for timing: air, body with fat rim, lungs, liver, spine, noise.

    Built slice by slice (nnunet_compress.nnunet.synthetic's phantoms hold several full-volume float grids, gigabytes at
    whole-body size). Anatomy is crude on purpose: only the size and a CT's intensity range matter for timing.
    """
    import SimpleITK as sitk
    nx, ny, nz = size_xyz
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    u, v = (x - nx / 2) / (0.42 * nx), (y - ny / 2) / (0.32 * ny)
    body, inner = u ** 2 + v ** 2 < 1, u ** 2 + v ** 2 < 0.85
    spine = ((x - nx / 2) / (0.05 * nx)) ** 2 + ((y - 0.72 * ny) / (0.05 * ny)) ** 2 < 1
    lungs = ((np.abs(u) - 0.45) / 0.33) ** 2 + (v / 0.6) ** 2 < 1
    liver = ((u + 0.35) / 0.4) ** 2 + ((v + 0.1) / 0.5) ** 2 < 1
    volume = np.empty((nz, ny, nx), dtype=np.int16)
    for z in range(nz):
        t = z / max(nz - 1, 1)  # 0: feet ... 1: head; lungs in the upper third, liver just below
        s = np.full((ny, nx), -1000.0, dtype=np.float32)
        s[body], s[inner] = -100.0, 40.0
        if 0.6 < t < 0.9:
            s[lungs & inner] = -850.0
        if 0.45 < t < 0.62:
            s[liver & inner] = 60.0
        s[spine] = 700.0
        s += rng.normal(0.0, 20.0, size=s.shape).astype(np.float32)
        volume[z] = np.clip(s, -1024, 3071)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((spacing_mm,) * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def describe_ct(path: Path) -> dict:
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {"path": str(path), "size": "×".join(map(str, reader.GetSize())),
            "spacing": "×".join(f"{s:g}" for s in reader.GetSpacing())}


def voxel_agreement(a: str, b: str) -> float:
    """Fraction of voxels with the same label in two multi-label outputs."""
    import SimpleITK as sitk
    x, y = (sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in (a, b))
    return float(np.mean(x == y))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("TotalSegmentator", "nnunetv2", "torch", "openvino"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------------ runs

def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd`; wall time, CPU time (user + system, reaped descendants included) and peak RSS of the child."""
    with open(log, "w") as f:
        spawn = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        exited = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime,
            "system_s": usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2 ** 20, "spawn": spawn, "exit": exited}


def stages(timings: dict, result: dict) -> dict:
    """Exclusive stages (seconds, summing to the wall time) and some "of which" details, from the driver's events."""
    if timings["network_attempts"]:
        raise SystemExit(f"TotalSegmentator tried to reach the network: {timings['network_attempts']}")
    ev = timings["events"]
    main, main_end = ev["main"][0][0], ev["main_end"][0][0]
    image = ev["predict_image"][-1]  # the task's own call (crop models, where a task has them, come first)

    def inside(name, lo=image[0], hi=image[1]):
        return [e for e in ev.get(name, []) if lo <= e[0] and e[1] <= hi]

    def total(spans):
        return sum(b - a for a, b in spans)

    preds = inside("nnunetv2_predict")
    resample_in = total(inside("change_spacing", hi=preds[0][0]))
    resample_out = total(inside("change_spacing", lo=preds[-1][1]))
    net_first, net_rest = 0.0, 0.0
    for lo, hi in preds:  # the first patch of each model: the engine loads or converts and compiles there
        calls = inside("network", lo, hi)
        net_first += total(calls[:1])
        net_rest += total(calls[1:])
    window, files, load = inside("sliding_window"), inside("predict_from_files"), inside("model_load")
    # before a predict_from_files call's first sliding window: preprocessing; after it, and between windows
    # (more than one image: TotalSegmentator splits very large CTs in three), export
    preprocessing = sum(inside("sliding_window", *f)[0][0] - f[0] for f in files)
    export = total(files) - total(window) - preprocessing
    s = {
        "Python start": timings["start"] - result["spawn"],
        "imports (TotalSegmentator CLI: torch, nibabel, ...)": main - timings["start"],
        "TotalSegmentator set-up (arguments, config, nnU-Net imports)": image[0] - main,
        "read CT, reorient, write nnU-Net input": preds[0][0] - image[0] - resample_in,
        "resampling to the model's spacing": resample_in,
        "model load": total(load),
        "nnU-Net preprocessing (worker start, crop, normalise)": preprocessing,
        "network, first patch of each model (engine load/compile)": net_first,
        "network, other patches": net_rest,
        "sliding-window bookkeeping (weights, padding, Gaussian, sums)": total(window) - net_first - net_rest,
        "nnU-Net export (logits to labels, write) and worker shutdown": export,
        "nnU-Net other (predictor set-up)": total(preds) - total(load) - total(files),
        "combining part models": preds[-1][1] - preds[0][0] - total(preds),
        "post-processing and saving": image[1] - preds[-1][1] - resample_out,
        "resampling back to the CT's spacing": resample_out,
        "after the segmentation (counter, statistics)": main_end - image[1],
        "process exit (temp files, workers)": result["exit"] - main_end,
    }
    details = {
        "set-up: import TotalSegmentator's nnU-Net module": ev["patched"][0][0] - ev["setup_done"][0][0],
        "model load: read checkpoint (torch.load)": total(inside("torch_load", *_span(load))),
        "model load: find trainer class": total(inside("find_trainer_class")),
        "model load: build network": total(inside("build_network")),
        "model load: build network: import its class (pydoc.locate)": total(inside("locate_class", *_span(load))),
    }
    return {"stages": s, "details": details, "sum_s": sum(s.values())}


def _span(spans):
    return (spans[0][0], spans[-1][1]) if spans else (0.0, 0.0)


# ---------------------------------------------------------------------------------------------------- report

def markdown(report) -> str:
    homes = report["homes"]
    medians = {h["key"]: statistics.median(r["wall_s"] for r in h["runs"]) for h in homes}
    bases = [(key, label) for key, label in (("original_torch", "original (torch)"),
                                             ("original_engine", "original (engine)"),
                                             ("original_int8", "original (engine INT8)")) if key in medians]
    runs = report["runs"]
    warmup = report.get("warmup_ct")
    converts = "" if report.get("prepared") else " (conversion)"
    first = f"first run{converts} s" if not warmup else f"first run on {warmup['size']} voxels{converts} s"
    lines = [f"### TotalSegmentator CLI end to end, `{report['task']}`, CT {report['ct']['size']} at "
             f"{report['ct']['spacing']} mm, CPU {report['cpu']}\n",
             f"`{report['command']}`; weights: {report['weights']}; median of {runs} run(s) per home after one "
             f"first run (its own column), interleaved; CPU time includes nnU-Net's worker processes; peak RSS of "
             f"the largest process.\n",
             f"| home | prepare-engine at install s | {first} | " + " | ".join(f"run {i + 1} s" for i in range(runs)) +
             " | median wall s | median CPU-s | peak RSS GB | " + "".join(f"× vs {label} | " for _, label in bases) +
             f"voxels as {homes[0]['label']} |",
             "|---|---:|---:|" + "---:|" * runs + "---:|---:|---:|" + "---:|" * len(bases) + "---:|"]
    for h in homes:
        wall = statistics.median(r["wall_s"] for r in h["runs"])
        cpu = statistics.median(r["cpu_s"] for r in h["runs"])
        rss = max(r["peak_rss_gb"] for r in h["runs"])
        prepared = "–" if h.get("prepare_s") is None else f"{h['prepare_s']:.1f}"
        lines.append(f"| {h['label']} | {prepared} | {h['first']['wall_s']:.1f} | " +
                     " | ".join(f"{r['wall_s']:.1f}" for r in h["runs"]) +
                     f" | {wall:.1f} | {cpu:.1f} | {rss:.2f} | " +
                     "".join(f"{medians[key] / wall:.2f} | " for key, _ in bases) +
                     f"{h['agreement_with_first_home']:.4f} |")
    if homes[0].get("breakdown"):
        n = len(homes[0]["breakdown"])
        lines += ["", f"#### Where the seconds go (median of {n} run(s) with stage timers, wall seconds)\n",
                  "| stage | " + " | ".join(h["label"] for h in homes) + " |",
                  "|---|" + "---:|" * len(homes)]
        for part in ("stages", "details"):
            for name in homes[0]["breakdown"][0]["stages"][part]:
                values = [statistics.median(b["stages"][part][name] for b in h["breakdown"]) for h in homes]
                label = name if part == "stages" else f"↳ {name}"
                lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
            if part == "stages":
                sums = [statistics.median(b["stages"]["sum_s"] for b in h["breakdown"]) for h in homes]
                walls = [statistics.median(b["wall_s"] for b in h["breakdown"]) for h in homes]
                lines.append("| **total (sum of stages)** | " + " | ".join(f"**{v:.2f}**" for v in sums) + " |")
                lines.append("| wall time of these runs | " + " | ".join(f"{v:.2f}" for v in walls) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
