"""The litestar app: controllers, the control plane's lifespan, auth state, errors and the
OpenAPI document (served at ``/schema``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide

from controlplane.auth import TokenStore
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http import console
from controlplane.http.controllers import cutover
from controlplane.http.controllers.capabilities import CapabilitiesController, JwksController
from controlplane.http.controllers.catalog import CatalogController
from controlplane.http.controllers.events import EventsController
from controlplane.http.controllers.flags import FLAG_BODIES, FlagsController
from controlplane.http.controllers.health import HealthController, MetricsController
from controlplane.http.controllers.jobs import JobsController
from controlplane.http.controllers.money import MoneyParityController, MoneyRunsController
from controlplane.http.controllers.ofrep import OfrepController
from controlplane.http.controllers.orgs import OrgPut, OrgsController, ReleaseBody
from controlplane.http.controllers.parity import ParityRunsController, UsageParityController
from controlplane.http.controllers.reconciliation import ReconciliationController
from controlplane.http.controllers.seam import SeamController
from controlplane.http.controllers.usage import UsageController
from controlplane.http.controllers.webhooks import WebhooksController
from controlplane.http.middleware import request_id_middleware
from controlplane.http.openapi import (
    document_bodies,
    document_plans,
    document_window,
    openapi_config,
)
from controlplane.http.params import provide_cp
from controlplane.http.problems import on_error
from controlplane.ratelimit import IngestLimiter

BODIES: tuple[type[msgspec.Struct], ...] = (
    *FLAG_BODIES.values(),
    OrgPut,
    ReleaseBody,
    *cutover.BODIES,
)  # the JSON bodies `strict_body` checks


def create_app(
    config: Config,
    *,
    cp: ControlPlane | None = None,
    scheduler: bool = False,
    started: bool = False,
) -> Litestar:
    """The litestar app. Starts (and closes) the control plane in its lifespan, unless the
    caller passes one it has `started` itself; with `scheduler`, also runs the rollup and
    sender jobs on their intervals."""
    plane = cp or ControlPlane(config, migrate=config.server.migrate_on_start)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if not started:
                await stack.enter_async_context(plane)
            app.state.cp = plane
            if scheduler:
                from controlplane.scheduler import Jobs

                jobs = Jobs(plane)
                jobs.start()
                app.state.jobs = jobs
                try:
                    yield
                finally:
                    jobs.stop()
            else:
                yield

    app = Litestar(
        route_handlers=[
            # ingest alone may read bodies up to max_body_bytes; every other body is small
            Router(
                "/",
                route_handlers=[EventsController],
                request_max_body_size=config.server.max_body_bytes,
            ),
            UsageController,
            FlagsController,
            OrgsController,
            JobsController,
            HealthController,
            MetricsController,
            UsageParityController,
            ParityRunsController,
            MoneyParityController,
            MoneyRunsController,
            ReconciliationController,
            CatalogController,
            WebhooksController,
            cutover.CutoverController,
            SeamController,
            OfrepController,
            CapabilitiesController,
            JwksController,
            console.router(),
        ],
        dependencies={"cp": Provide(provide_cp)},
        lifespan=[lifespan],
        exception_handlers={Exception: on_error},
        middleware=[request_id_middleware],
        request_max_body_size=config.server.max_small_body_bytes,
        state=State(
            {
                "tokens": TokenStore(config.auth),
                "limiter": IngestLimiter(config),
                "console_sessions": console.Sessions(),
            }
        ),
        template_config=console.template_config(),
        openapi_config=openapi_config(),
        debug=False,
    )
    document_bodies(app.openapi_schema, BODIES)
    document_plans(app.openapi_schema, [p.name for p in config.plans])
    document_window(app.openapi_schema, config.rollup.bucket_seconds)
    return app
