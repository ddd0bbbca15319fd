"""Sub-command ``nnunet-compress auto``: the fastest model within a Dice budget, in one command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nnunet_compress.auto.candidates import DEFAULT_SPECS
from nnunet_compress.auto.search import AutoSettings, run_auto
from nnunet_compress.cli.options import add_model_folder_options


def cmd_auto(args) -> None:
    # every option's dest is the settings field of the same name
    settings = AutoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AutoSettings)})
    summary = run_auto(settings)
    print(f"report: {Path(args.output) / 'auto_report.md'}")
    print(summary["final_line"])


def register(sub) -> None:
    p = sub.add_parser("auto", help="the fastest model within a Dice budget: build, time and grade compressed "
                                    "candidates, keep the fastest one that loses at most --max-dice-drop")
    add_model_folder_options(p, "compress")
    p.add_argument("--max-dice-drop", type=float, default=0.01,
                   help="largest loss of mean foreground Dice accepted, on nnU-Net's predictions (0.01)")
    g = p.add_argument_group("quality data (choose one)")
    g.add_argument("--dataset", help="dataset ID or name: the validation cases of the model's fold in nnU-Net's "
                                     "splits_final.json (never trained on), with their labels")
    g.add_argument("--images", type=Path, help="images of your own (nnU-Net naming CASE_0000.nii.gz)")
    g.add_argument("--labels", type=Path, help="labels of --images (CASE.nii.gz); without them the parent's own "
                                               "predictions are the reference (label-free)")
    p.add_argument("--held-out-fraction", type=float, default=0.5,
                   help="share of the quality cases held out from the choice to grade the winner on (0.5)")
    p.add_argument("--max-cases", type=int, help="use at most this many quality cases (default: all)")
    p.add_argument("--candidates", nargs="+", metavar="SPEC",
                   help="candidates to try instead of the default search, e.g. tucker:ratio=0.5 l1:flops=0.3+int8 "
                        "(methods tucker, l1, taylor with ratio=, latency=, flops=, params=; '+' chains steps; "
                        f"int8 last). Default: {' '.join(DEFAULT_SPECS)}")
    p.add_argument("--time-budget", type=float, metavar="MIN",
                   help="stop starting new candidates after this many minutes and keep the best so far")
    f = p.add_argument_group("fine-tuning (after the cheap search)")
    f.add_argument("--fine-tune-epochs", type=int, metavar="E",
                   help="fine-tune the frontier candidates (faster than the best one within the budget, the "
                        "smallest Dice misses first) for E epochs (nnUNetv2_train -tr nnUNetTrainerFineTune), grade "
                        "them again and choose among all; trains on --dataset's training split of the model's fold, "
                        "or on a part of --images: with --labels on them, without by distillation from the parent")
    f.add_argument("--fine-tune-fraction", type=float, default=0.5, metavar="F",
                   help="with --images: share of the cases fine-tuned on, never chosen or graded on (0.5)")
    f.add_argument("--fine-tune-count", type=int, default=2, metavar="K",
                   help="how many frontier candidates to fine-tune (2)")
    f.add_argument("--fine-tune-iterations", type=int, default=250, metavar="N",
                   help="training iterations per fine-tuning epoch (250, nnU-Net's); validation iterations are a "
                        "fifth of them")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in the work area: finished candidates are read, not rebuilt")
    p.add_argument("--work-dir", type=Path, help="work area of the search (default: OUT_auto_work beside OUT)")
    p.add_argument("--timing-runs", type=int, default=5, help="timed runs per model, median kept (5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choosing / held-out split (0)")
    p.set_defaults(func=cmd_auto)
