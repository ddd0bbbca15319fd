"""Tucker compression of nnU-Net models: rank policy -> compressed plans -> compressed model folder.

This is the nnU-Net side of :mod:`nnunet_compress.tucker.decomposition` (the maths): the ranks are chosen once
per model by :mod:`.rank_selection` (one plans.json describes one architecture, so every fold shares the ranks
chosen on the first fold's weights); here the plans are written, every fold's weights decomposed and what each
layer cost before and after reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from nnunet_compress.budgets.calibration import LatencyTerms
from nnunet_compress.budgets.cost_model import tucker_requirements
from nnunet_compress.budgets.measured import latency_terms, layer_seconds, measured_fraction
from nnunet_compress.costs import conv_costs, count_parameters, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet
from nnunet_compress.nnunet.calibration import (  # noqa: F401  (re-exported: the calibration of a model)
    calibration_source,
    image_calibration,
    synthetic_calibration,
)
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    check_output_location,
    input_channels_of,
    load_fold_network,
    open_model_folder,
    write_json,
)
from nnunet_compress.nnunet.plans import resolved_configuration, tucker_plans
from nnunet_compress.tucker.ranks import RankPolicy, rank_floor
from nnunet_compress.workflows.derived_folder import rebuilt_from_plans, write_derived_model_folder
from nnunet_compress.workflows.rank_selection import (  # noqa: F401  (re-exported for the callers of this module)
    BudgetTerms,
    RankSelection,
    factorised_copy,
    network_input_shape,
    rank_floors,
    select_ranks,
)


def choose_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...],
                 calibration=None, progress=print) -> dict[str, tuple[int, int]]:
    """The ranks alone of :func:`~nnunet_compress.workflows.rank_selection.select_ranks`."""
    return select_ranks(net, policy, patch_size, calibration, progress).ranks


@dataclass
class LayerRow:
    name: str
    shape: str
    ranks: list[int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    relative_error: float
    at_floor: list[str] = field(default_factory=list)  # modes ("out", "in") whose rank is the rank floor
    # budget policies: seconds of the layer on the CPU engine, predicted by the cost model and measured
    # (predicted_before / predicted_after / measured_before / measured_after)
    seconds: dict | None = None


def modes_at_floor(conv: nn.Module, ranks: tuple[int, int], min_rank: int, multiple: int) -> list[str]:
    """The channel modes whose rank sits at the floor (and below full rank).

    Why flag them: the floor is where a policy was stopped rather than where the layer's spectrum or the budget
    would have put it, so these are the layers to look at first when the compressed model loses quality (or
    the first candidates for a lower --min-rank when it does not).
    """
    flagged = []
    for mode, rank, channels in (("out", ranks[0], conv.out_channels), ("in", ranks[1], conv.in_channels)):
        floor = rank_floor(channels, min_rank, multiple)
        if rank == floor < channels:
            flagged.append(mode)
    return flagged


@dataclass
class TuckerReport:
    policy: dict
    configuration: str
    patch_size: list[int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers: list[LayerRow] = field(default_factory=list)
    folds: dict[str, dict[str, float]] = field(default_factory=dict)
    budget_guard: dict | None = None  # budget policies: both output changes and which ranks were kept
    rank_floor: dict = field(default_factory=dict)  # {"min_rank", "multiple", "layers": names at the floor}
    latency: dict | None = None  # budget policies: engine, cost model, the original's seconds, measured fraction

    @property
    def floor_layers(self) -> list[str]:
        return [r.name for r in self.layers if r.at_floor]

    def floor_summary(self) -> str:
        """One line naming the layers at the rank floor (empty when there are none)."""
        names = self.floor_layers
        if not names:
            return ""
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        return (f"{len(names)} layer(s) have a rank at the floor (--min-rank {self.rank_floor.get('min_rank')}): "
                f"{shown}")

    def to_markdown(self) -> str:
        lines = [f"# Tucker compression report ({self.configuration}, patch {self.patch_size})", "",
                 f"policy: `{json.dumps(self.policy)}`", "",
                 f"parameters: {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / self.params_before:.3f} of the original)",
                 f"GFLOPs per patch (torch counting): {self.flops_before / 1e9:.3f} -> {self.flops_after / 1e9:.3f} "
                 f"({self.flops_after / max(self.flops_before, 1):.3f} of the original)", ""]
        if self.budget_guard:
            g = self.budget_guard
            measured = "; ".join(
                f"{name}{' --rank-ratio ' + format(e['ratio'], '.4f') if 'ratio' in e else ''} "
                f"({e['cost']:.4f} of the {g['metric']}): {e['output_change']:.4f}" for name, e in g["candidates"].items())
            lines += [f"budget guard (relative change of the output logits on {g['patches']} {g['calibration']} "
                      f"patches): {measured}; kept: **{g['chosen']}** ranks", ""]
        if self.latency:
            lines += [latency_summary(self.latency), ""]
        if self.floor_layers:
            lines += [self.floor_summary() + "; they are marked `floor` below.", ""]
        timed = any(r.seconds for r in self.layers)
        seconds_head = " ms predicted before | after | ms measured before | after |" if timed else ""
        lines += ["| layer | kernel (out, in, k) | ranks (out, in) | at floor | params before | after | MFLOPs before "
                  "| after |" + seconds_head + " rel. error (first fold) |",
                  "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" * 4 if timed else "") + "---:|"]
        for r in self.layers:
            floor = "floor: " + "+".join(r.at_floor) if r.at_floor else ""
            seconds = ""
            if timed:
                t = r.seconds or {}
                seconds = " " + " | ".join(_ms(t.get(k)) for k in ("predicted_before", "predicted_after",
                                                                   "measured_before", "measured_after")) + " |"
            lines.append(f"| {r.name} | {r.shape} | {r.ranks} | {floor} | {r.params_before:,} | {r.params_after:,} | "
                         f"{r.flops_before / 1e6:.1f} | {r.flops_after / 1e6:.1f} |{seconds} {r.relative_error:.4f} |")
        return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def latency_summary(latency: dict) -> str:
    """One line: the engine, the original's seconds per patch and the kept ranks' measured fraction."""
    measured = latency.get("measured_fraction")
    rounds = latency.get("rounds") or []
    head = (f"time per patch on {latency['engine']} ({latency['threads']} threads): original "
            f"{latency['base_seconds']:.3f} s")
    if measured is not None:
        head += f", compressed {measured * latency['base_seconds']:.3f} s (measured {measured:.3f} of the original)"
    if rounds:
        head += (f"; cost model {latency['cost_model']}, {len(rounds)} calibration round(s): " +
                 ", ".join(f"predicted {r['predicted']:.3f} -> measured {r['measured']:.3f}" for r in rounds))
    return head


def build_report(base_net: nn.Module, ranks: dict, errors: dict[str, float], patch_size, policy: RankPolicy,
                 configuration: str, seconds: dict[str, dict] | None = None,
                 latency: dict | None = None) -> TuckerReport:
    """The per-layer report; `seconds` (layer -> predicted/measured seconds) and `latency` (the whole network's
    timing) come from :func:`budget_seconds` for budget policies."""
    io_shapes = layer_io_shapes(base_net, tuple(patch_size))
    rows, saved_params, saved_macs = [], 0, 0
    for name, (r_out, r_in) in ranks.items():
        conv = base_net.get_submodule(name)
        # deep-supervision heads of the lower stages exist but do not run at inference: parameters, no FLOPs
        ones = (1,) * len(conv.kernel_size)
        sizes = io_shapes.get(name, (ones, ones))
        p0, m0 = conv_costs(conv, *sizes)
        p1, m1 = conv_costs(conv, *sizes, ranks=(r_out, r_in))
        if name not in io_shapes:
            m0 = m1 = 0
        saved_params += p0 - p1
        saved_macs += m0 - m1
        shape = f"({conv.out_channels}, {conv.in_channels}, {'x'.join(map(str, conv.kernel_size))})"
        rows.append(LayerRow(name, shape, [int(r_out), int(r_in)], p0, p1, 2 * m0, 2 * m1,
                             float(errors.get(name, math.nan)),
                             modes_at_floor(conv, (int(r_out), int(r_in)), policy.min_rank, policy.multiple),
                             (seconds or {}).get(name)))
    params = count_parameters(base_net)
    flops = 2 * total_macs(base_net, io_shapes)
    floor = {"min_rank": policy.min_rank, "multiple": policy.multiple,
             "layers": [r.name for r in rows if r.at_floor]}
    return TuckerReport(policy.to_dict(), configuration, list(patch_size), params, params - saved_params, flops,
                        flops - 2 * saved_macs, rows, rank_floor=floor, latency=latency)


def budget_seconds(net: nn.Module, ranks: dict, patch_size, policy: RankPolicy, latency: LatencyTerms | None,
                   progress=print) -> tuple[dict[str, dict], dict]:
    """Per-layer predicted and measured seconds of the kept ranks, and the whole network's timing, for the report
    of a budget policy. A params/FLOPs budget gets them too (a measured cost model, the network timed once), so
    that every budget's report says what its cut bought in seconds on this machine."""
    io_shapes = layer_io_shapes(net, tuple(patch_size))
    layers = {name: net.get_submodule(name) for name in ranks if name in io_shapes}
    if latency is None:
        input_shape = network_input_shape(net, patch_size)
        latency = latency_terms(net, input_shape, "measured",
                                lambda: tucker_requirements(layers, io_shapes, rank_floors(layers, policy)), progress)
        latency.measured_fraction = measured_fraction(net, factorised_copy(net, ranks), input_shape, latency)
    progress(f"timing the {len(layers)} factorised layers on {latency.engine} for the report")
    seconds = {name: layer_seconds(conv, *io_shapes[name], ranks[name], latency) for name, conv in layers.items()}
    return seconds, latency.to_dict()


def compress_model_folder(source: str | Path, output: str | Path, policy: RankPolicy, folds: list[str] | None,
                          configuration: str | None = None, overwrite: bool = False,
                          checkpoint_name: str = CHECKPOINT_FINAL, progress=print,
                          images: str | Path | None = None) -> TuckerReport:
    """Write a Tucker-compressed copy of a trained model folder; the source is only read.

    `images` (nnU-Net naming) calibrate the budget policies; without them synthetic CT phantoms do, both through
    nnU-Net's preprocessing with this model's plans. Nothing is written before the ranks are settled, so a budget
    the floor cannot meet leaves no output behind.
    """
    policy.validate()
    source, output = Path(source), Path(output)
    folder = open_model_folder(source, folds, checkpoint_name)
    check_output_location(folder.path, output)
    fold_names = list(folder.folds)
    first_net, first_ckpt, configuration = load_fold_network(folder, fold_names[0], configuration)
    if isinstance(first_net, CompressedUNet) and first_net.tucker_ranks:
        raise CompressError(f"{source} is already Tucker-compressed; compress its parent model instead")
    patch_size = tuple(resolved_configuration(folder.plans, configuration)["patch_size"])
    calibration = None
    if policy.is_budget:
        calibration = calibration_source(images, folder.plans, folder.dataset_json, configuration,
                                         input_channels_of(folder.plans, folder.dataset_json, configuration),
                                         patch_size, policy.calibration_patches, policy.calibration_seed)
    selection = select_ranks(first_net, policy, patch_size, calibration, progress)
    ranks = selection.ranks
    if not ranks:
        raise CompressError("with this policy no layer becomes cheaper when factorised; lower the ratio/target")
    seconds, latency = budget_seconds(first_net, ranks, patch_size, policy, selection.latency, progress) \
        if policy.is_budget else (None, None)
    plans = tucker_plans(folder.plans, configuration, ranks, policy, folder.plans.get("plans_name", "nnUNetPlans"),
                         budget_guard=selection.guard, latency=selection.latency.to_dict() if selection.latency else None)
    progress(f"factorising {len(ranks)} layers of {source} ({configuration}); folds: {', '.join(fold_names)}")
    reports: list[TuckerReport] = []

    def on_fold(fold: str, parent: nn.Module, errors: dict) -> None:
        if not reports:
            reports.append(build_report(parent, ranks, errors, patch_size, policy, configuration, seconds, latency))
            reports[0].budget_guard = selection.guard
            if reports[0].floor_layers:
                progress(reports[0].floor_summary())
        reports[0].folds[fold] = errors
        progress(f"  fold {fold}: done (mean relative error {mean(errors.values()):.4f})")

    def finish(tmp: Path) -> None:
        write_json(tmp / "compression_report.json", asdict(reports[0]))
        (tmp / "compression_report.md").write_text(reports[0].to_markdown())

    write_derived_model_folder(folder, output, configuration,
                               rebuilt_from_plans(plans, folder.dataset_json, configuration, on_fold), overwrite,
                               checkpoint_name, finish, first_fold=(first_net, first_ckpt))
    return reports[0]


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan

