import sys, numpy as np, SimpleITK as sitk, subprocess, os
from pathlib import Path
out = Path(sys.argv[1]); img_dir = out / "images"; img_dir.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
vol = (rng.normal(0, 200, (20, 22, 24)) + np.where(np.indices((20, 22, 24))[0] > 10, 300, -500)).astype(np.int16)
im = sitk.GetImageFromArray(vol); im.SetSpacing((3.0, 3.0, 3.0))
sitk.WriteImage(im, str(img_dir / "case_0000.nii.gz"))
env = dict(os.environ, NNUNET_COMPRESS_CPU_ENGINE="torch", nnUNet_raw="/tmp/x", nnUNet_preprocessed="/tmp/x", nnUNet_results="/tmp/x")
for name in ("tucker_r0.5", "l1_F0.6", "converted"):
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(img_dir), "-o", str(out / "seg" / name),
                    "-m", str(out / name), "-f", "0", "-device", "cpu", "--disable_progress_bar", "-npp", "1", "-nps", "1"], check=True, env=env)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg" / name / "case.nii.gz")))
    print(name, np.bincount(seg.ravel()))
