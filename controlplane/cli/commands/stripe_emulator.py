"""`controlplane stripe-emulator`: the local Stripe emulator, which owns its own options.

The CLI hands every argument after the command name to the emulator's ``main`` before any
parsing of its own (see :func:`controlplane.cli.main.main`); the parser here only lists the
command in ``--help``.
"""

from __future__ import annotations

import argparse

from controlplane.cli.common import Subparsers

NAME = "stripe-emulator"


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    sub.add_parser(NAME, help="run the local Stripe emulator (--help for options)")


def run(argv: list[str]) -> int:
    import stripe_emulator as emulator  # imported only when it runs

    return emulator.main(argv)
