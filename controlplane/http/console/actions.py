"""The console's forms (POST): sign-in and sign-out, the cutover steps, and issuing a
capability token.

Every cutover step (and issuing a token) needs a session with the `admin` scope and the
session's CSRF token, and runs the same core operation as the API
(:attr:`ControlPlane.cutover`, :meth:`ControlPlane.issue_capability`), audited with the
token's name as the actor. A refused step changes nothing and is answered with its page
naming why.
"""

from __future__ import annotations

import secrets
from typing import Any

import structlog
from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from controlplane.auth import Unauthorized
from controlplane.errors import ControlPlaneError
from controlplane.http.console.pages import cutover_context, org_context, render
from controlplane.http.console.session import (
    COOKIE,
    SESSION_SECONDS,
    SIGNIN_COOKIE,
    Refused,
    Session,
    check_csrf,
    console_session,
    current,
    session_cookie,
    sessions_of,
    signin_cookie,
)
from controlplane.http.params import CP
from controlplane.times import parse_instant

log = structlog.get_logger("console")


async def form_of(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The form's fields (the last value of each); files are ignored."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def signin_page(request: Request[Any, Any, Any], error: str | None, status: int) -> Template:
    nonce = secrets.token_urlsafe(32)
    return Template(
        template_name="signin.html",
        context={"csrf": nonce, "error": error},
        status_code=status,
        cookies=[signin_cookie(request, nonce)],
    )


def instant(text: str | None, field: str) -> int:
    """Unix seconds or RFC 3339, as the API takes them; Refused (400) naming the field."""
    try:
        return parse_instant((text or "").strip())
    except ValueError as exc:
        raise Refused(f"{field}: {exc}", status=400) from None


class ConsoleActions(Controller):
    """The cutover steps need a session with the `admin` scope; signing in needs none."""

    path = "/console"
    include_in_schema = False
    guards = [console_session]
    opt = {"scope": "admin"}

    @get("/sign-in", opt={"scope": None})
    async def sign_in_form(self, request: Request[Any, Any, Any]) -> Template:
        return signin_page(request, None, 200)

    @post("/sign-in", status_code=303, opt={"scope": None})
    async def sign_in(self, request: Request[Any, Any, Any]) -> Redirect | Template:
        form = await form_of(request)
        expected = request.cookies.get(SIGNIN_COOKIE)
        if not expected:
            return signin_page(request, "the sign-in form expired: try again", 403)
        try:
            check_csrf(expected, form)
        except Refused as exc:
            return signin_page(request, str(exc), 403)
        try:
            principal = request.app.state.tokens.authenticate(
                "Bearer " + form.get("token", "").strip()
            )
        except Unauthorized:
            log.info("console.sign_in_refused")
            return signin_page(request, "unknown token", 401)
        if "read" not in principal.scopes:
            return signin_page(
                request, f"token {principal.name!r} lacks the 'read' scope the console needs", 403
            )
        sessions = sessions_of(request)
        sessions.close(request.cookies.get(COOKIE))  # a new sign-in never keeps an old id
        session = sessions.open(principal)
        log.info("console.signed_in", actor=principal.name)
        redirect = Redirect(path="/console/", status_code=303)
        redirect.set_cookie(session_cookie(request, session.id, SESSION_SECONDS))
        redirect.delete_cookie(SIGNIN_COOKIE, path="/console")
        return redirect

    @post("/sign-out", status_code=303, opt={"scope": "read"})
    async def sign_out(self, request: Request[Any, Any, Any]) -> Redirect:
        session = current(request)
        check_csrf(session.csrf, await form_of(request))
        sessions_of(request).close(session.id)
        redirect = Redirect(path="/console/sign-in", status_code=303)
        redirect.delete_cookie(COOKIE, path="/console")
        return redirect

    async def _step(self, request: Request[Any, Any, Any]) -> tuple[Session, dict[str, str]]:
        """The (admin) session of a cutover step, after its CSRF check, and the form."""
        session = current(request)
        form = await form_of(request)
        check_csrf(session.csrf, form)
        return session, form

    async def _answer(
        self, request: Request[Any, Any, Any], cp: CP, session: Session, **result: Any
    ) -> Template:
        status = 409 if result.get("error") else 200
        return render(request, session, "cutover", status, **await cutover_context(cp), **result)

    @post("/cutover/plan", status_code=200)
    async def plan(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        session, form = await self._step(request)
        at = instant(form.get("at"), "T")
        try:
            plan = await cp.cutover.plan(at)
        except ControlPlaneError as exc:
            return await self._answer(request, cp, session, error=exc.message, typed_t=at)
        return await self._answer(request, cp, session, plan=plan, typed_t=at)

    @post("/cutover/preflight", status_code=200)
    async def preflight(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        session, form = await self._step(request)
        at = instant(form.get("at"), "T")
        try:
            report = await cp.cutover.preflight(at)
        except ControlPlaneError as exc:
            return await self._answer(request, cp, session, error=exc.message, typed_t=at)
        return await self._answer(request, cp, session, preflight=report, typed_t=at)

    @post("/cutover/execute", status_code=200)
    async def execute(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        session, form = await self._step(request)
        at = instant(form.get("at"), "T")
        if instant(form.get("confirm"), "T, typed again") != at:
            return await self._answer(
                request, cp, session, error="T typed again does not match T: nothing changed"
            )
        reason = form.get("reason", "").strip()
        if not reason:
            return await self._answer(request, cp, session, error="a reason is required")
        try:
            report, _ = await cp.cutover.execute(
                at, actor=session.name, reason=reason, force=form.get("force") == "on"
            )
        except ControlPlaneError as exc:
            return await self._answer(request, cp, session, error=exc.message, typed_t=at)
        return await self._answer(request, cp, session, executed=report, preflight=report)

    @post("/cutover/rollback", status_code=200)
    async def rollback(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        session, form = await self._step(request)
        reason = form.get("reason", "").strip()
        if not reason:
            return await self._answer(request, cp, session, error="a reason is required")
        try:
            result = await cp.cutover.rollback(
                actor=session.name, reason=reason, cancel_sent=form.get("cancel_sent") == "on"
            )
        except ControlPlaneError as exc:
            return await self._answer(request, cp, session, error=exc.message)
        return await self._answer(request, cp, session, rolled_back=result)

    @post("/orgs/capabilities", status_code=200)
    async def issue_capability(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        """A capability token for the org, shown once on the page (audited by digest)."""
        session, form = await self._step(request)
        org = form.get("org", "").strip()
        if not org:
            raise Refused("org: required", status=400)
        try:
            token = await cp.issue_capability(org, actor=session.name)
        except ControlPlaneError as exc:
            context = await org_context(cp, org)
            return render(request, session, "orgs", 409, **context, error=exc.message)
        return render(request, session, "orgs", **await org_context(cp, org), token=token)
