"""nnU-Net's environment (nnUNet_raw / nnUNet_preprocessed / nnUNet_results) and running its CLI.

nnU-Net reads its folders from environment variables when ``nnunetv2.paths`` is first imported, and its CLI
fails deep inside with a bare ``None`` path when one is missing. We check first and say which variable is
missing and how to set it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nnunet_compress.trainers as trainers
from nnunet_compress.errors import CompressError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_env(*names: str) -> dict[str, Path]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise CompressError(f"environment variable(s) {', '.join(missing)} not set; nnU-Net needs them, e.g. "
                            + " ".join(f"export {n}=/data/{n}" for n in missing))
    return {n: Path(os.environ[n]) for n in names}


def trainers_path() -> str:
    """The folder to put in nnUNet_extTrainer: our trainer classes (top-level `trainers/`, or its wheel copy).

    The `trainers/` beside this package comes first: when this checkout is imported through PYTHONPATH while
    another checkout is installed in editable mode, `nnunet_compress.trainers` resolves to the *other*
    checkout's folder, and nnU-Net would train with trainers that do not match this library.
    """
    beside = Path(__file__).resolve().parents[2] / "trainers"  # nnunet_compress/nnunet/env.py -> the checkout
    if (beside / "nnUNetTrainerTaylorPruning.py").is_file():
        return str(beside)
    return str(Path(trainers.__file__).resolve().parent)


def nnunet_subprocess_env(**folders: str | os.PathLike) -> dict[str, str]:
    """The current environment plus nnU-Net's folders and our trainers on nnUNet_extTrainer."""
    env = dict(os.environ)
    for key, value in folders.items():
        env[key] = str(value)
    ext = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainers_path() not in ext:
        ext.append(trainers_path())
    env["nnUNet_extTrainer"] = os.pathsep.join(ext)
    env.setdefault("nnUNet_compile", "false")
    return env


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one installed beside the running Python."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise CompressError(f"{name} not found; install nnunetv2 in this environment (pip install nnunetv2)")
    return found


def run_nnunet(args: list[str], env: dict[str, str], log_file: Path | None = None, quiet: bool = True) -> str:
    """Run an nnU-Net CLI command; on failure raise CompressError with the end of its output."""
    cmd = [nnunet_command(args[0]), *map(str, args[1:])]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stdout)
    if not quiet:
        print(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise CompressError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout
