"""The ``vldus`` command line: one sub-command per pipeline step (see docs/formats.md).

Each command lives in the module that implements it, as a function ``add_parser(subparsers)``
that registers the sub-command and sets ``func``. Bad input (InputError) becomes one line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from vldus import __version__
from vldus.errors import InputError

# Modules that define sub-commands, in the order ``vldus --help`` lists them.
COMMAND_MODULES = [
    "vldus.data.shapes",
    "vldus.data.embeddings",
    "vldus.clip_train",
    "vldus.detection.train",
    "vldus.detection.convert",
    "vldus.detection.extract",
    "vldus.synthesis.compat",
    "vldus.synthesis.cli",
    "vldus.synthesis.calibrate",
    "vldus.detection.inference",
    "vldus.evaluation.cli",
    "vldus.bundle",
    "vldus.detect",
    "vldus.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vldus", description="Zero-shot object detection "
                                     "by synthesizing unseen-class features (VLDUS).")
    parser.add_argument("--version", action="version", version=f"vldus {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except InputError as e:
        if args.debug:
            raise
        print(f"vldus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vldus {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
