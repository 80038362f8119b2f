"""The `evaluator` command. Each pipeline module registers its own subcommands here."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from evaluator import __version__
from evaluator.errors import UserError

# Modules that contribute subcommands, in the order `--help` lists them. Each has
# `register(subparsers)`, which adds its parsers and sets `handler(args) -> int` on each.
COMMAND_MODULES = [
    "evaluator.check",
    "evaluator.runner",
    "evaluator.dataset.cli",
    "evaluator.signing",
    "evaluator.publish",
    "evaluator.leaderboard.cli",
    "evaluator.batch.driver",
    "evaluator.compare",
    "evaluator.calibration",
]


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage exits 2 with one line and a hint instead of the full usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n(run '{self.prog} --help' for usage)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evaluator",
        description=(
            "Evaluator for LLM training speedruns: checks a submission, trains it in a sandbox "
            "under a hard clock, scores the model itself, and signs the result."
        ),
    )
    parser.add_argument("--version", action="version", version=f"evaluator {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded("evaluator", lambda: args.handler(args))


def run_guarded(prog: str, action: Callable[[], int | None]) -> int:
    """Run a command the way every program here ends: a UserError is one line and its exit code,
    Ctrl-C or SIGTERM (which `evaluate()` turns into the same unwinding) is one line and 130."""
    try:
        return action() or 0
    except UserError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or exc.filename is None:
            raise
        # A read-only checkout or installed package, or another user's folder: the commands write
        # only under the current folder or where an option says (evaluator/paths.py).
        sys.stderr.write(
            f"{prog}: cannot access {exc.filename}: {exc.strerror}; run from a folder you can write, "
            "or name one with the command's --out, --results or --dir option (see its --help)\n"
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
