"""File backfill reading (plugins/ingest/file.py): lines are scanned before they are decoded,
and a cell's number is read exactly without building an integer of a billion digits."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest

from controlplane.errors import InvalidInput
from controlplane.plugins.ingest.file import _cell, read_lines

DEEP = "[" * 65 + "]" * 65
EVENT = '{"id": "e1", "type": "tick", "subject": "acme", "ts": 1, "data": {"mb": 1}}'


def test_a_json_line_nested_past_the_limit_is_refused_naming_its_line() -> None:
    stream = io.BytesIO(f'{EVENT}\n{{"id": "e2", "data": {DEEP}}}\n'.encode())
    lines = read_lines(stream, "ndjson")
    assert next(lines).event["id"] == "e1"
    with pytest.raises(InvalidInput) as info:
        next(lines)
    (problem,) = info.value.problems
    assert problem.message == "line 2: JSON nested deeper than 64 levels"


def test_a_csv_data_cell_nested_past_the_limit_is_refused_naming_its_line() -> None:
    deep = DEEP.replace('"', '""')
    stream = io.BytesIO(f'id,type,subject,ts,data\ne1,tick,acme,1,"{deep}"\n'.encode())
    with pytest.raises(InvalidInput, match="line 2: JSON nested deeper than 64 levels"):
        list(read_lines(stream, "csv"))


def test_cells_are_read_exactly() -> None:
    assert _cell("12") == 12 and isinstance(_cell("12"), int)
    assert _cell("1.5") == Decimal("1.5")
    assert _cell("abc") == "abc" and _cell("") is None
    assert _cell("NaN") == "NaN" and _cell("-Infinity") == "-Infinity"  # no meter number
    huge = _cell("1e999999999")  # int() of it would build a billion digits
    assert huge == Decimal("1e999999999") and isinstance(huge, Decimal)
    assert _cell("1e18") == 10**18 and isinstance(_cell("1e18"), int)
