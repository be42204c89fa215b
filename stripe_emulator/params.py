"""Request parameters: Stripe's form encoding, the parsed request, typed readers that
answer Stripe's validation errors, and list pagination.

Unknown parameters are refused (``parameter_unknown``), as Stripe does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from urllib.parse import parse_qsl

from stripe_emulator.errors import EmulatedError, Json, invalid, missing

LIST_FIELDS = frozenset({"limit", "starting_after", "ending_before"})

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def parse_form(raw: str) -> Json:
    """Decode Stripe's form encoding (``a[b][c]=v``, ``items[0][price]=p``, ``a[]=v``).

    Values stay strings, as on the wire; objects whose keys are all indexes become lists.
    """
    root: Json = {}
    nested = False
    for key, value in parse_qsl(raw, keep_blank_values=True):
        bracket = key.find("[")
        if bracket <= 0:
            root[key] = value
            continue
        nested = True
        parts = [key[:bracket], *_BRACKETS.findall(key[bracket:])]
        node: Json = root
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            name = part if part else str(len(node))
            if last:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                if child is not None:
                    raise invalid(key, f"Invalid parameter: {key} mixes a value and an object.")
                child = {}
                node[name] = child
            node = child
    return _listify(root) if nested else root


def _listify(node: Json) -> Json:
    for key, value in node.items():
        if isinstance(value, dict):
            value = _listify(value)
            if value and all(k.isdigit() for k in value):
                node[key] = [value[k] for k in sorted(value, key=int)]
            else:
                node[key] = value
    return node


@dataclasses.dataclass(slots=True)
class ApiRequest:
    """One parsed ``/v1`` request, as the handlers see it."""

    method: str
    path: str
    params: Json
    headers: dict[str, str]
    args: dict[str, str]  # path parameters, e.g. {"id": "mtr_..."}
    request_id: str = ""  # carried by the events the request emits


def str_param(params: Json, name: str, *, required: bool = False, max_length: int = 5000) -> str:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return ""
    if not isinstance(value, str):
        raise invalid(name, f"Invalid string: {name} must be a string.")
    if len(value) > max_length:
        raise invalid(name, f"Invalid string: {name} must be at most {max_length} characters long.")
    return value


def int_param(params: Json, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise invalid(name, f"Invalid integer: {value}", code="parameter_invalid_integer")
    return int(value)


def only_params(params: Json, allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed and name != "expand":
            raise EmulatedError(
                400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )


def obj_param(params: Json, name: str) -> Json:
    value = params.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise invalid(name, f"Invalid object: {name} must be an object.")
    return value


def bool_param(params: Json, name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise invalid(name, f"Invalid boolean: {value}", code="parameter_invalid_boolean")
    return bool(value == "true")


def str_list_param(params: Json, name: str, *, max_items: int | None = None) -> list[str] | None:
    """An array of strings (``a[0]=x&a[1]=y`` or ``a[]=x``); None when absent."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(name, f"Invalid array: {name} must be an array of strings.")
    if max_items is not None and len(value) > max_items:
        raise invalid(name, f"Invalid {name}: you can specify up to {max_items} values.")
    return value


def currency_param(params: Json, name: str, *, required: bool = False) -> str:
    value = str_param(params, name, required=required).lower()
    if value and not re.fullmatch(r"[a-z]{3}", value):
        raise invalid(name, f"Invalid currency: {value}.")
    return value


def metadata_param(params: Json, current: Json | None = None) -> Json | None:
    """Stripe's metadata rules; None when absent. On update an empty value unsets its key and
    an empty ``metadata`` unsets them all."""
    if "metadata" not in params:
        return None
    raw = params["metadata"]
    if raw == "":
        return {}
    if not isinstance(raw, dict):
        raise invalid("metadata", "Invalid object: metadata must be an object.")
    merged = dict(current or {})
    for key, value in raw.items():
        param = f"metadata[{key}]"
        if not isinstance(value, str):
            raise invalid(param, f"Invalid string: {param} must be a string.")
        if len(key) > 40:
            raise invalid(param, "Metadata keys can be at most 40 characters long.")
        if len(value) > 500:
            raise invalid(param, "Metadata values can be at most 500 characters long.")
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    if len(merged) > 50:
        raise invalid("metadata", "Metadata can have at most 50 keys.")
    return merged


def only_keys(value: Json, allowed: frozenset[str], prefix: str) -> None:
    for name in value:
        if name not in allowed:
            param = f"{prefix}[{name}]"
            raise EmulatedError(
                400, f"Received unknown parameter: {param}", param=param, code="parameter_unknown"
            )


def created_filter(items: list[Json], params: Json) -> list[Json]:
    created = params.get("created")
    if created is None or created == "":
        return items
    if isinstance(created, str):
        exact = int_param(params, "created")
        return [i for i in items if i["created"] == exact]
    if not isinstance(created, dict):
        raise invalid("created", "Invalid created: an integer or a range.")
    only_keys(created, frozenset({"gt", "gte", "lt", "lte"}), "created")
    tests: dict[str, Callable[[int, int], bool]] = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    for key in created:
        bound = int_param(created, key)
        assert bound is not None
        items = [i for i in items if tests[key](int(i["created"]), bound)]
    return items


def list_page(items: list[Json], params: Json, url: str) -> Json:
    limit = int_param(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise invalid("limit", "Invalid limit: must be between 1 and 100.")
    after = str_param(params, "starting_after")
    before = str_param(params, "ending_before")
    ids = [item["id"] for item in items]
    if after:
        if after not in ids:
            raise invalid("starting_after", f"No such object: '{after}'", code="resource_missing")
        rest = items[ids.index(after) + 1 :]
        page, has_more = rest[:limit], len(rest) > limit
    elif before:
        if before not in ids:
            raise invalid("ending_before", f"No such object: '{before}'", code="resource_missing")
        head = items[: ids.index(before)]
        page, has_more = head[-limit:], len(head) > limit
    else:
        page, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}
