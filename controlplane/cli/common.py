"""What the commands share: the core, argument types and the output helpers.

Output is for people by default (aligned tables, yes/no, ISO 8601 UTC times, ``-`` for
nothing) and JSON with ``--json`` (unix seconds, as the HTTP API answers).
"""

from __future__ import annotations

import argparse
import enum
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

from controlplane.config import Config
from controlplane.times import iso, parse_instant

if TYPE_CHECKING:
    from controlplane.core import ControlPlane

# what `add_subparsers` returns: each command module adds its parsers to it (`register`)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def core(config: Config, *, readonly: bool = False, migrate: bool = True) -> ControlPlane:
    """The control plane for `config`, to be used as an async context manager. A `readonly`
    command reads an existing, migrated database only: it never creates or migrates one."""
    from controlplane.core import ControlPlane

    return ControlPlane(config, migrate=migrate and not readonly, create=not readonly)


def json_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--json`` to a command that prints data."""
    parser.add_argument(
        "--json", action="store_true", help="print JSON (times in unix seconds) instead of text"
    )
    return parser


def print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, default=str))


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """A header row and its rows, columns padded to their widest cell; a column of numbers
    (and `-`) is right-aligned, any other left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = [
        all(_number(r[i]) for r in rows[1:]) and any(r[i] != "-" for r in rows[1:])
        for i in range(len(widths))
    ]
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if right else cell.ljust(w)
                for cell, w, right in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )


def _number(cell: str) -> bool:
    return cell == "-" or cell.lstrip("+-").replace(".", "", 1).replace(",", "").isdigit()


def print_fields(fields: Sequence[tuple[str, Any]] | msgspec.Struct | dict[str, Any]) -> None:
    """`name  value` lines (pairs, or a struct's or dict's fields in order), the names padded
    to the longest, values as :func:`text` shows them."""
    if not isinstance(fields, Sequence):
        fields = list(msgspec.to_builtins(fields).items())
    width = max((len(name) for name, _ in fields), default=0)
    for name, value in fields:
        print(f"{name.ljust(width)}  {text(value)}")


def print_counts(counts: Any, *, as_json: bool) -> None:
    """A job pass's counters: JSON, or one `name  value` line each."""
    if as_json:
        print_json(counts)
    else:
        print_fields(counts)


def text(value: Any) -> str:
    """A value as people read it: yes/no, ``-`` for nothing, an enum's value, no reprs."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def when(seconds: int | None) -> str:
    """ISO 8601 UTC for unix seconds (``-`` for none)."""
    return "-" if seconds is None else iso(seconds)


def flag_text(name: str, value: Any) -> str:
    """A flag's value as people read it; `bill_from` as a time with its unix seconds."""
    if name in ("bill_from", "legacy_bill_until") and isinstance(value, int):
        return f"{iso(value)} ({value})"
    return text(value)


def unix_time(value: str) -> int:
    """An argument type: unix seconds, or an RFC 3339 time with an offset."""
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
