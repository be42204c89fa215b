"""File backfill: NDJSON or CSV files read as raw events, in batches, with line numbers.

CSV: a header row with `id`, `type`, `subject`, `time` or `ts`, optional `source`, and the
event's data either as a `data` column holding a JSON object or as `data.<field>` columns
(numbers are read exactly, as decimals).

Each JSON line and `data` cell is scanned before it is decoded, as request bodies are
(:func:`controlplane.events.scan_json`): nested past 64 levels is an error naming the line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from controlplane.errors import InvalidInput, Problem
from controlplane.events import scan_json

_decoder = msgspec.json.Decoder(float_hook=Decimal)


class Line(msgspec.Struct, frozen=True):
    number: int  # 1-based line in the file
    event: Any  # the raw event object


MAX_INT_DIGITS = 19  # a cell past 10^19 stays a Decimal (the meters bound it), never int()


def _cell(text: str) -> Any:
    if text == "":
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    if not number.is_finite():
        return text  # "NaN", "Infinity": text, which no meter takes as a number
    whole = number.adjusted() < MAX_INT_DIGITS and number == number.to_integral_value()
    return int(number) if whole and "." not in text else number


def _decode(raw: bytes | str) -> Any:
    body = raw.encode() if isinstance(raw, str) else raw
    scan_json(body)
    return _decoder.decode(body)


def _csv_event(row: dict[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:
            raise ValueError("more cells than header columns")
        if key == "data":
            if value:
                data.update(_decode(value))
        elif key.startswith("data."):
            cell = _cell(value)
            if cell is not None:
                data[key[5:]] = cell
        elif key == "ts":
            if value:
                event["ts"] = int(value)
        elif value != "":
            event[key] = value
    event["data"] = data
    return event


def read_lines(stream: BinaryIO, fmt: str) -> Iterator[Line]:
    """Raw events with their line numbers. Raises InvalidInput on an unparseable line."""
    if fmt == "csv":
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        try:
            reader = csv.DictReader(text)
            for row in reader:
                try:
                    yield Line(number=reader.line_num, event=_csv_event(row))
                except (ValueError, msgspec.DecodeError, InvalidInput) as exc:
                    raise _on_line(reader.line_num, exc) from exc
        finally:
            text.detach()  # leave the caller's stream open
        return
    for number, raw in enumerate(stream, start=1):
        if raw.strip():
            try:
                yield Line(number=number, event=_decode(raw))
            except (msgspec.DecodeError, InvalidInput) as exc:
                raise _on_line(number, exc) from exc


def _on_line(number: int, exc: Exception) -> InvalidInput:
    why = "; ".join(p.message for p in exc.problems) if isinstance(exc, InvalidInput) else exc
    return InvalidInput([Problem(field="", message=f"line {number}: {why}")])


def detect_format(path: Path) -> str:
    return "csv" if path.suffix.lower() == ".csv" else "ndjson"
