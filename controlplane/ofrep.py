"""OpenFeature Remote Evaluation Protocol (OFREP) views of the flags.

A legacy biller in any language reads the same flags as ``GET /v1/flags`` through an
OpenFeature SDK with its OFREP provider:

- ``POST /ofrep/v1/evaluate/flags/{key}``: one flag;
- ``POST /ofrep/v1/evaluate/flags``: every flag (with an ``ETag``; ``If-None-Match`` gives 304).

Served keys: ``shadow`` (boolean), ``authority`` (string), ``bill_from`` and
``legacy_bill_until`` (integers, unix seconds). A flag without a value (``bill_from`` unset,
``legacy_bill_until`` while the legacy biller is the authority) is answered with reason
``DISABLED`` and no value, so the SDK returns the caller's default. The evaluation context is
accepted and ignored: every caller gets the same answer.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from controlplane.flags import Snapshot
from controlplane.flags.definitions import to_json

KEYS = ("shadow", "authority", "bill_from", "legacy_bill_until")


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
    if key not in KEYS:
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


def bulk(snapshot: Snapshot) -> tuple[dict[str, Any], str]:
    """Every flag, and the ETag of the answer."""
    body = {"flags": [evaluate(snapshot, key) for key in KEYS]}
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
