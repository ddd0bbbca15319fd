"""Plan presets: named sets of `nnunet-compress plan ...` options shipped in the top-level `plans/` folder.

A preset is a starting point a user can name instead of remembering a paper's settings
(``nnunet-compress plan tucker -d 291 -c 3d_fullres --preset tucker_paper``). Options given explicitly on the
command line win over the preset's. Each preset file holds the method it is for, a description, and option values
keyed by the command's argument names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nnunet_compress.plan_presets as presets
from nnunet_compress.errors import CompressError


def presets_folder() -> Path:
    """`plans/` of a checkout, shipped in the wheel as the package nnunet_compress.plan_presets."""
    return Path(presets.__file__).resolve().parent


def available_presets() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(presets_folder().glob("*.json"))}


def load_preset(name: str, method: str) -> dict:
    presets = available_presets()
    if name not in presets:
        raise CompressError(f"unknown preset {name!r}; available: {', '.join(presets) or 'none'} "
                            f"(in {presets_folder()})")
    preset = presets[name]
    if preset.get("method") != method:
        raise CompressError(f"preset {name!r} is for `plan {preset.get('method')}`, not `plan {method}`")
    return preset


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill in the preset's values for every option the user left at its default."""
    preset = load_preset(args.preset, args.method)
    for key, value in preset.get("options", {}).items():
        if not hasattr(args, key):
            raise CompressError(f"preset {args.preset!r} sets unknown option {key!r}")
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
