"""Subcommands of the ``knapspec`` CLI; each module has ``add_parser(subparsers)``."""

from . import plan

#: modules in the order ``knapspec --help`` lists them
COMMANDS = (plan,)
