"""Writes model folders with the code as it is *before* the restructure, plus their expected outputs."""
import json, shutil, sys, subprocess
from pathlib import Path
import torch
from nnunet_compress.totalseg_shapes import Architecture, old_format_plans, dataset_json
from nnunet_compress.model_folder import build_network, open_model_folder, load_fold_network

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
arch = Architecture("tiny", 3, 3.0, (16, 16, 16), 4)
def write_parent(folder, plans, ds):
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    torch.manual_seed(0)
    net = build_network(json.loads(json.dumps(plans)), ds, "3d_fullres")
    torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": ds,
                              "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
ds = dataset_json({1: "liver", 2: "kidney", 3: "spleen"})
plans = old_format_plans("Dataset999_Legacy", arch)
plans["configurations"]["3d_fullres"].update(UNet_base_num_features=8, unet_max_num_features=24)
parent = Path("/tmp/legacy_parent/nnUNetTrainer__nnUNetPlans__3d_fullres")
shutil.rmtree(parent.parent, ignore_errors=True)
write_parent(parent, plans, ds)
cli = [sys.executable, "-m", "nnunet_compress.cli"]
for name, args in {"tucker_r0.5": ["tucker", str(parent), "--rank-ratio", "0.5", "--min-rank", "2"],
                   "l1_F0.6": ["prune", str(parent), "--method", "l1", "--target-flops", "0.6", "--min-channels", "2"],
                   "converted": ["convert", str(parent)]}.items():
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(cli + args + ["-o", str(target)], check=True)
    (target / "fold_0" / "checkpoint_final.pth")
torch.manual_seed(1)
x = torch.randn(1, 1, 16, 16, 16)
torch.save(x, out / "input.pt")
expected = {}
for name in ("tucker_r0.5", "l1_F0.6", "converted"):
    folder = open_model_folder(out / name, ["0"])
    net, _, _ = load_fold_network(folder, "0")
    net.eval()
    with torch.no_grad():
        expected[name] = net(x).float()
torch.save(expected, out / "expected_logits.pt")
print({k: tuple(v.shape) for k, v in expected.items()})
