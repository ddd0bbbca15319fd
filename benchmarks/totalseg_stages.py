"""TotalSegmentator's CLI with stage timers: run instead of the ``TotalSegmentator`` entry point.

    python -m benchmarks.totalseg_stages TIMINGS.json -i ct.nii.gz -o seg.nii.gz --fast --ml -d cpu

Why: end to end, the network is only part of a TotalSegmentator run; to see where the rest goes (start-up,
resampling, model load, nnU-Net's sliding window and export, post-processing, saving) this wraps the functions of
TotalSegmentator and nnU-Net that mark those stages with wall-clock timers, then calls the CLI's own ``main()``
with the remaining arguments, so the run is the user's run plus a few ``time.time()`` calls. Nothing is changed
but the timers. The raw event times go to TIMINGS.json; benchmarks/totalseg_cli.py turns them into stages.

Also refuses internet connections (and records the attempts): the benchmark's homes must hold every model.

nnU-Net's preprocessing and export run in worker processes started with "spawn", which import this file again as
``__mp_main__``: nothing here may run at import time but the two lines below.
"""

import time

T_START = time.time()

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

EVENTS: dict[str, list] = {}  # name -> [[start, end], ...] (seconds since the epoch)
ATTEMPTS: list[str] = []


def _timed(owner, attr: str, name: str) -> None:
    """Replace ``owner.attr`` by a wrapper that records each call's start and end under `name`."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0 = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            EVENTS.setdefault(name, []).append([t0, time.time()])

    setattr(owner, attr, wrapper)


def _mark(name: str) -> None:
    now = time.time()
    EVENTS.setdefault(name, []).append([now, now])


def _guard_network() -> None:
    import socket
    plain_connect = socket.socket.connect

    def guarded_connect(self, address):  # internet sockets only: multiprocessing talks over local sockets
        if self.family in (socket.AF_INET, socket.AF_INET6):
            ATTEMPTS.append(repr(address))
            raise OSError("network disabled by the benchmark")
        return plain_connect(self, address)

    socket.socket.connect = guarded_connect


def _patch_nnunet() -> None:
    """Timers on TotalSegmentator's nnU-Net glue and nnU-Net's predictor.

    Imported only once TotalSegmentator has set nnU-Net's environment (nnunetv2.paths reads it at import time),
    and before TotalSegmentator's own lazy import of its nnU-Net module binds nnUNet_predict_image.
    """
    import pydoc

    import nnunetv2.inference.predict_from_raw_data as pfr
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    import torch
    import totalsegmentator.nnunet as ts_nnunet
    predictor = pfr.nnUNetPredictor
    _timed(ts_nnunet, "nnUNet_predict_image", "predict_image")
    _timed(ts_nnunet, "change_spacing", "change_spacing")
    _timed(ts_nnunet, "nnUNetv2_predict", "nnunetv2_predict")
    _timed(predictor, "initialize_from_trained_model_folder", "model_load")
    _timed(predictor, "predict_from_files", "predict_from_files")
    _timed(predictor, "predict_logits_from_preprocessed_data", "sliding_window")
    _timed(predictor, "_internal_maybe_mirror_and_predict", "network")
    _timed(pfr, "recursive_find_trainer_class_by_name", "find_trainer_class")
    _timed(trainer_module, "get_network_from_plans", "build_network")
    _timed(pydoc, "locate", "locate_class")  # how nnU-Net imports a plans' network class (ours: nnunet_compress)
    _timed(torch, "load", "torch_load")


def main() -> None:
    out, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    _guard_network()
    import totalsegmentator.bin.TotalSegmentator as cli
    import totalsegmentator.python_api as api
    setup_totalseg = api.setup_totalseg

    def setup_then_patch(*args, **kwargs):
        out = setup_totalseg(*args, **kwargs)
        _mark("setup_done")
        _patch_nnunet()
        _mark("patched")
        return out

    api.setup_totalseg = setup_then_patch
    _mark("main")
    try:
        cli.main()
    finally:
        _mark("main_end")
        with open(out, "w") as f:
            json.dump({"start": T_START, "events": EVENTS, "network_attempts": ATTEMPTS}, f)


if __name__ == "__main__":
    main()
