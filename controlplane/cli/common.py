"""What the commands share: the core, an argument type and the output helpers."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

from controlplane.config import Config

if TYPE_CHECKING:
    from controlplane.core import ControlPlane

# what `add_subparsers` returns: each command module adds its parsers to it (`register`)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def core(config: Config, migrate: bool = True) -> ControlPlane:
    """The control plane for `config`, to be used as an async context manager."""
    from controlplane.core import ControlPlane

    return ControlPlane(config, migrate=migrate)


def print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, default=str))


def print_table(rows: list[list[str]]) -> None:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


def unix_time(text: str) -> int:
    """Unix seconds, or an RFC 3339 time with an offset (`2026-01-01T00:00:00Z`)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected unix seconds or RFC 3339") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give an offset, e.g. Z")
    return int(when.timestamp())
