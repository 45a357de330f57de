"""Subcommands of the ``knapspec`` CLI; each module has ``add_parser(subparsers)``."""

from . import bench, config, generate, plan, profile, vocab

#: modules in the order ``knapspec --help`` lists them
COMMANDS = (generate, bench, plan, profile, vocab, config)
