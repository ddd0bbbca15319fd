"""Tucker compression of nnU-Net models: rank policy -> compressed plans -> compressed model folder.

This is the nnU-Net side of :mod:`nnunet_compress.tucker.decomposition` (the maths) and :mod:`nnunet_compress.tucker.ranks` (rank
choice): it decides the ranks once per model (one plans.json describes one architecture, so every fold shares the
ranks chosen on the first fold's weights), writes the plans, decomposes every fold's weights and reports what each
layer cost before and after.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from nnunet_compress.costs import conv_costs, count_parameters, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet
from nnunet_compress.nnunet.calibration import preprocessed_cases, random_patches, synthetic_ct_cases
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    check_output_location,
    input_channels_of,
    load_fold_network,
    open_model_folder,
    write_json,
)
from nnunet_compress.nnunet.plans import resolved_configuration, tucker_plans
from nnunet_compress.tucker import ranks as R
from nnunet_compress.tucker.budget_guard import guard_budget_ranks, layer_sensitivities
from nnunet_compress.tucker.ranks import RankPolicy, rank_floor
from nnunet_compress.workflows.derived_folder import rebuilt_from_plans, write_derived_model_folder


@dataclass
class RankSelection:
    """The chosen ranks, and for budget policies what the guard compared (None otherwise or when it is off)."""

    ranks: dict[str, tuple[int, int]]
    guard: dict | None = None


def choose_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...],
                 calibration=None, progress=print) -> dict[str, tuple[int, int]]:
    """Ranks for every layer to factorise; layers where factorising would not be cheaper are left out."""
    return select_ranks(net, policy, patch_size, calibration, progress).ranks


def select_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...], calibration=None,
                 progress=print) -> RankSelection:
    """Ranks by `policy`; budget policies are checked against the uniform ratio of the same cost.

    calibration: a callable returning (list of input batches, description) for the budget policies' guard and
    sensitivities, called only when they need it (the patches cost a preprocessing run); None uses synthetic CT
    phantoms without plans (a bare network: z-scored HU).
    """
    policy.validate()
    candidates, layers, io_shapes = _policy_ranks(net, policy, patch_size, calibration)
    if not policy.is_budget:
        return RankSelection(candidates)
    if len(candidates) == 1 and not policy.guard:
        return RankSelection(next(iter(candidates.values())))
    metric, target, base = _budget_terms(net, policy, io_shapes)
    batches, source = _calibration_batches(net, patch_size, policy, calibration)
    ranks, decision = guard_budget_ranks(net, layers, candidates, io_shapes, base, metric, target, policy.min_rank,
                                         policy.multiple, batches, source, compare_uniform=policy.guard)
    progress(decision.line())
    return RankSelection(ranks, decision.to_dict())


def _budget_terms(net: nn.Module, policy: RankPolicy, io_shapes: dict) -> tuple[str, float, int]:
    """(metric, target fraction, the whole network's total in that metric) of a budget policy."""
    if policy.kind() == "target_params":
        return "params", policy.target_params, count_parameters(net)
    return "flops", policy.target_flops, total_macs(net, io_shapes)


_CALIBRATION_CACHE_ATTR = "_nnunet_compress_calibration"


def _calibration_batches(net: nn.Module, patch_size, policy: RankPolicy, calibration) -> tuple[list, str]:
    """The calibration batches, made once per selection (the sensitivities and the guard share them)."""
    if calibration is None:
        calibration = synthetic_calibration(None, None, None, _stem_channels(net), patch_size,
                                            policy.calibration_patches, policy.calibration_seed)
    cached = getattr(calibration, _CALIBRATION_CACHE_ATTR, None)
    if cached is None:
        cached = calibration()
        try:
            setattr(calibration, _CALIBRATION_CACHE_ATTR, cached)
        except AttributeError:  # e.g. a bound method: no cache, the caller's source is called again
            pass
    return cached


def _stem_channels(net: nn.Module) -> int:
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    raise CompressError("the network has no convolution; is this an nnU-Net network?")


def calibration_source(images, plans: dict, dataset_json: dict, configuration: str, channels: int, patch_size,
                       count: int, seed: int = 0):
    """The calibration of a model: the user's images when given (-i), else synthetic CT phantoms; both through
    nnU-Net's preprocessing with the model's plans."""
    if images is not None:
        return image_calibration(images, plans, dataset_json, configuration, patch_size, count, seed)
    return synthetic_calibration(plans, dataset_json, configuration, channels, patch_size, count, seed)


def synthetic_calibration(plans: dict | None, dataset_json: dict | None, configuration: str | None,
                          channels: int, patch_size, count: int, seed: int = 0):
    """A calibration source of `count` single-patch batches cut from synthetic CT phantoms."""
    def make():
        volumes = synthetic_ct_cases(plans, dataset_json, configuration, channels, count=2, seed=seed)
        return random_patches(volumes, patch_size, count, batch_size=1, seed=seed), "synthetic CT"
    return make


def image_calibration(images, plans: dict, dataset_json: dict, configuration: str, patch_size, count: int,
                      seed: int = 0):
    """A calibration source of `count` single-patch batches cut from the user's images (-i), preprocessed."""
    def make():
        from pathlib import Path as _Path

        volumes = preprocessed_cases(_Path(images), plans, dataset_json, configuration)
        return random_patches(volumes, patch_size, count, batch_size=1, seed=seed), "image"
    return make


def _policy_ranks(net: nn.Module, policy: RankPolicy, patch_size, calibration) -> tuple[dict, dict, dict]:
    """(ranks, decomposable layers, io shapes) by the policy alone, before any guard; for a budget policy the
    ranks are a dict of candidate allocations by name, for the guard to choose from."""

    kind = policy.kind()
    layers = R.decomposable_layers(net, include_stem=policy.include_stem, include_pointwise=policy.include_pointwise)
    io_shapes = layer_io_shapes(net, tuple(patch_size))
    only_cheaper = not policy.replace_all
    if kind == "ranks":
        all_layers = R.decomposable_layers(net, include_stem=True, include_pointwise=True)
        return R.ranks_fixed(all_layers, policy.ranks, io_shapes=io_shapes, only_cheaper=only_cheaper,
                             min_rank=policy.min_rank, multiple=policy.multiple), all_layers, io_shapes
    if kind == "ratio":
        return R.ranks_by_ratio(layers, policy.ratio, min_rank=policy.min_rank, multiple=policy.multiple,
                                io_shapes=io_shapes, only_cheaper=only_cheaper), layers, io_shapes
    if kind == "energy":
        return R.ranks_by_energy(layers, policy.energy, multiple=policy.multiple, io_shapes=io_shapes,
                                 only_cheaper=only_cheaper, min_rank=policy.min_rank), layers, io_shapes
    return _budget_candidates(net, policy, patch_size, calibration, layers, io_shapes), layers, io_shapes


def _budget_candidates(net: nn.Module, policy: RankPolicy, patch_size, calibration, layers: dict,
                       io_shapes: dict) -> dict[str, dict]:
    """The budget allocations `policy.budget_error` asks for, by name ("kernel", "sensitivity" or both)."""
    metric, target, _ = _budget_terms(net, policy, io_shapes)
    params, macs = count_parameters(net), total_macs(net, io_shapes)
    R.check_budget_reachable(layers, io_shapes, params, macs, target, metric, policy.multiple,
                             policy.min_rank)  # fail before measuring anything
    kinds = ("kernel", "sensitivity") if policy.budget_error == "best" else (policy.budget_error,)
    candidates = {}
    for kind in kinds:
        weights = None
        if kind == "sensitivity":
            batches, _ = _calibration_batches(net, patch_size, policy, calibration)
            weights = layer_sensitivities(net, {n: c for n, c in layers.items() if n in io_shapes}, batches,
                                          seed=policy.calibration_seed)
        candidates[kind] = R.ranks_for_budget(layers, io_shapes, params, macs, target, metric=metric,
                                              multiple=policy.multiple, min_rank=policy.min_rank, weights=weights)
    return candidates


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
        if self.floor_layers:
            lines += [self.floor_summary() + "; they are marked `floor` below.", ""]
        lines += ["| layer | kernel (out, in, k) | ranks (out, in) | at floor | params before | after | MFLOPs before "
                  "| after | rel. error (first fold) |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in self.layers:
            floor = "floor: " + "+".join(r.at_floor) if r.at_floor else ""
            lines.append(f"| {r.name} | {r.shape} | {r.ranks} | {floor} | {r.params_before:,} | {r.params_after:,} | "
                         f"{r.flops_before / 1e6:.1f} | {r.flops_after / 1e6:.1f} | {r.relative_error:.4f} |")
        return "\n".join(lines) + "\n"


def build_report(base_net: nn.Module, ranks: dict, errors: dict[str, float], patch_size, policy: RankPolicy,
                 configuration: str) -> TuckerReport:
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
                             modes_at_floor(conv, (int(r_out), int(r_in)), policy.min_rank, policy.multiple)))
    params = count_parameters(base_net)
    flops = 2 * total_macs(base_net, io_shapes)
    floor = {"min_rank": policy.min_rank, "multiple": policy.multiple,
             "layers": [r.name for r in rows if r.at_floor]}
    return TuckerReport(policy.to_dict(), configuration, list(patch_size), params, params - saved_params, flops,
                        flops - 2 * saved_macs, rows, rank_floor=floor)


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
    plans = tucker_plans(folder.plans, configuration, ranks, policy, folder.plans.get("plans_name", "nnUNetPlans"),
                         budget_guard=selection.guard)
    progress(f"factorising {len(ranks)} layers of {source} ({configuration}); folds: {', '.join(fold_names)}")
    reports: list[TuckerReport] = []

    def on_fold(fold: str, parent: nn.Module, errors: dict) -> None:
        if not reports:
            reports.append(build_report(parent, ranks, errors, patch_size, policy, configuration))
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

