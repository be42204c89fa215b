"""Console sign-in: a bearer token (the API's, see :mod:`controlplane.auth`) exchanged for a
short-lived session, and the CSRF token every form carries.

- The session lives in this process (:class:`Sessions`, kept in ``app.state``); the browser
  holds only a random id in the ``cp_console`` cookie: HttpOnly, SameSite=Strict, path
  ``/console``, ``Secure`` when the request came over HTTPS. The token itself is never stored,
  rendered or logged; the session keeps the token's name and scopes. Sessions end after
  :data:`SESSION_SECONDS`, at sign-out, or when the process restarts (behind several replicas,
  route a browser to one of them, or sign in again).
- Every form carries the session's CSRF token (``csrf``); a POST without it, or with another,
  is refused and changes nothing. The sign-in form, before any session, carries a token that
  must match the ``cp_console_signin`` cookie (double submit), so a foreign page cannot sign a
  browser in under another token.
- Pages need the ``read`` scope, actions ``admin``: :func:`console_session`, the console's one
  guard, reads ``opt["scope"]`` as the API's guards do.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.handlers.base import BaseRouteHandler

from controlplane.auth import Principal

COOKIE = "cp_console"
SIGNIN_COOKIE = "cp_console_signin"
PATH = "/console"
SESSION_SECONDS = 30 * 60  # short-lived: sign in again after half an hour
MAX_SESSIONS = 10_000  # the oldest are dropped past this (each sign-in makes one)


class NotSignedIn(Exception):
    """No valid console session: the page sends the browser to sign in."""


class Refused(Exception):
    """The console refuses this request (a missing scope, a missing or wrong CSRF token);
    nothing was changed. The message is shown to the user."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


class Session(msgspec.Struct, frozen=True):
    id: str
    name: str  # the token's name: the actor of every action
    scopes: frozenset[str]
    csrf: str
    expires: float

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes


class Sessions:
    """The console's sessions in this process, by random id."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def open(self, principal: Principal) -> Session:
        now = self._clock()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        session = Session(
            id=secrets.token_urlsafe(32),
            name=principal.name,
            scopes=principal.scopes,
            csrf=secrets.token_urlsafe(32),
            expires=now + SESSION_SECONDS,
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None or session.expires <= self._clock():
            self._by_id.pop(session_id, None)
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)


def sessions_of(request: Request[Any, Any, Any]) -> Sessions:
    sessions: Sessions = request.app.state.console_sessions
    return sessions


def secure(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def session_cookie(request: Request[Any, Any, Any], value: str, max_age: int) -> Cookie:
    return Cookie(
        key=COOKIE,
        value=value,
        path=PATH,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )


def signin_cookie(request: Request[Any, Any, Any], value: str) -> Cookie:
    return Cookie(
        key=SIGNIN_COOKIE,
        value=value,
        path=PATH,
        max_age=10 * 60,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )


def console_session(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The console's guard: a live session whose token has the scope `opt["scope"]` (None:
    open, the sign-in form). NotSignedIn without one; Refused when the scope is missing."""
    scope = handler.opt.get("scope")
    if scope is None:
        return
    sessions: Sessions = connection.app.state.console_sessions
    session = sessions.get(connection.cookies.get(COOKIE))
    if session is None:
        raise NotSignedIn
    if scope not in session.scopes:
        raise Refused(f"token {session.name!r} lacks the {scope!r} scope this needs")
    connection.state.console_session = session


def current(connection: ASGIConnection[Any, Any, Any, Any]) -> Session:
    """The session the guard admitted."""
    session: Session = connection.state.console_session
    return session


def signed_in(connection: ASGIConnection[Any, Any, Any, Any]) -> Session | None:
    """The connection's live session, if any (for pages the guard did not admit)."""
    sessions: Sessions = connection.app.state.console_sessions
    return sessions.get(connection.cookies.get(COOKIE))


def check_csrf(session_csrf: str, form: dict[str, Any]) -> None:
    """Refuse a form whose `csrf` field is not the session's token (compared in constant
    time)."""
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), session_csrf.encode()):
        raise Refused("missing or wrong CSRF token: the form was not sent from this console")
