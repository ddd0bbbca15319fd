"""Stand-in TotalSegmentator homes: TotalSegmentator's layout and architectures, random weights, fully offline.

TotalSegmentator's weights cannot be downloaded on every machine (and never in tests or benchmarks), yet its own
code must run on a home as if they were there: the same dataset folders, trainers, plans (nnU-Net 2.1 format, as
the v2 weights ship; nnunet_compress.totalseg.shapes), class counts and network shapes, with nnU-Net checkpoints
holding He-initialised weights. The tests run TotalSegmentator on such homes; benchmarks/totalseg_cli.py times
TotalSegmentator's CLI on them (speed does not depend on the weights' values).
"""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_compress.nnunet.model_folder import CHECKPOINT_FINAL, build_network
from nnunet_compress.totalseg.home import RESULTS, task_models
from nnunet_compress.totalseg.shapes import architecture_for, class_names_for, dataset_json, old_format_plans


def write_standin_model(results: Path, task_id: int, trainer: str, seed: int = 0) -> Path:
    """A TotalSegmentator-shaped model folder under `results` with random (He-initialised) weights."""
    import torch
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    folder = results / TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"] / f"{trainer}__nnUNetPlans__3d_fullres"
    plans = old_format_plans(folder.parent.name, architecture_for(task_id))
    ds = dataset_json(class_names_for(task_id))
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    torch.manual_seed(seed)
    net = build_network(json.loads(json.dumps(plans)), ds, "3d_fullres")
    torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 4000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": ds,
                              "device": torch.device("cpu")},
                "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / CHECKPOINT_FINAL)
    return folder


def write_offline_config(home: Path) -> None:
    """config.json that keeps TotalSegmentator from sending usage statistics or printing its notice."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_test", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))


def write_standin_home(home: Path, tasks: list[str], seed: int = 0, progress=print) -> list[Path]:
    """A home holding a stand-in of every model `tasks` run (e.g. ['total'] = the five 1.5 mm part models)."""
    folders = []
    for i, m in enumerate(task_models(tasks)):
        progress(f"stand-in weights for dataset {m.dataset_id} ({m.trainer})")
        folders.append(write_standin_model(home / RESULTS, m.dataset_id, m.trainer, seed=seed + i))
    write_offline_config(home)
    return folders
