"""A meter's expression runs through its compiled fast path; whatever an event holds (numbers,
text, floats, booleans, missing or nested fields, a zero divisor), the answer is the exact
evaluator's: the same value, or the same error."""

from __future__ import annotations

import ast
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.meters import ExpressionError, _compile, compile_expression

EXPRESSIONS = [
    ("data.memory_mb * data.interval_s / 1024", False),
    ("-data.a + 2.5 * (data.b - data.c.d)", False),
    ("data.a / data.b", False),
    ("data.c.d", False),
    ("data.a > 0", True),
    ("data.a >= 1 and data.b < data.a * 2 or not data.flag", True),
    ("data.kind == 'gpu' and 0 < data.a <= 100", True),
    ("data.a != data.b", True),
]

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["gpu", "cpu", ""]),
    st.just(0),
)
DATA = st.fixed_dictionaries(
    {},
    optional={
        "memory_mb": VALUES,
        "interval_s": VALUES,
        "a": VALUES,
        "b": VALUES,
        "flag": VALUES,
        "kind": VALUES,
        "c": st.one_of(VALUES, st.fixed_dictionaries({}, optional={"d": VALUES})),
    },
)


def outcome(evaluator: Any, data: dict[str, Any]) -> tuple[str, Any]:
    try:
        value = evaluator(data)
    except ExpressionError as exc:
        return "error", (str(exc), exc.path)
    if isinstance(value, Decimal):
        return "value", (str(value), type(value))
    return "value", (value, type(value))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(EXPRESSIONS), DATA)
def test_the_fast_path_answers_as_the_exact_evaluator(
    expression: tuple[str, bool], data: dict[str, Any]
) -> None:
    source, boolean = expression
    exact = _compile(ast.parse(source, mode="eval").body, source, boolean)
    fast = compile_expression(source, boolean=boolean)
    expected, got = outcome(exact, data), outcome(fast, data)
    if boolean and expected[0] == "value":  # where clauses are read for their truth
        assert got[0] == "value" and bool(got[1][0]) == bool(expected[1][0])
    else:
        assert got == expected
