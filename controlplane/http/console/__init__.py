"""The web console under ``/console/``: server-rendered pages over the core for watching and
driving a cutover (see docs/reference/console.md).

Plain HTML forms and Jinja2 templates (autoescaped) through litestar's template support, a
stylesheet shipped as package data, no JavaScript. Sign-in, sessions and CSRF:
:mod:`.session`; pages: :mod:`.pages`; forms: :mod:`.actions`; charts: :mod:`.charts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from controlplane.http.console.actions import ConsoleActions
from controlplane.http.console.pages import ConsolePages
from controlplane.http.console.session import NotSignedIn, Refused, Sessions, signed_in
from controlplane.times import iso

HERE = Path(__file__).parent
HEADERS = {
    # no script at all; styles and images from this origin only; forms post here only
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _json(value: Any) -> str:
    """A flag value as the API writes it: `true`, `null`, `"legacy"` without quotes."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _engine(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters["iso"] = iso
    engine.engine.filters["json"] = _json


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(
        directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=_engine
    )


def _not_signed_in(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return Redirect(path="/console/sign-in", status_code=303)


def _refused(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    status = exc.status if isinstance(exc, Refused) else 403
    session = signed_in(request)
    return Template(
        template_name="refused.html",
        context={"message": str(exc), "user": session.name if session else None},
        status_code=status,
    )


async def _headers(response: Response[Any]) -> Response[Any]:
    response.headers.update(HEADERS)
    return response


def router() -> Router:
    """The console's routes: pages, forms and the stylesheet."""
    return Router(
        "/",
        route_handlers=[
            ConsolePages,
            ConsoleActions,
            create_static_files_router(
                path="/console/static", directories=[HERE / "static"], include_in_schema=False
            ),
        ],
        exception_handlers={NotSignedIn: _not_signed_in, Refused: _refused},
        after_request=_headers,
        include_in_schema=False,
    )


__all__ = ["Sessions", "router", "template_config"]
