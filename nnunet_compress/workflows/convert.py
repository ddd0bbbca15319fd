"""``nnunet-compress convert``: any trained nnU-Net model, unchanged, as a model folder that runs on the CPU engine.

Why: the fair baseline for a compressed model is the original on the best engine a user could deploy, not the
original in plain torch. nnU-Net's predictor builds whatever class the plans name; naming
:class:`~nnunet_compress.network.CompressedUNet` with no pruned channels and no factorised layers gives exactly the
parent network (same modules, same state-dict keys, same outputs) whose CPU forward pass goes to OpenVINO. So
``nnUNetv2_predict_from_modelfolder`` and TotalSegmentator (``nnunet-compress totalseg --no-compression``) run the
original on the engine without any change of theirs.
"""

from __future__ import annotations

from pathlib import Path

from nnunet_compress.costs import count_parameters
from nnunet_compress.errors import CompressError
from nnunet_compress.network import NETWORK_CLASS_NAME, compressed_arch_kwargs
from nnunet_compress.nnunet.model_folder import (
    CHECKPOINT_FINAL,
    check_output_location,
    load_fold_network,
    open_model_folder,
)
from nnunet_compress.nnunet.plans import derive_plans, resolved_configuration
from nnunet_compress.workflows.derived_folder import rebuilt_from_plans, write_derived_model_folder

METHOD = "convert"


def converted_plans(parent_plans: dict, configuration: str) -> dict:
    """Parent plans with `configuration` naming CompressedUNet around the unchanged parent architecture."""
    arch = compressed_arch_kwargs(resolved_configuration(parent_plans, configuration))
    return derive_plans(parent_plans, configuration, parent_plans.get("plans_name", "nnUNetPlans"), arch,
                        {"method": METHOD})


def convert_model_folder(source: str | Path, output: str | Path, folds: list[str] | None = None,
                         configuration: str | None = None, overwrite: bool = False,
                         checkpoint_name: str = CHECKPOINT_FINAL, progress=print) -> dict:
    """Write the model of `source` unchanged as a CompressedUNet model folder; the source is only read.

    Returns a summary (configuration, folds, parameters) for the caller's report.
    """
    source, output = Path(source), Path(output)
    folder = open_model_folder(source, folds, checkpoint_name)
    check_output_location(folder.path, output)
    fold_names = list(folder.folds)
    first_net, first_ckpt, configuration = load_fold_network(folder, fold_names[0], configuration)
    arch = resolved_configuration(folder.plans, configuration)["architecture"]
    if arch["network_class_name"] == NETWORK_CLASS_NAME:
        raise CompressError(f"{source} already names {NETWORK_CLASS_NAME} in its plans, so it runs on the engine "
                            f"as it is; convert its parent model instead (or use it directly)")
    if not (hasattr(first_net, "encoder") and hasattr(first_net, "decoder")):
        raise CompressError(f"{arch['network_class_name']} has no .encoder/.decoder; nnunet-compress supports "
                            f"nnU-Net's PlainConvUNet and ResidualEncoderUNet families")
    plans = converted_plans(folder.plans, configuration)
    progress(f"converting {source} ({configuration}); folds: {', '.join(fold_names)}")
    derive = rebuilt_from_plans(plans, folder.dataset_json, configuration,
                                on_fold=lambda fold, parent, errors: progress(f"  fold {fold}: done"))
    write_derived_model_folder(folder, output, configuration, derive, overwrite, checkpoint_name,
                               first_fold=(first_net, first_ckpt))
    return {"configuration": configuration, "folds": fold_names, "params": count_parameters(first_net)}
