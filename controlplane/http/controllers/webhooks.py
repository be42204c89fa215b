"""`POST /webhooks/stripe`: Stripe's webhook events; `POST /webhooks/stripe/thin`: thin events
from a Stripe event destination. Both authenticated by their signature."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import structlog
from litestar import Controller, Request, Response, post
from litestar.params import HeaderParameter

from controlplane.http.params import CP
from controlplane.http.problems import documented, problem
from controlplane.interfaces import NotAnEvent, WebhookRejected

log = structlog.get_logger("api")


class WebhookReceipt(msgspec.Struct):
    received: bool
    event: str  # the Stripe event id
    type: str
    duplicate: bool  # delivered before: nothing done again
    outcome: str  # what was done, e.g. "provisioned", "ignored: ...", "refused: ..."


class WebhooksController(Controller):
    path = "/webhooks"
    tags = ["webhooks"]

    @post(
        "/stripe",
        status_code=200,
        summary="Stripe webhook events (signed)",
        responses=documented(400, 413, 503),
    )
    async def stripe_webhook(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        signature: Annotated[
            str | None, HeaderParameter(name="stripe-signature", description="t=...,v1=...")
        ] = None,
    ) -> Response[WebhookReceipt]:
        """Authenticated by the `Stripe-Signature` header (HMAC-SHA256 over the raw body with
        `stripe.webhook_secret`, 300 s tolerance): 400 when it does not verify or is not a
        Stripe v1 event, nothing done; a signed event that cannot be used or is refused is
        answered 200 with its recorded outcome (`unprocessable: ...`, `refused: ...`)."""
        body = await request.body()
        try:
            result = await cp.stripe_webhook(body, signature)
        except NotAnEvent as exc:  # logged and alerted by the handler
            return problem(400, "Not a Stripe event", exc.message)
        except WebhookRejected as exc:
            log.warning("webhook.rejected", error=exc.message)
            return problem(400, "Bad signature", exc.message)
        receipt = WebhookReceipt(
            received=True,
            event=result.event_id,
            type=result.type,
            duplicate=result.duplicate,
            outcome=result.outcome,
        )
        return Response(receipt, status_code=200)

    @post(
        "/stripe/thin",
        status_code=200,
        summary="Stripe thin events from an event destination (signed)",
        responses=documented(400, 413, 503),
    )
    async def stripe_thin_event(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        signature: Annotated[
            str | None, HeaderParameter(name="stripe-signature", description="t=...,v1=...")
        ] = None,
    ) -> Response[WebhookReceipt]:
        """Authenticated by the `Stripe-Signature` header (HMAC-SHA256 over the raw body with
        `stripe.event_destination_secret`, 300 s tolerance) and parsed with the SDK: 400 when
        it does not verify or is not a v2 thin event, nothing done. A meter-event error report
        (or no-meter-found) holds the sampled ledger rows as `provider_error`; a redelivered
        event id is answered 200 with `duplicate: true` and changes nothing; 503 when Stripe
        could not be asked for the full event (Stripe resends)."""
        body = await request.body()
        try:
            result = await cp.stripe_thin_event(body, signature)
        except NotAnEvent as exc:
            return problem(400, "Not a Stripe thin event", exc.message)
        except WebhookRejected as exc:
            log.warning("thin_event.rejected", error=exc.message)
            return problem(400, "Bad signature", exc.message)
        receipt = WebhookReceipt(
            received=True,
            event=result.event_id,
            type=result.type,
            duplicate=result.duplicate,
            outcome=result.outcome,
        )
        return Response(receipt, status_code=200)
