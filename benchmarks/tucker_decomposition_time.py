"""How long the Tucker-2 decomposition of a TotalSegmentator-sized network takes, per layer and in total.

    .venv/bin/python benchmarks/tucker_decomposition_time.py [--arch 3mm|1.5mm] [--ratio 0.3] [--json out.json]

For every conv the paper's setting factorises (rank R = min(C, max(8, ceil(C * ratio))) on both channel modes,
stem and 1x1x1 heads included), it runs, side by side in one process:

* ``tensorly``: ``partial_tucker`` with its defaults (HOSVD start by LAPACK SVD of each unfolding, then HOOI);
* ``ours``: :func:`nnunet_compress.tucker.decomposition.tucker2_factors`, the same ``partial_tucker`` with the HOSVD start
  computed from the small Gram matrix (``tucker.gram_svd``).

and prints seconds and relative reconstruction errors of both. The weights are nnU-Net's random initialisation
(TotalSegmentator's weights cannot be downloaded here); a random kernel has no low-rank structure, so HOOI takes
more iterations on it than on a trained one, and the times are an upper bound for real models. The two columns
are measured in the same run, so their ratio holds on a noisy shared machine; absolute seconds do not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import tensorly as tl
from tensorly.decomposition import partial_tucker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from totalseg_architecture_table import build, paper_policy  # noqa: E402

from nnunet_compress.totalseg.shapes import ARCH_1_5MM_ORGANS, ARCH_3MM  # noqa: E402
from nnunet_compress.tucker.decomposition import channel_modes, tucker2_factors  # noqa: E402
from nnunet_compress.workflows.tucker import choose_ranks  # noqa: E402

ARCHS = {"3mm": ARCH_3MM, "1.5mm": ARCH_1_5MM_ORGANS}


def relative_error(weight: np.ndarray, core: np.ndarray, factor0: np.ndarray, factor1: np.ndarray) -> float:
    with tl.backend_context("numpy"):
        approx = tl.tenalg.multi_mode_dot(core, [factor0, factor1], modes=[0, 1])
    return float(np.linalg.norm(weight - approx) / np.linalg.norm(weight))


def tensorly_default(weight: np.ndarray, rank0: int, rank1: int):
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (core, factors), _ = partial_tucker(weight, rank=[rank0, rank1], modes=[0, 1], init="svd", random_state=0)
    return core, factors[0], factors[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="3mm")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--layers", type=int, default=None, help="only the N largest kernels (default: all)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tucker_decomposition_time.json")
    args = p.parse_args(argv)

    arch = ARCHS[args.arch]
    plans, ds, net = build(arch)
    ranks = choose_ranks(net, paper_policy(args.ratio), arch.patch_size)
    layers = sorted(ranks, key=lambda n: -net.get_submodule(n).weight.numel())[:args.layers]
    rows = []
    print(f"{arch.name}, rank ratio {args.ratio}: {len(layers)} of {len(ranks)} factorised convs")
    print(f"{'layer':<44} {'kernel':<22} {'ranks':<10} {'tensorly s':>10} {'ours s':>8} {'err tl':>8} {'err ours':>8}")
    for name in layers:
        conv = net.get_submodule(name)
        weight = conv.weight.detach().double().numpy()
        out_mode, _ = channel_modes(conv)
        r_out, r_in = ranks[name]
        r0, r1 = (r_out, r_in) if out_mode == 0 else (r_in, r_out)
        timings, errors = {}, {}
        for label, fn in (("tensorly", tensorly_default), ("ours", tucker2_factors)):
            t0 = time.perf_counter()
            core, f0, f1 = fn(weight, r0, r1)
            timings[label] = time.perf_counter() - t0
            errors[label] = relative_error(weight, core, f0, f1)
        rows.append({"layer": name, "kernel": list(weight.shape), "ranks": [r0, r1], "seconds": timings,
                     "relative_error": errors})
        print(f"{name:<44} {'x'.join(map(str, weight.shape)):<22} {f'{r0},{r1}':<10} {timings['tensorly']:>10.2f} "
              f"{timings['ours']:>8.2f} {errors['tensorly']:>8.4f} {errors['ours']:>8.4f}", flush=True)
    total = {k: sum(r["seconds"][k] for r in rows) for k in ("tensorly", "ours")}
    print(f"{'total':<44} {'':<22} {'':<10} {total['tensorly']:>10.1f} {total['ours']:>8.1f}   "
          f"speed-up {total['tensorly'] / total['ours']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"arch": arch.name, "ratio": args.ratio, "rows": rows, "total_seconds": total},
                                    indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
