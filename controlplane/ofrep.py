"""OpenFeature Remote Evaluation Protocol (OFREP) views of the flags.

A legacy biller in any language reads the same flags as ``GET /v1/flags`` through an
OpenFeature SDK with its OFREP provider:

- ``POST /ofrep/v1/evaluate/flags/{key}``: one flag;
- ``POST /ofrep/v1/evaluate/flags``: every flag (with an ``ETag``; ``If-None-Match`` gives 304).

Served keys: ``shadow`` (boolean), ``authority`` (string), ``bill_from`` and
``legacy_bill_until`` (integers, unix seconds). A flag without a value (``bill_from`` unset,
``legacy_bill_until`` while the legacy biller is the authority) is answered with reason
``DISABLED`` and no value, so the SDK returns the caller's default. These answers ignore the
evaluation context: every caller gets the same one.

One key is per org: ``controlplane_billed_ranges`` (an object), for the org named by the
context's ``org`` (or its ``targetingKey``): ``{"org", "legacy_bill_until", "ranges": [{"start",
"end"}, ...]}``, the buckets the control plane bills (see :mod:`controlplane.seam`), read at one
moment with ``legacy_bill_until``, reason ``TARGETING_MATCH``. The context may narrow the window
with ``from`` and ``to`` (unix seconds on bucket boundaries; default: all time). Without an org
it is ``TARGETING_KEY_MISSING``; the bulk evaluation includes it only when the context names one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from controlplane.flags import Snapshot
from controlplane.flags.definitions import to_json
from controlplane.times import MAX_SECONDS

ORG_KEY = "controlplane_billed_ranges"
FLAG_KEYS = ("shadow", "authority", "bill_from", "legacy_bill_until")
KEYS = (*FLAG_KEYS, ORG_KEY)


class OfrepError(Exception):
    """An OFREP error answer: HTTP status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(body.get("errorDetails", ""))


def _raw(snapshot: Snapshot, key: str) -> tuple[Any, dict[str, Any]]:
    if key == "legacy_bill_until":
        authority = snapshot.values["authority"]
        return snapshot.legacy_bill_until, {"source": "derived", "version": authority.version}
    flag = snapshot.values[key]
    return to_json(flag.value), {"source": flag.source, "version": flag.version}


def evaluate(snapshot: Snapshot, key: str) -> dict[str, Any]:
    """One flag as an OFREP evaluation success; raises OfrepError (404) for an unknown key."""
    if key not in FLAG_KEYS:
        raise OfrepError(
            404,
            {
                "key": key,
                "errorCode": "FLAG_NOT_FOUND",
                "errorDetails": f"unknown flag {key!r}; known: {list(KEYS)}",
            },
        )
    value, metadata = _raw(snapshot, key)
    if value is None:
        return {"key": key, "reason": "DISABLED", "variant": "unset", "metadata": metadata}
    return {
        "key": key,
        "value": value,
        "reason": "STATIC",
        "variant": str(value).lower(),
        "metadata": metadata,
    }


def evaluate_ranges(
    org: str, legacy_bill_until: int | None, ranges: list[tuple[int, int]]
) -> dict[str, Any]:
    """The per-org flag as an OFREP evaluation success (an object value)."""
    return {
        "key": ORG_KEY,
        "value": {
            "org": org,
            "legacy_bill_until": legacy_bill_until,
            "ranges": [{"start": start, "end": end} for start, end in ranges],
        },
        "reason": "TARGETING_MATCH",
        "variant": "ranges" if ranges else "none",
        "metadata": {"source": "ledger", "version": 0},
    }


class OrgQuery(msgspec.Struct, frozen=True):
    """What the per-org flag is asked for: an org, and a window of bucket starts."""

    org: str | None
    start: int
    end: int


def org_query(body: bytes, bucket_seconds: int, key: str | None = None) -> OrgQuery:
    """The org (`org`, else `targetingKey`) and the window (`from`, `to`) of a request's
    evaluation context, its body already checked (:func:`check_request`). Raises OfrepError
    (400, INVALID_CONTEXT) naming a field that is not what it must be; the window's own
    rules (bucket boundaries, `from` before `to`) are the seam's."""
    data = msgspec.json.decode(body) if body.strip() else {}
    context = data.get("context") or {}
    org = context.get("org", context.get("targetingKey"))
    last = MAX_SECONDS - MAX_SECONDS % bucket_seconds
    window = {"from": context.get("from", 0), "to": context.get("to", last)}
    for name, value in (("org", org), *window.items()):
        wrong = (
            not isinstance(value, str) or not value
            if name == "org"
            else not isinstance(value, int) or isinstance(value, bool) or value < 0
        )
        if value is not None and wrong:
            want = "a non-empty string" if name == "org" else "unix seconds (an integer)"
            raise OfrepError(
                400,
                {
                    "key": key,
                    "errorCode": "INVALID_CONTEXT",
                    "errorDetails": f"context.{name}: must be {want}",
                },
            )
    return OrgQuery(org=org, start=window["from"], end=window["to"])


def missing_org(key: str) -> OfrepError:
    return OfrepError(
        400,
        {
            "key": key,
            "errorCode": "TARGETING_KEY_MISSING",
            "errorDetails": f"{key} is per org: name it as context.org (or targetingKey)",
        },
    )


def bulk(snapshot: Snapshot, per_org: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Every flag (and the per-org one, when the context named an org), and the ETag of the
    answer."""
    flags = [evaluate(snapshot, key) for key in FLAG_KEYS]
    body = {"flags": flags if per_org is None else [*flags, per_org]}
    etag = '"' + hashlib.sha256(msgspec.json.encode(body)).hexdigest()[:32] + '"'
    return body, etag


def check_request(body: bytes, key: str | None = None) -> None:
    """The request body is empty or a JSON object whose `context`, if present, is an object."""
    if not body.strip():
        return
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise OfrepError(
            400, {"key": key, "errorCode": "PARSE_ERROR", "errorDetails": f"invalid JSON: {exc}"}
        ) from exc
    context = data.get("context") if isinstance(data, dict) else None
    if not isinstance(data, dict) or (context is not None and not isinstance(context, dict)):
        raise OfrepError(
            400,
            {
                "key": key,
                "errorCode": "INVALID_CONTEXT",
                "errorDetails": 'the body must be {"context": {...}}',
            },
        )
