"""`controlplane`: the command line, a thin shell over the core.

Every command takes ``--config`` (default: ``$CONTROLPLANE_CONFIG``, else
``./controlplane.toml``, else the shipped ``config.example.toml`` in a checkout); without it,
the command first says on stderr which config file and which database it uses.

This module assembles the parser from the command groups (``controlplane.cli.commands``, one
module each, every one adding its own parsers) and runs the chosen command: it loads the config
and logging (at ``warning`` for every command but ``serve`` unless ``-v``), and turns failures
into exit codes (2 and one line on stderr for every user error, 130 when interrupted); a
command's own result is its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import msgspec

from controlplane import __version__
from controlplane import config as config_mod
from controlplane.cli.commands import (
    audit,
    capability,
    catalog,
    cutover,
    demo,
    flags,
    ingest,
    jobs,
    migrate,
    orgs,
    parity,
    reconcile,
    seam,
    serve,
    stripe_emulator,
    token,
)
from controlplane.errors import ControlPlaneError

# in the order `--help` lists them
GROUPS = [
    serve,
    migrate,
    ingest,
    jobs,
    orgs,
    flags,
    cutover,
    seam,
    audit,
    token,
    capability,
    demo,
    parity,
    reconcile,
    catalog,
    stripe_emulator,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"controlplane {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        help=f"config file (default: ${config_mod.ENV_CONFIG}, else ./controlplane.toml, "
        "else config.example.toml in a checkout)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at the config's [logging] level (default for commands: warnings only)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [stripe_emulator.NAME]:  # the emulator parses its own options
        return stripe_emulator.run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "no_config", False):
            return int(args.func(args, None))
        config = config_mod.load(args.config)
        if args.config is None:
            print(f"config {config.source}; database {config.storage_where}", file=sys.stderr)
        from controlplane.logs import configure

        logging = config.logging
        if not (args.verbose or getattr(args, "keeps_log_level", False)):
            logging = msgspec.structs.replace(logging, level="warning")
        configure(logging)
        if getattr(args, "sync", False):
            return int(args.func(args, config))
        return int(asyncio.run(args.func(args, config)))
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file named on the command line, a port taken
        print(
            f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
