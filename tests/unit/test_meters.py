from __future__ import annotations

from decimal import Decimal

import pytest

from controlplane.errors import ConfigError
from controlplane.meters import ExpressionError, Meter, MeterConfig, MeterSet, compile_expression


def meter(
    value: str | None = "data.mb * data.s / 1024", where: str | None = None, agg: str = "sum"
) -> Meter:
    return Meter(MeterConfig(name="m", event_type="t", value=value, where=where, aggregation=agg))  # type: ignore[arg-type]


def test_arithmetic_is_exact_decimal() -> None:
    assert compile_expression("data.a + data.b")(
        {"a": Decimal("0.1"), "b": Decimal("0.2")}
    ) == Decimal("0.3")
    assert compile_expression("(data.a - 1) * 2 / 4")({"a": 3}) == Decimal(1)
    assert compile_expression("-data.a + 0.5")({"a": 1}) == Decimal("-0.5")
    assert compile_expression("data.x.y * 2")({"x": {"y": 21}}) == 42


def test_value_in_micro_units() -> None:
    assert meter().measure({"mb": 512, "s": 20}) == 10_000_000
    assert meter().measure({"mb": 100, "s": 20}) == 1_953_125  # 1.953125 exactly
    assert meter("data.a / 3").measure({"a": 1}) == 333_333  # quantized half-even at 6 places


def test_count_meter_counts_one_per_event() -> None:
    assert meter(value=None, agg="count").measure({}) == 1_000_000


def test_where_filters() -> None:
    m = meter(where="data.mb > 0 and (data.kind == 'vm' or not data.s < 10)")
    assert m.measure({"mb": 512, "s": 20, "kind": "x"}) == 10_000_000
    assert m.measure({"mb": 0, "s": 20, "kind": "vm"}) is None
    assert m.measure({"mb": 512, "s": 5, "kind": "ct"}) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mb": 1}, "meter m: data.s is missing"),
        ({"mb": "1", "s": 2}, "meter m: data.mb is a str, not a number"),
        ({"mb": True, "s": 2}, "meter m: data.mb is a bool, not a number"),
        ({"mb": {"a": 1}, "s": 2}, "data.mb is a dict, not a number"),
    ],
)
def test_runtime_errors_name_meter_and_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ExpressionError) as err:
        meter().measure(data)
    assert message in str(err.value)
    assert err.value.path in ("data.s", "data.mb")


def test_a_filter_on_text_names_the_field() -> None:
    with pytest.raises(ExpressionError) as err:
        meter(where="data.mb > 0").measure({"mb": "lots", "s": 60})
    assert str(err.value) == "meter m: cannot compare data.mb ('lots') with 0"
    assert err.value.path == "data.mb"


def test_division_by_zero_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="division by zero"):
        meter("data.a / data.b").measure({"a": 1, "b": 0})


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os')",
        "data.a ** 2",
        "x + 1",
        "data.a if data.b else 1",
        "data['a']",
        "lambda: 1",
        "data.a // 2",
        "[1]",
        "True",
    ],
)
def test_unsafe_or_unsupported_syntax_is_refused(source: str) -> None:
    with pytest.raises(ConfigError):
        compile_expression(source)


def test_comparisons_only_in_where() -> None:
    with pytest.raises(ConfigError):
        compile_expression("data.a > 1")
    assert compile_expression("data.a > 1", boolean=True)({"a": 2}) is True


@pytest.mark.parametrize("name", ["gb:s", "", "a b", "x" * 65])
def test_meter_names_keep_ledger_identifiers_unambiguous(name: str) -> None:
    with pytest.raises(ConfigError, match=r"meters\[0\]\.name"):
        MeterSet([MeterConfig(name=name, event_type="t", value="1")])


def test_meter_set_routes_by_event_type_and_refuses_duplicates() -> None:
    ms = MeterSet(
        [
            MeterConfig(name="a", event_type="t", value="data.v"),
            MeterConfig(name="b", event_type="t", aggregation="count"),
            MeterConfig(name="c", event_type="u", value="data.v"),
        ]
    )
    assert ms.measure("t", {"v": 2}) == (("a", 2_000_000), ("b", 1_000_000))
    assert ms.measure("other", {"v": 2}) == ()
    with pytest.raises(ConfigError, match="duplicate meter names"):
        MeterSet([MeterConfig(name="a", event_type="t", value="1")] * 2)


@pytest.mark.parametrize(
    ("source", "boolean", "why"),
    [
        ("-" * 5000 + "data.x", False, "nested too deeply"),  # past the parser's recursion
        ("(" * 500 + "data.x" + ")" * 500, False, "nested"),
        ("not " * 5000 + "data.x", True, "nested too deeply"),
        ("-" * 40 + "data.x", False, "at most 32"),  # evaluation would recurse 40 times
    ],
)
def test_expressions_nested_past_the_limit_are_refused(
    source: str, boolean: bool, why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        compile_expression(source, boolean=boolean)
    with pytest.raises(ConfigError, match=rf"meters\[0\] \(m\): .*{why}"):
        meter(value="data.x" if boolean else source, where=source if boolean else None)


def test_expressions_nested_to_the_limit_evaluate() -> None:
    assert compile_expression("-" * 26 + "data.x")({"x": Decimal(2)}) == Decimal(2)
