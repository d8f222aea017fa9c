"""The ``vldus`` command line: one sub-command per pipeline step (see docs/formats.md).

Each command lives in the module that implements it, as a function ``add_parser(subparsers)``
that registers the sub-command and sets ``func``. The parser imports the named command's module
only (``vldus --version`` loads no torch, ``vldus train-clip --help`` no torchvision): the other
modules' imports cost every process seconds, a torchrun rank included. Bad input (InputError)
becomes one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from vldus import __version__
from vldus.errors import InputError

# Sub-commands and the modules that define them, in the order ``vldus --help`` lists them.
COMMANDS = {
    "make-shapes": "vldus.data.shapes",
    "embed": "vldus.data.embeddings",
    "prepare": "vldus.data.prepare",
    "train-clip": "vldus.clip_train",
    "train-detector": "vldus.detection.train",
    "convert-checkpoint": "vldus.detection.convert",
    "extract-features": "vldus.detection.extract",
    "train-unseen-classifier": "vldus.synthesis.compat",
    "train-generator": "vldus.synthesis.cli",
    "calibrate-gzsd": "vldus.synthesis.calibrate",
    "test": "vldus.detection.inference",
    "evaluate": "vldus.evaluation.cli",
    "export": "vldus.bundle",
    "detect": "vldus.detect",
    "run": "vldus.runner",
    "demo": "vldus.demo",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def requested_modules(argv: Sequence[str]) -> list[str]:
    """The command modules a command line needs: its sub-command's alone, none for a bare
    ``--version``, all of them otherwise (``--help``, no command, an unknown one)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        return [COMMANDS[command]]
    if command is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return []
    return COMMAND_MODULES


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The ``vldus`` parser with the sub-commands of ``modules`` (default: all)."""
    parser = argparse.ArgumentParser(prog="vldus", description="Zero-shot object detection "
                                     "by synthesizing unseen-class features (VLDUS).")
    parser.add_argument("--version", action="version", version=f"vldus {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in modules:
        importlib.import_module(name).add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(requested_modules(argv))
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
