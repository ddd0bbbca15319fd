"""Parameters and GFLOPs of TotalSegmentator's networks at each Tucker rank factor, beside the paper's figures.

    .venv/bin/python -m benchmarks.totalseg_architecture_table [--json out.json] [--check-patch 32]

So that anyone can check our counts against Weber et al.'s published ones (docs/totalsegmentator_architecture.md),
this builds the 1.5 mm part model (6 stages 32-64-128-256-320-320, 25 outputs: organs) and the 3 mm ``--fast`` model
(5 stages, 118 outputs) from nnU-Net plans with nnU-Net's own ``get_network_from_plans`` (random weights: counts
depend on shapes only) and, for every rank factor of the paper's grid, applies the paper's setting: rank R = min(C,
max(8, ceil(C * f))) on both channel modes of EVERY Conv3d/ConvTranspose3d, stem and 1x1x1 heads included, even
where the factorisation is not cheaper, i.e. ``RankPolicy(ratio=f, min_rank=8, include_stem=True,
include_pointwise=True, replace_all=True)``.

How the numbers are counted (the paper used fvcore, which counts one multiply-add as one FLOP):
* GFLOPs = multiply-accumulates of all convolutions for one patch, counted ANALYTICALLY from each layer's input
  and output size (``costs.layer_io_shapes``, a shapes-only pass on the 'meta' device) and its kernel and ranks
  (``costs.conv_costs``). A real 128^3 forward of a 31 M-parameter network on a 2-core CPU takes minutes and tens
  of GB; the analytic count is exact for convolutions and is cross-checked here against torch's
  ``FlopCounterMode`` (divided by two) on a real forward of the actually built compressed network at a small
  patch (``--check-patch``). Like fvcore's conv handler, biases are not counted. fvcore also books 5 FLOPs per
  element of an affine InstanceNorm (its default norm handler); the "fvcore GFLOPs" column adds that term
  (counted with forward hooks on the meta device) and reproduces the published 480.6 / 65.0 / 369.1.
* Parameters are counted on the actually built (compressed) network, once in full and once without the
  deep-supervision heads of the lower decoder stages, which nnU-Net builds but never runs at inference; the paper's
  31.19 M and 16.55 M are the latter.
* The 3 mm model's published GFLOPs (369.1) match its own patch 112x112x128 (= 0.766 of 128^3), not 128^3; both
  are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from nnunet_compress.costs import conv_costs, count_flops, count_parameters, layer_io_shapes, total_macs
from nnunet_compress.nnunet.model_folder import build_network
from nnunet_compress.nnunet.plans import tucker_plans
from nnunet_compress.totalseg.shapes import (
    ARCH_1_5MM_ORGANS,
    ARCH_3MM,
    PUBLISHED,
    Architecture,
    dataset_json,
    old_format_plans,
)
from nnunet_compress.tucker.ranks import RankPolicy
from nnunet_compress.workflows.tucker import choose_ranks

GRID = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
CONFIGURATION = "3d_fullres"


def paper_policy(factor: float) -> RankPolicy:
    return RankPolicy(ratio=factor, min_rank=8, include_stem=True, include_pointwise=True, replace_all=True)


def build(arch: Architecture):
    """(plans, dataset.json, network) of `arch` as nnU-Net builds it from plans."""
    plans = old_format_plans(f"Dataset000_{arch.name.split()[0]}", arch)
    ds = dataset_json({i: f"class_{i}" for i in range(1, arch.num_outputs)})
    return plans, ds, build_network(plans, ds, CONFIGURATION).eval()


def analytic_macs(net, ranks: dict | None, patch) -> int:
    """Conv multiply-accumulates of `net` (uncompressed) with `ranks` applied to its layers."""
    io = layer_io_shapes(net, tuple(patch))
    macs = total_macs(net, io)
    for name, pair in (ranks or {}).items():
        if name not in io:  # deep-supervision heads of lower stages do not run at inference: no FLOPs
            continue
        conv = net.get_submodule(name)
        macs += conv_costs(conv, *io[name], ranks=tuple(pair))[1] - conv_costs(conv, *io[name])[1]
    return macs


def norm_elements(net, patch) -> int:
    """Elements normalised by InstanceNorm in one forward (fvcore books 5 FLOPs per element of an affine norm)."""
    shadow = copy.deepcopy(net).to("meta")
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: total.__setitem__(0, total[0] + out.numel()))
             for m in shadow.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    with torch.no_grad():
        shadow(torch.zeros((1, 1, *patch), device="meta"))
    for h in hooks:
        h.remove()
    return total[0]


def inference_parameters(net) -> int:
    """Parameters of the modules that run at inference: without the deep-supervision heads of the lower decoder
    stages, which nnU-Net builds but does not run when deep supervision is off (the paper's counts leave them out:
    31.19 M = all 31.21 M minus these heads)."""
    heads = net.decoder.seg_layers
    unused = {id(p) for head in list(heads)[:-1] for p in head.parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in unused)


def compressed_network(plans, ds, ranks, factor):
    cplans = tucker_plans(plans, CONFIGURATION, ranks, paper_policy(factor), "nnUNetPlans")
    return build_network(cplans, ds, CONFIGURATION).eval()


def cross_check(net, compressed, ranks, patch) -> float:
    """Largest relative gap between analytic MACs and FlopCounterMode/2 on a real forward at `patch`."""
    gaps = []
    for model, r in ((net, None), (compressed, ranks)):
        analytic = analytic_macs(net, r, patch)
        counted = count_flops(model.eval(), torch.zeros((1, 1, *patch)))[0] / 2
        gaps.append(abs(analytic - counted) / counted)
    return max(gaps)


def rows_for(arch: Architecture, check_patch: int, progress) -> list[dict]:
    plans, ds, net = build(arch)
    patch128 = (128, 128, 128)
    # InstanceNorm sees the same elements before and after factorisation (ranks change no feature-map size)
    fvcore_norm_gflops = 5 * norm_elements(net, arch.patch_size) / 1e9
    rows = [{"architecture": arch.name, "factor": None, "params": count_parameters(net),
             "params_inference": inference_parameters(net),
             "gmacs_128": analytic_macs(net, None, patch128) / 1e9,
             "gmacs_native": analytic_macs(net, None, arch.patch_size) / 1e9,
             "fvcore_gflops_native": analytic_macs(net, None, arch.patch_size) / 1e9 + fvcore_norm_gflops,
             "layers": 0, "check_gap": None}]
    for factor in GRID:
        t0 = time.perf_counter()
        ranks = choose_ranks(net, paper_policy(factor), arch.patch_size)
        compressed = compressed_network(plans, ds, ranks, factor)
        native = analytic_macs(net, ranks, arch.patch_size) / 1e9
        row = {"architecture": arch.name, "factor": factor, "params": count_parameters(compressed),
               "params_inference": inference_parameters(compressed),
               "gmacs_128": analytic_macs(net, ranks, patch128) / 1e9, "gmacs_native": native,
               "fvcore_gflops_native": native + fvcore_norm_gflops, "layers": len(ranks), "check_gap": None}
        if check_patch:
            row["check_gap"] = cross_check(net, compressed, ranks, (check_patch,) * 3)
        rows.append(row)
        progress(f"  {arch.name} factor {factor}: {row['params'] / 1e6:.2f} M params, "
                 f"{row['gmacs_128']:.1f} GFLOPs/128^3 ({time.perf_counter() - t0:.1f} s)")
    return rows


def published(arch_name: str, key: str, factor) -> float | None:
    return PUBLISHED.get(arch_name, {}).get(key, {}).get(factor)


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | rank factor | layers factorised | params, all (M) | params run at inference (M) "
             "| paper params (M) | conv GMACs / 128^3 | conv GMACs / native patch | fvcore GFLOPs / native patch "
             "| paper GFLOPs | max gap analytic vs FlopCounterMode |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p_params, p_flops = published(r["architecture"], "params_M", r["factor"]), \
            published(r["architecture"], "GFLOPs", r["factor"])
        lines.append(
            f"| {r['architecture']} | {'none' if r['factor'] is None else r['factor']} | {r['layers']} | "
            f"{r['params'] / 1e6:.2f} | {r['params_inference'] / 1e6:.2f} | {'' if p_params is None else format(p_params, '.2f')} | {r['gmacs_128']:.1f} | "
            f"{r['gmacs_native']:.1f} | {r['fvcore_gflops_native']:.1f} | {'' if p_flops is None else format(p_flops, '.1f')} | "
            f"{'' if r['check_gap'] is None else format(r['check_gap'], '.1e')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--check-patch", type=int, default=64,
                        help="edge of the patch for the FlopCounterMode cross-check (a multiple of 32 from 64 on: "
                             "InstanceNorm needs more than one voxel at the 1/32 bottleneck; 0 = skip)")
    args = parser.parse_args(argv)
    if args.check_patch and (args.check_patch % 32 or args.check_patch < 64):
        parser.error("--check-patch must be 0 or a multiple of 32 of at least 64 (five stride-2 stages)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", message="Detected old nnU-Net plans format")  # our plans are old-format
    rows = []
    for arch in (ARCH_1_5MM_ORGANS, ARCH_3MM):
        rows += rows_for(arch, args.check_patch, lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(rows))
    print("\nconv GMACs: convolution multiply-accumulates / 1e9 (torch's FlopCounterMode counts twice as many). "
          "fvcore GFLOPs: conv MACs + 5 per InstanceNorm element, fvcore's default counting, which the paper used. "
          "Native patch: 128^3 (1.5 mm), 112x112x128 (3 mm). Params run at inference: without the deep-supervision "
          "heads of the lower decoder stages (built by nnU-Net, unused at inference; the paper leaves them out).")
    if args.json:
        from nnunet_compress.nnunet.model_folder import atomic_write_file
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(args.json, lambda tmp: tmp.write_text(json.dumps(
            {"grid": GRID, "convention": "GFLOPs = conv multiply-accumulates / 1e9 (fvcore)", "rows": rows,
             "published": {k: {m: {str(f): v for f, v in d.items()} for m, d in p.items()}
                           for k, p in PUBLISHED.items()}}, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
