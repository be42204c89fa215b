"""The request id and access log around every request, and the checks of a raw body's size
and encoding that the ingest endpoint (which reads its body itself) makes."""

from __future__ import annotations

import re
import time
import uuid
import zlib
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, Scope, Send

log = structlog.get_logger("api")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def _request_id(given: bytes) -> str:
    """The caller's `X-Request-ID` when it is a plain token (letters, digits, `._:-`, at most
    64), else a new one: never an error, whatever bytes the header holds."""
    return given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Bind `request_id` to every log event of a request, answer it in `X-Request-ID`, and log
    the request (`http.request`) when it is done."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        rid = _request_id(headers.get(b"x-request-id", b""))
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            await app(scope, receive, send_with_id)
            log.info(
                "http.request",
                method=scope.get("method"),
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )

    return middleware


def declared_length(value: str | None) -> int | None:
    """`Content-Length` as sent, read without int() of an unbounded string (whose digits may
    be thousands, or not ASCII): 400 when it is no number of bytes."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise HTTPException(status_code=400, detail="Content-Length: not a number of bytes")
    return int(value) if len(value) <= 18 else 10**18  # past any body limit


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before its `Content-Encoding`: gzip is decompressed, at most `limit`
    bytes of it (413 past that: a small gzip can hold gigabytes); others are refused (415)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise HTTPException(
            status_code=415, detail=f"Content-Encoding {encoding[:32]!r}: only gzip is accepted"
        )
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPException(status_code=400, detail=f"not valid gzip: {exc}") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise HTTPException(status_code=413, detail=f"decompressed body over {limit} bytes")
    if not inflate.eof:
        raise HTTPException(status_code=400, detail="gzip body is truncated")
    return out
