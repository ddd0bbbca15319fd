"""Original vs compressed TotalSegmentator networks, timed side by side: one patch, and sliding-window prediction.

    python benchmarks/speed.py --arch 1.5mm --patch 96 96 96 --volume 144 144 144 --runs 5

For each architecture it builds the original PlainConvUNet, Tucker-factorised copies at several channel ratios
(each timed twice: plain torch paths and our fast paths, see nnunet_compress/fast_inference.py) and L1-pruned
copies with FLOPs comparable to each Tucker ratio. All variants are timed in ONE process, interleaved (variant A,
B, C, A, B, C, ...), and the median is reported: on a shared, noisy machine that is what keeps the ratios
meaningful. Outputs: a Markdown table on stdout, JSON (and the table) under benchmarks/results/.

FLOPs are torch's FlopCounterMode count (1 multiply-add = 2 FLOPs). "efficiency" = time ratio / FLOP ratio: 1.0
means wall-clock time falls exactly as the FLOPs do.

Sliding window: nnU-Net's own ``nnUNetPredictor.predict_sliding_window_return_logits`` (step 0.5, Gaussian
weighting, no mirroring, as TotalSegmentator's NoMirroring trainers predict), with the predictor's plans
objects replaced by the two attributes that method reads (patch size, number of outputs), so that no plans
files are needed. Weights are random (nnU-Net's He init): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.archs import (ARCHITECTURES, FastOriginal, as_compressed_unet, build_original, flops,  # noqa: E402
                              params, prune_to_ratio, tucker)
from nnunet_compress.fast_inference import plain_inference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_predictor(net, patch, num_classes, device):
    """nnU-Net's predictor, initialised by hand: only what predict_sliding_window_return_logits reads."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=num_classes)
    predictor.allowed_mirroring_axes = None
    return predictor


def sliding_window_patches(volume, patch) -> int:
    """Patches nnU-Net's sliding window (step 0.5) runs; a volume smaller than the patch is padded to it first."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    padded = tuple(max(v, p) for v, p in zip(volume, patch))
    steps = compute_steps_for_sliding_window(padded, tuple(patch), 0.5)
    return math.prod(len(s) for s in steps)


@contextlib.contextmanager
def mode(plain: bool):
    with plain_inference() if plain else contextlib.nullcontext():
        yield


def build_variants(arch, patch, ratios, multiple, prune, device):
    """(name, network, plain?) triples; pruned nets get a channel ratio matching each Tucker ratio's FLOPs.

    Compressed variants are CompressedUNet (what nnU-Net builds from compressed plans); each is timed twice, on
    torch's plain paths and with the fast paths that CompressedUNet.forward enables by default.
    """
    original = build_original(arch)
    base = as_compressed_unet(arch, original)
    variants = [("original", original, True), ("original+fast", FastOriginal(original), False)]
    f0 = flops(original, patch)
    for r in ratios:
        t = tucker(base, r, patch, multiple=multiple)
        variants += [(f"tucker{r}", t, True), (f"tucker{r}+fast", t, False)]
        if r in prune:
            keep = match_prune_ratio(base, flops(t, patch) / f0, patch)
            p = prune_to_ratio(base, keep)
            variants += [(f"pruned{keep:.3f}", p, True), (f"pruned{keep:.3f}+fast", p, False)]
    return [(name, net.to(device).eval(), plain) for name, net, plain in variants]


def match_prune_ratio(net, flop_target, patch, lo=0.05, hi=1.0) -> float:
    """Channel keep-ratio whose pruned net has about `flop_target` of the FLOPs (bisection on the real count)."""
    f0 = flops(net, patch)
    for _ in range(8):
        mid = (lo + hi) / 2
        if flops(prune_to_ratio(net, mid), patch) / f0 > flop_target:
            hi = mid
        else:
            lo = mid
    return round((lo + hi) / 2, 3)


def time_interleaved(variants, fn, runs, warmup=1):
    """Wall-clock and process-CPU seconds of fn(net) per variant, measured round-robin (A, B, C, A, B, C, ...)
    so that load spikes hit all variants alike. CPU time is reported too: on a shared machine it is far less
    disturbed by other processes than wall-clock time (it does not tick while we are descheduled)."""
    wall = {name: [] for name, _, _ in variants}
    cpu = {name: [] for name, _, _ in variants}
    for i in range(warmup + runs):
        for name, net, plain in variants:
            with mode(plain):
                c0, w0 = time.process_time(), time.perf_counter()
                fn(net)
                w1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
            print(f"  {name}: {w1 - w0:.3f} s wall, {c1 - c0:.3f} s cpu", file=sys.stderr, flush=True)
    return wall, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["1.5mm", "3mm"], choices=sorted(ARCHITECTURES))
    ap.add_argument("--patch", nargs=3, type=int, help="override the patch (default: the model's own)")
    ap.add_argument("--volume", nargs=3, type=int, help="sliding-window volume (voxels); omit to skip")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    ap.add_argument("--multiple", type=int, default=1, help="round Tucker ranks up to this multiple")
    ap.add_argument("--prune-ratios", nargs="*", type=float, default=None,
                    help="Tucker ratios to also match by pruning (default: all; none: no pruning)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sw-runs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    import os
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "runs": args.runs, "architectures": {}}
    for arch_name in args.arch:
        arch = ARCHITECTURES[arch_name]
        patch = tuple(args.patch) if args.patch else arch.patch
        prune = args.ratios if args.prune_ratios is None else args.prune_ratios
        variants = build_variants(arch, patch, args.ratios, args.multiple, prune, device)
        info = {name: {"flops": flops(net.cpu(), patch), "params": params(net)} for name, net, _ in variants}
        for _, net, _ in variants:
            net.to(device)
        x = torch.randn(1, 1, *patch, device=device)

        def one_patch(net):
            with torch.inference_mode():
                sync(device)
                net(x)
                sync(device)

        patch_times, patch_cpu = time_interleaved(variants, one_patch, args.runs)
        entry = {"patch": list(patch), "variants": {}}
        for name, _, _ in variants:
            entry["variants"][name] = {**info[name], "patch_s": statistics.median(patch_times[name]),
                                       "patch_cpu_s": statistics.median(patch_cpu[name]),
                                       "patch_runs_s": patch_times[name]}
        if args.volume:
            image = torch.randn(1, *args.volume)

            def sliding(net):
                predictor = make_predictor(net, patch, arch.num_classes, device)
                sync(device)
                predictor.predict_sliding_window_return_logits(image)
                sync(device)

            sw_times, sw_cpu = time_interleaved(variants, sliding, args.sw_runs, warmup=0)
            entry["volume"] = list(args.volume)
            entry["volume_patches"] = sliding_window_patches(args.volume, patch)
            for name in sw_times:
                entry["variants"][name]["volume_s"] = statistics.median(sw_times[name])
                entry["variants"][name]["volume_cpu_s"] = statistics.median(sw_cpu[name])
                entry["variants"][name]["volume_runs_s"] = sw_times[name]
        add_ratios(entry)
        report["architectures"][arch_name] = entry
        print(markdown(arch_name, entry, report["device"]), flush=True)
    tag = args.tag or f"{device.type}"
    out = RESULTS / f"speed_{tag}.json"
    out.write_text(json.dumps(report, indent=1))
    (RESULTS / f"speed_{tag}.md").write_text("\n\n".join(markdown(a, e, report["device"])
                                                         for a, e in report["architectures"].items()) + "\n")
    print(f"wrote {out}")
    return 0


def add_ratios(entry) -> None:
    """FLOP and time ratios against the plain original; efficiency = time ratio / FLOP ratio."""
    base = entry["variants"]["original"]
    for v in entry["variants"].values():
        v["flop_ratio"] = base["flops"] / v["flops"]
        for key in ("patch_s", "patch_cpu_s", "volume_s", "volume_cpu_s"):
            if key in v:
                ratio = base[key] / v[key]
                v[key[:-2] + "_time_ratio"] = ratio
                v[key[:-2] + "_efficiency"] = ratio / v["flop_ratio"]


def markdown(arch_name, entry, device) -> str:
    has_volume = "volume" in entry
    head = (f"### {arch_name}: patch {'×'.join(map(str, entry['patch']))}"
            + (f", sliding window over {'×'.join(map(str, entry['volume']))} ({entry['volume_patches']} patches)"
               if has_volume else "") + f" — {device}\n\n")
    cols = ("| variant | params (M) | GFLOPs | FLOP ratio | patch s | time ratio | efficiency | patch CPU-s "
            "| CPU-time ratio | efficiency |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_volume:
        cols += " volume s | time ratio | efficiency |"
        rule += "---:|---:|---:|"
    rows = [cols, rule]
    for name, v in entry["variants"].items():
        row = (f"| {name} | {v['params'] / 1e6:.2f} | {v['flops'] / 1e9:.1f} | {v['flop_ratio']:.2f} | "
               f"{v['patch_s']:.3f} | {v['patch_time_ratio']:.2f} | {v['patch_efficiency']:.2f} | "
               f"{v['patch_cpu_s']:.3f} | {v['patch_cpu_time_ratio']:.2f} | {v['patch_cpu_efficiency']:.2f} |")
        if has_volume:
            row += f" {v['volume_s']:.1f} | {v['volume_time_ratio']:.2f} | {v['volume_efficiency']:.2f} |"
        rows.append(row)
    return head + "\n".join(rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    raise SystemExit(main())
