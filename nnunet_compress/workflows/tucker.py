"""Tucker compression of nnU-Net models: rank policy -> compressed plans -> compressed model folder.

This is the nnU-Net side of :mod:`nnunet_compress.tucker.decomposition` (the maths) and :mod:`nnunet_compress.tucker.ranks` (rank
choice): it decides the ranks once per model (one plans.json describes one architecture, so every fold shares the
ranks chosen on the first fold's weights), writes the plans, decomposes every fold's weights and reports what each
layer cost before and after.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from nnunet_compress.costs import conv_costs, count_parameters, input_channels, layer_io_shapes, total_macs
from nnunet_compress.errors import CompressError
from nnunet_compress.inference.latency_model import tucker_requirements
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
from nnunet_compress.tucker.budget_guard import UNIFORM, guard_budget_ranks, layer_sensitivities, network_fraction
from nnunet_compress.tucker.decomposition import replace_convs
from nnunet_compress.tucker.ranks import RankPolicy, rank_floor
from nnunet_compress.workflows.derived_folder import rebuilt_from_plans, write_derived_model_folder
from nnunet_compress.workflows.latency_budget import (
    LatencyTerms,
    calibrated_allocation,
    latency_terms,
    layer_seconds,
    measured_fraction,
    measured_uniform,
)


@dataclass
class RankSelection:
    """The chosen ranks, and for budget policies what the guard compared (None otherwise or when it is off) and,
    for --target-latency, what the latency calibration measured."""

    ranks: dict[str, tuple[int, int]]
    guard: dict | None = None
    latency: LatencyTerms | None = None


@dataclass
class BudgetTerms:
    """What a budget policy spends: metric, target fraction of `base` (for seconds: the predicted goal that the
    measured calibration settled on), the per-layer cost (seconds only) and the latency measurements."""

    metric: str
    target: float
    base: float
    layer_cost: R.LayerCost | None = None
    latency: LatencyTerms | None = None


def choose_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...],
                 calibration=None, progress=print) -> dict[str, tuple[int, int]]:
    """Ranks for every layer to factorise; layers where factorising would not be cheaper are left out."""
    return select_ranks(net, policy, patch_size, calibration, progress).ranks


def select_ranks(net: nn.Module, policy: RankPolicy, patch_size: tuple[int, ...], calibration=None,
                 progress=print) -> RankSelection:
    """Ranks by `policy`; budget policies are checked against the uniform ratio of the same cost.

    calibration: a callable returning (list of input batches, description) for the budget policies' guard and
    sensitivities, called only when they need it (the patches cost a preprocessing run); None uses synthetic CT
    phantoms without plans (a bare network: z-scored HU). A latency budget also times the network on the CPU
    engine (:mod:`nnunet_compress.workflows.latency_budget`).
    """
    policy.validate()
    layers, io_shapes = _layers_and_shapes(net, policy, patch_size)
    if not policy.is_budget:
        return RankSelection(_policy_ranks(net, policy, layers, io_shapes))
    terms = _budget_terms(net, policy, layers, io_shapes, patch_size, progress)
    candidates = _budget_candidates(net, policy, patch_size, calibration, layers, io_shapes, terms, progress)
    if len(candidates) == 1 and not policy.guard:
        ranks, guard = next(iter(candidates.values())), None
    else:
        batches, source = _calibration_batches(net, patch_size, policy, calibration)
        ranks, decision = guard_budget_ranks(net, layers, candidates, io_shapes, terms.base, terms.metric,
                                             _guard_target(terms, layers, io_shapes, candidates), policy.min_rank, policy.multiple, batches, source,
                                             compare_uniform=policy.guard, layer_cost=terms.layer_cost)
        progress(decision.line())
        guard = decision.to_dict()
    if terms.latency is not None and ranks not in [r for r, _ in terms.latency.measured]:
        fraction = measured_fraction(net, factorised_copy(net, ranks), _input_shape(net, patch_size), terms.latency)
        terms.latency.measured.append((ranks, fraction))
        terms.latency.measured_fraction = fraction
        progress(f"latency budget: the kept ranks measured {fraction:.3f} of the original's time")
    return RankSelection(ranks, guard, terms.latency)


def _guard_target(terms: BudgetTerms, layers: dict, io_shapes: dict, candidates: dict) -> float:
    """The cost the uniform ratio may reach in the guard's comparison: the budget's target, or for seconds the
    budget ranks' own predicted cost where that is higher (a goal the floors stopped short of)."""
    if terms.metric != "seconds":
        return terms.target
    return max([terms.target] + [network_fraction(layers, r, io_shapes, terms.base, "seconds", terms.layer_cost)
                                 for r in candidates.values()])


def _layers_and_shapes(net: nn.Module, policy: RankPolicy, patch_size) -> tuple[dict, dict]:
    """The layers the policy may factorise (every conv for a ranks file) and every layer's input/output size."""
    if policy.kind() == "ranks":
        layers = R.decomposable_layers(net, include_stem=True, include_pointwise=True)
    else:
        layers = R.decomposable_layers(net, include_stem=policy.include_stem,
                                       include_pointwise=policy.include_pointwise)
    return layers, layer_io_shapes(net, tuple(patch_size))


def _input_shape(net: nn.Module, patch_size) -> tuple[int, ...]:
    return (input_channels(net), *tuple(int(s) for s in patch_size))


def factorised_copy(net: nn.Module, ranks: dict) -> nn.Module:
    """A copy of `net` with the factorised structure of `ranks` (default weights: timing depends on shapes only)."""
    compressed = copy.deepcopy(net)
    replace_convs(compressed, ranks, decompose=False)
    return compressed


def _rank_floors(layers: dict, policy: RankPolicy) -> dict[str, tuple[int, int]]:
    """Each layer's lowest allowed (rank_out, rank_in): where the latency model's timings must start."""
    return {n: (rank_floor(c.out_channels, policy.min_rank, policy.multiple),
                rank_floor(c.in_channels, policy.min_rank, policy.multiple)) for n, c in layers.items()}


def _budget_terms(net: nn.Module, policy: RankPolicy, layers: dict, io_shapes: dict, patch_size,
                  progress) -> BudgetTerms:
    """The budget's metric, target and base; for --target-latency the engine's timings of the original and the
    cost model (measured now, or read from this machine's cache)."""
    metric, target = policy.budget
    if metric == "params":
        return BudgetTerms(metric, target, count_parameters(net))
    if metric == "flops":
        return BudgetTerms(metric, target, total_macs(net, io_shapes))
    latency = latency_terms(net, _input_shape(net, patch_size), policy.cost_model,
                            lambda: tucker_requirements(layers, io_shapes, _rank_floors(layers, policy)), progress)
    return BudgetTerms(metric, target, latency.base_seconds, latency.layer_cost, latency)


_CALIBRATION_CACHE_ATTR = "_nnunet_compress_calibration"


def _calibration_batches(net: nn.Module, patch_size, policy: RankPolicy, calibration) -> tuple[list, str]:
    """The calibration batches, made once per selection (the sensitivities and the guard share them)."""
    if calibration is None:
        calibration = synthetic_calibration(None, None, None, input_channels(net), patch_size,
                                            policy.calibration_patches, policy.calibration_seed)
    cached = getattr(calibration, _CALIBRATION_CACHE_ATTR, None)
    if cached is None:
        cached = calibration()
        try:
            setattr(calibration, _CALIBRATION_CACHE_ATTR, cached)
        except AttributeError:  # e.g. a bound method: no cache, the caller's source is called again
            pass
    return cached


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


def _policy_ranks(net: nn.Module, policy: RankPolicy, layers: dict, io_shapes: dict) -> dict:
    """Ranks of the non-budget policies (ratio, energy, ranks file)."""
    kind = policy.kind()
    only_cheaper = not policy.replace_all
    if kind == "ranks":
        return R.ranks_fixed(layers, policy.ranks, io_shapes=io_shapes, only_cheaper=only_cheaper,
                             min_rank=policy.min_rank, multiple=policy.multiple)
    if kind == "ratio":
        return R.ranks_by_ratio(layers, policy.ratio, min_rank=policy.min_rank, multiple=policy.multiple,
                                io_shapes=io_shapes, only_cheaper=only_cheaper)
    return R.ranks_by_energy(layers, policy.energy, multiple=policy.multiple, io_shapes=io_shapes,
                             only_cheaper=only_cheaper, min_rank=policy.min_rank)


def _budget_candidates(net: nn.Module, policy: RankPolicy, patch_size, calibration, layers: dict,
                       io_shapes: dict, terms: BudgetTerms, progress=print) -> dict[str, dict]:
    """The budget allocations `policy.budget_error` asks for, by name ("kernel", "sensitivity" or both).

    A latency budget first finds, with the first of them, the predicted goal at which the whole network's
    MEASURED time meets the target (``terms.target`` becomes that goal), and allocates the others at it.
    """
    params, macs = count_parameters(net), total_macs(net, io_shapes)

    def allocate(kind: str, target: float) -> dict:
        weights = None
        if kind == "sensitivity":
            batches, _ = _calibration_batches(net, patch_size, policy, calibration)
            weights = layer_sensitivities(net, {n: c for n, c in layers.items() if n in io_shapes}, batches,
                                          seed=policy.calibration_seed)
        return R.ranks_for_budget(layers, io_shapes, params, macs, target, metric=terms.metric,
                                  multiple=policy.multiple, min_rank=policy.min_rank, weights=weights,
                                  base_seconds=terms.base, layer_cost=terms.layer_cost)

    if terms.metric != "seconds":  # fail before measuring anything (seconds: judged on the measured network)
        R.check_budget_reachable(layers, io_shapes, params, macs, terms.target, terms.metric, policy.multiple,
                                 policy.min_rank)
    kinds = ("kernel", "sensitivity") if policy.budget_error == "best" else (policy.budget_error,)
    candidates = {}
    if terms.latency is not None:
        input_shape = _input_shape(net, patch_size)

        def measure(ranks: dict) -> float:
            if not ranks:  # nothing factorised: the original itself (timing it would only measure noise)
                return 1.0
            fraction = measured_fraction(net, factorised_copy(net, ranks), input_shape, terms.latency)
            terms.latency.measured.append((ranks, fraction))
            return fraction

        def predicted(ranks: dict) -> float:
            return network_fraction(layers, ranks, io_shapes, terms.base, "seconds", terms.layer_cost)

        floor = f" (every decomposable layer at the rank floor --min-rank {policy.min_rank})"
        try:
            candidates[kinds[0]], terms.target = calibrated_allocation(
                terms.target, lambda goal: allocate(kinds[0], goal), predicted, measure, terms.latency, progress)
        except CompressError as e:
            # the per-layer model left out layers the network runs faster factorised: measure the uniform family
            progress(f"latency budget: {e}; trying uniform rank ratios, measured")

            def uniform(ratio: float) -> dict:
                return R.ranks_by_ratio(layers, ratio, min_rank=policy.min_rank, multiple=policy.multiple,
                                        io_shapes=io_shapes)
            ranks, _ = measured_uniform(terms.target, uniform, measure, terms.latency, progress, floor_hint=floor)
            terms.target = predicted(ranks)
            return {UNIFORM: ranks}
    for kind in kinds:
        if kind not in candidates:
            candidates[kind] = allocate(kind, terms.target)
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
        latency = latency_terms(net, _input_shape(net, patch_size), "measured",
                                lambda: tucker_requirements(layers, io_shapes, _rank_floors(layers, policy)),
                                progress)
        latency.measured_fraction = measured_fraction(net, factorised_copy(net, ranks), _input_shape(net, patch_size),
                                                      latency)
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

