"""`controlplane`: the command line (`main`), split by command group (`commands/`)."""

from controlplane.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
