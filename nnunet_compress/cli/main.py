"""The ``nnunet-compress`` command: what nnU-Net has no verb for.

nnU-Net's own CLI trains (``nnUNetv2_train``) and predicts (``nnUNetv2_predict``); this command prepares
compressed plans and model folders, profiles and compares models, and runs the demo. Every user error is printed
as one line (``error: ...``) with exit code 2; ``--debug`` shows tracebacks. Each family of sub-commands lives in
its own module and registers itself here.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_compress.cli import (
    auto,
    demo,
    distill,
    engine,
    environment,
    evaluation,
    pruning,
    quantize,
    totalseg,
    tucker,
)
from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.presets import apply_preset
from nnunet_compress.progress import set_quiet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-compress", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="write compressed plans beside the parent plans")
    plan_sub = plan.add_subparsers(dest="method", required=True)
    environment.register(sub)
    demo.register(sub)
    tucker.register(sub, plan_sub)
    engine.register(sub)
    pruning.register(sub, plan_sub)
    evaluation.register(sub)
    totalseg.register(sub)
    distill.register(sub)
    quantize.register(sub)
    auto.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        set_quiet(getattr(args, "quiet", False))
        if getattr(args, "preset", None):
            apply_preset(args, args._parser)
        args.func(args)
    except CompressError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure is a bug: one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback and report it)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
