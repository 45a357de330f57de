"""The ``knapspec`` command line.  Each subcommand lives in ``knapspec.commands.<name>``.

Errors on bad input print one line (``knapspec: error: ...``) to stderr and exit with
status 2; no traceback.  ``--verbose`` turns on INFO logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS
from .errors import KnapSpecError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="knapspec",
        description="Adaptive self-speculative decoding: skip blocks while drafting, chosen "
        "as a knapsack over tokens per time (KnapSpec).",
    )
    parser.add_argument("--version", action="version", version=f"knapspec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KnapSpecError as e:
        sys.stderr.write(f"knapspec: error: {e}\n")
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        sys.stderr.write(f"knapspec: error: {e.strerror or e}{where}\n")
    except KeyboardInterrupt:
        sys.stderr.write("knapspec: interrupted\n")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
