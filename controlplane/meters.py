"""Meters: named quantities computed from usage events with safe, exact expressions.

A meter's `value` is arithmetic over the event's `data` fields (numbers, ``data.a.b``,
``+ - * /``, parentheses); its optional `where` adds comparisons joined by ``and``/``or``/
``not``. Expressions are parsed once, with Python's parser but never evaluated by it: only the
node types above are accepted, and evaluation is over `Decimal`, never float.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, DivisionByZero, InvalidOperation
from typing import Any, Literal, NamedTuple

import msgspec

from controlplane.errors import ConfigError
from controlplane.units import MAX_MICROS, format_micros, to_micros

Evaluator = Callable[[Mapping[str, Any]], Any]
METER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ExpressionError(ValueError):
    """An expression could not be evaluated for one event (missing field, wrong type, ...)."""

    def __init__(self, message: str, path: str | None = None, *, missing: bool = False) -> None:
        super().__init__(message)
        self.path = path  # the event field at fault (`data.memory_mb`), when there is one
        self.missing = missing  # the field is absent (rather than of the wrong type)


def _field_path(path: str) -> str | None:
    return path if path.startswith("data.") else None


Mode = Literal["level", "delta", "state"]


class MeterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A meter as declared in config (`[[meters]]`)."""

    name: str
    event_type: str
    aggregation: Literal["sum", "count", "time_weighted"] = "sum"
    value: str | None = None  # required for `sum` and `time_weighted`
    where: str | None = None
    unit: str = "unit"
    event_name: str | None = None  # the provider's meter event name; defaults to `name`
    # time_weighted only:
    series: str | None = None  # the expression naming the series an event belongs to
    mode: Mode = "level"  # what `value` is for events of `event_type`
    event_modes: dict[str, Mode] = {}  # more event types feeding the same series, by mode
    end: str | None = None  # a condition on an event's data that ends its series
    time_unit_seconds: int = 3600  # level x this many seconds is one unit

    @property
    def provider_event_name(self) -> str:
        return self.event_name or self.name

    @property
    def provider_formula(self) -> str:
        """The provider meter's aggregation: always `sum`. The product sends one meter event per
        bucket revision holding the bucket's total (a count meter's count, a gauge's
        integral), so the provider must add those values up; its `count` would count one per
        bucket revision, whatever the bucket held."""
        return "sum"

    @property
    def event_types(self) -> dict[str, Mode]:
        """Every event type the meter reads, with the mode of its `value` (gauges)."""
        return {self.event_type: self.mode, **self.event_modes}


_ARITH: dict[type[ast.operator], Callable[[Decimal, Decimal], Decimal]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def _number(value: Any, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        if isinstance(value, float):  # only reachable when data was decoded without Decimals
            return Decimal(repr(value))
        kind = "missing" if value is None else f"a {type(value).__name__}, not a number"
        raise ExpressionError(f"{path} is {kind}", _field_path(path))
    return Decimal(value)


def _field(path: tuple[str, ...]) -> Evaluator:
    dotted = "data." + ".".join(path)

    def get(data: Mapping[str, Any]) -> Any:
        value: Any = data
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                raise ExpressionError(f"{dotted} is missing", dotted, missing=True)
            value = value[key]
        return value

    get.path = dotted  # type: ignore[attr-defined]
    return get


def _compile(node: ast.AST, source: str, boolean: bool) -> Evaluator:
    """Compile one node; `boolean` allows comparisons and and/or/not (the `where` clause)."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or node.value is None:
            raise ConfigError(f"unsupported constant {node.value!r}")
        if isinstance(node.value, int | float):
            exact = Decimal(ast.get_source_segment(source, node) or str(node.value))
            return lambda data: exact
        if isinstance(node.value, str) and boolean:
            text = node.value
            return lambda data: text
        raise ConfigError(f"unsupported constant {node.value!r}")
    if isinstance(node, ast.Attribute):
        parts: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if not (isinstance(cur, ast.Name) and cur.id == "data"):
            raise ConfigError("fields must be written data.<name>")
        return _field(tuple(reversed(parts)))
    if isinstance(node, ast.Name):
        raise ConfigError(f"unknown name {node.id!r}; fields are written data.{node.id}")
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        op = _ARITH[type(node.op)]
        left, right = _compile(node.left, source, False), _compile(node.right, source, False)
        left_path = getattr(left, "path", "value")
        right_path = getattr(right, "path", "value")

        def arith(data: Mapping[str, Any]) -> Decimal:
            a = _number(left(data), left_path)
            b = _number(right(data), right_path)
            try:
                return op(a, b)
            except (DivisionByZero, InvalidOperation, ZeroDivisionError) as exc:
                raise ExpressionError(
                    f"division by zero ({right_path} is 0)", _field_path(right_path)
                ) from exc

        return arith
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _compile(node.operand, source, False)
        path = getattr(inner, "path", "value")
        sign = -1 if isinstance(node.op, ast.USub) else 1
        return lambda data: sign * _number(inner(data), path)
    if boolean and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand, source, True)
        return lambda data: not inner(data)
    if boolean and isinstance(node, ast.BoolOp):
        parts_ = [_compile(v, source, True) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda data: all(p(data) for p in parts_)
        return lambda data: any(p(data) for p in parts_)
    if boolean and isinstance(node, ast.Compare):
        terms = [_compile(node.left, source, True)] + [
            _compile(c, source, True) for c in node.comparators
        ]
        ops = [_COMPARE[type(o)] for o in node.ops if type(o) in _COMPARE]
        if len(ops) != len(node.ops):
            raise ConfigError("only < <= > >= == != comparisons are allowed")

        def compare(data: Mapping[str, Any]) -> bool:
            values = [_comparable(t(data), t) for t in terms]
            try:
                return all(op(values[i], values[i + 1]) for i, op in enumerate(ops))
            except TypeError as exc:
                raise _mismatch(terms, values) from exc

        return compare
    raise ConfigError(f"unsupported syntax: {ast.dump(node)[:60]}")


def _mismatch(terms: list[Evaluator], values: list[Any]) -> ExpressionError:
    """Which side of a comparison does not fit: the first field holding text, when one does."""
    shown = []
    fields = []
    for term, value in zip(terms, values, strict=True):
        path = getattr(term, "path", None)
        text = str(value) if isinstance(value, Decimal) else repr(value)
        shown.append(f"{path} ({text})" if path else text)
        if path and not isinstance(value, Decimal):
            fields.append(path)
    return ExpressionError(
        f"cannot compare {' with '.join(shown[:2])}", fields[0] if fields else None
    )


def _comparable(value: Any, term: Evaluator) -> Any:
    if value is None:
        path = getattr(term, "path", "value")
        raise ExpressionError(f"{path} is missing", _field_path(path))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return value


def compile_expression(source: str, *, boolean: bool = False) -> Evaluator:
    """Parse `source` once into an evaluator over an event's `data`. Raises ConfigError."""
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"syntax error in {source!r}: {exc.msg}") from exc
    except RecursionError:  # thousands of nested operators: no meter needs them
        raise ConfigError(f"expression nested too deeply ({len(source)} characters)") from None
    if (depth := _depth(tree)) > MAX_DEPTH:
        raise ConfigError(f"expression nested {depth} levels deep; at most {MAX_DEPTH}")
    exact = _compile(tree.body, source, boolean)
    return _with_fast_path(exact, tree.body, source)


class _Slow(Exception):
    """A value the fast path does not take: the exact evaluator decides."""


def _fast_number(value: Any) -> Decimal:
    kind = type(value)
    if kind is Decimal:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return Decimal(value)
    raise _Slow


def _fast_comparable(value: Any) -> Any:
    kind = type(value)
    if kind is Decimal or kind is str:
        return value
    if kind is int:
        return Decimal(value)
    raise _Slow


def _with_fast_path(exact: Evaluator, node: ast.AST, source: str) -> Evaluator:
    """`exact`, fronted by the same expression compiled once into one plain Python function
    (as the standard library's dataclasses generate their methods): the common case, every
    field present and an integer or decimal, runs without an evaluator call per node. The
    generated code is built only from the node types :func:`_compile` accepted, field names
    (identifiers) and numeric constants kept in its namespace; it computes with the same
    Decimal operations in the same order. Anything it does not take (a missing field, text
    where a number belongs, a float, a division by zero) goes to `exact`, which gives the
    same answer or the same error as before."""
    constants: dict[str, Any] = {}

    def const(value: Any) -> str:
        name = f"_k{len(constants)}"
        constants[name] = value
        return name

    def gen(n: ast.AST, number: bool) -> str:
        if isinstance(n, ast.Constant):
            if isinstance(n.value, str):
                return const(n.value)
            return const(Decimal(ast.get_source_segment(source, n) or str(n.value)))
        if isinstance(n, ast.Attribute):
            read = "data" + "".join(f"[{p!r}]" for p in reversed(_attribute_path(n)))
            return f"_num({read})" if number else f"_cmp({read})"
        if isinstance(n, ast.BinOp):
            symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(n.op)]
            return f"({gen(n.left, True)} {symbol} {gen(n.right, True)})"
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(n.op, ast.USub) else 1
            return f"({sign} * {gen(n.operand, True)})"
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return f"(not {gen(n.operand, False)})"
        if isinstance(n, ast.BoolOp):
            joiner = " and " if isinstance(n.op, ast.And) else " or "
            return "bool(" + joiner.join(gen(v, False) for v in n.values) + ")"
        if isinstance(n, ast.Compare):
            terms = [gen(n.left, False), *(gen(c, False) for c in n.comparators)]
            symbols = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
                       ast.NotEq: "!="}  # fmt: skip
            # every term is read before any is compared, as the exact evaluator does
            names = [f"_t{i}" for i in range(len(terms))]
            chain = " and ".join(
                f"{names[i]} {symbols[type(op)]} {names[i + 1]}" for i, op in enumerate(n.ops)
            )
            return f"(lambda {', '.join(names)}: {chain})({', '.join(terms)})"
        raise _Slow  # never reached: _compile accepted only the nodes above

    if isinstance(node, ast.Attribute):
        body = "data" + "".join(f"[{p!r}]" for p in reversed(_attribute_path(node)))
    else:
        body = gen(node, True)
    namespace: dict[str, Any] = {"_num": _fast_number, "_cmp": _fast_comparable, **constants}
    exec(f"def fast(data):\n    return {body}\n", namespace)
    fast = namespace["fast"]

    def evaluate(data: Mapping[str, Any]) -> Any:
        try:
            return fast(data)
        except Exception:  # the exact evaluator says what it is, or takes it after all
            return exact(data)

    if hasattr(exact, "path"):  # a lone field: its path names it in errors
        evaluate.path = exact.path  # type: ignore[attr-defined]
    return evaluate


def _attribute_path(node: ast.Attribute) -> list[str]:
    parts: list[str] = []
    cur: ast.AST = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    return parts


MAX_DEPTH = 32
"""How deeply an expression's operations may nest (evaluation recurses once per level)."""


def _depth(tree: ast.AST) -> int:
    """The nesting depth of `tree`, walked without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


GAUGE_ONLY = ("series", "end", "event_modes")
MAX_SERIES = 256  # characters of a series key


class GaugeReading(NamedTuple):
    """What one event says about one series of a gauge meter, fixed at ingest."""

    meter: str
    series: str
    mode: str  # `level`, `delta`, `state` (state fields only) or `end`
    value: Decimal | None  # the level or the change; None for `state` and `end`
    fields: dict[str, Any]  # the event's top-level data fields the meter's `where` reads


def _top_fields(source: str) -> tuple[str, ...]:
    """The top-level `data` fields an expression reads (`data.a.b` reads `a`)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source, mode="eval")):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "data"
            and node.attr not in names
        ):
            names.append(node.attr)
    return tuple(names)


class Meter:
    """A compiled meter: decides whether an event feeds it and with how much."""

    __slots__ = ("_end", "_series", "_value", "_where", "config", "max_level", "state_fields")

    def __init__(self, config: MeterConfig, index: int = 0, bucket_seconds: int = 3600) -> None:
        where = f"meters[{index}] ({config.name})"
        self.config = config
        # a gauge's level is bounded so that one series' bucket holds at most what one event
        # of a `sum` meter may carry (10^12 units): its integral stays a storage integer
        self.max_level = MAX_MICROS * max(config.time_unit_seconds, 1) // bucket_seconds
        self._series: Evaluator | None = None
        self._end: Evaluator | None = None
        self.state_fields: tuple[str, ...] = ()
        try:
            if config.aggregation in ("sum", "time_weighted"):
                if not config.value:
                    raise ConfigError(
                        f"`value` is required when aggregation is {config.aggregation!r}"
                    )
                self._value: Evaluator | None = compile_expression(config.value)
            else:
                if config.value:
                    raise ConfigError("`value` must be left out when aggregation is 'count'")
                self._value = None
            self._where = compile_expression(config.where, boolean=True) if config.where else None
            if config.aggregation == "time_weighted":
                self._compile_gauge(config)
            else:
                for name in GAUGE_ONLY:
                    if getattr(config, name):
                        raise ConfigError(f"`{name}` is only for aggregation 'time_weighted'")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc

    def _compile_gauge(self, config: MeterConfig) -> None:
        if not config.series:
            raise ConfigError("`series` is required when aggregation is 'time_weighted'")
        if config.mode == "state":
            raise ConfigError(
                "`mode` of `event_type` is 'level' or 'delta'; 'state' is for event_modes"
            )
        if config.time_unit_seconds <= 0:
            raise ConfigError("`time_unit_seconds` must be a positive number of seconds")
        if config.event_type in config.event_modes:
            raise ConfigError(f"event_modes: {config.event_type!r} is `event_type` already")
        self._series = compile_expression(config.series)
        self._end = compile_expression(config.end, boolean=True) if config.end else None
        self.state_fields = _top_fields(config.where) if config.where else ()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state_filter(self) -> Evaluator | None:
        """A gauge's `where`, read on its series' state fields."""
        return self._where

    @property
    def is_gauge(self) -> bool:
        return self.config.aggregation == "time_weighted"

    def measure(self, data: Mapping[str, Any]) -> int | None:
        """Micro-units this event adds, or None when the `where` filter leaves it out.

        Raises ExpressionError naming the meter and field when the event does not fit.
        """
        try:
            if self._where is not None and not self._where(data):
                return None
            if self._value is None:
                return to_micros(1)
            return _bounded(_number(self._value(data), "value"))
        except ExpressionError as exc:
            raise ExpressionError(f"meter {self.config.name}: {exc}", exc.path) from exc

    def read(self, event_type: str, data: Mapping[str, Any]) -> GaugeReading:
        """A gauge meter's reading of one event (its `where` applies later, to the series'
        state). Raises ExpressionError naming the meter and field when the event does not fit:
        no series, or a `level`/`delta` event without a numeric value."""
        assert self._series is not None and self._value is not None
        try:
            series = _series_key(self._series(data), self.config.series or "")
            fields = {k: data[k] for k in self.state_fields if k in data}
            if self._end is not None and _holds(self._end, data):
                return GaugeReading(self.name, series, "end", None, fields)
            mode = self.config.event_types[event_type]
            if mode == "state":
                return GaugeReading(self.name, series, "state", None, fields)
            value = _number(self._value(data), "value")
            if abs(_bounded(value)) > self.max_level:
                raise ExpressionError(
                    f"value: out of range: a level of at most {format_micros(self.max_level)} "
                    f"(one bucket of it is {format_micros(MAX_MICROS)} units)"
                )
            return GaugeReading(self.name, series, mode, value, fields)
        except ExpressionError as exc:
            raise ExpressionError(f"meter {self.config.name}: {exc}", exc.path) from exc


def _bounded(value: Decimal) -> int:
    """`value` in micro-units, refused past the bound one event may carry."""
    try:
        micros = to_micros(value)
    except ArithmeticError:  # far beyond what decimal arithmetic keeps exactly
        micros = MAX_MICROS + 1
    if abs(micros) > MAX_MICROS:
        raise ExpressionError(f"value: out of range ({MAX_MICROS} micro-units at most)")
    return micros


def _holds(condition: Evaluator, data: Mapping[str, Any]) -> bool:
    """A condition on one event; one that reads a field the event lacks does not hold."""
    try:
        return bool(condition(data))
    except ExpressionError as exc:
        if exc.missing or "is missing" in str(exc):
            return False
        raise


def _series_key(value: Any, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise ExpressionError(
            f"{source} (the series) is {kind}, not text or a number", _field_path(source)
        )
    key = str(value)
    if not 0 < len(key) <= MAX_SERIES:
        raise ExpressionError(
            f"{source} (the series) must be 1 to {MAX_SERIES} characters", _field_path(source)
        )
    return key


class MeterSet:
    """All configured meters, indexed by the event type they read."""

    def __init__(self, configs: list[MeterConfig], bucket_seconds: int = 3600) -> None:
        for i, c in enumerate(configs):
            if not METER_NAME.fullmatch(c.name):
                # ledger identifiers are `{org}:{meter}:{bucket}:{revision}`: a meter name
                # without ':' keeps them unambiguous (read from the right)
                raise ConfigError(
                    f"meters[{i}].name: {c.name!r} must be letters, digits, '_', '.' or '-'"
                )
        self.meters = [Meter(c, i, bucket_seconds) for i, c in enumerate(configs)]
        names = [m.name for m in self.meters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"meters: duplicate meter names {dupes}")
        self.by_type: dict[str, list[Meter]] = {}
        self.gauges_by_type: dict[str, list[Meter]] = {}
        for meter in self.meters:
            if meter.is_gauge:
                for event_type in meter.config.event_types:
                    self.gauges_by_type.setdefault(event_type, []).append(meter)
                    self.by_type.setdefault(event_type, [])
            else:
                self.by_type.setdefault(meter.config.event_type, []).append(meter)
        self.by_name = {m.name: m for m in self.meters}
        self.gauges = {m.name: m for m in self.meters if m.is_gauge}

    def measure(self, event_type: str, data: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
        """(meter, micro-units) for every `sum` or `count` meter this event feeds."""
        out = []
        for meter in self.by_type.get(event_type, ()):
            micros = meter.measure(data)
            if micros is not None:
                out.append((meter.name, micros))
        return tuple(out)

    def read(self, event_type: str, data: Mapping[str, Any]) -> tuple[GaugeReading, ...]:
        """The reading of every gauge meter this event feeds."""
        return tuple(m.read(event_type, data) for m in self.gauges_by_type.get(event_type, ()))
