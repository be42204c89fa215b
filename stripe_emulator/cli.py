"""The command line: ``python -m stripe_emulator`` (also ``controlplane stripe-emulator``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Sequence

from stripe_emulator.app import StripeEmulator
from stripe_emulator.server import DEFAULT_PORT, serve_emulator
from stripe_emulator.state import (
    ASYNC_RULES,
    DEFAULT_INVOICE_FINALIZE_DELAY,
    MeterValidation,
)


def run(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    rate_limit: float | None = None,
    fail_rate: float = 0.0,
    drop_rate: float = 0.0,
    latency_ms: float = 0.0,
    seed: int | None = None,
    *,
    log_events: bool = True,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    invoice_finalize_delay: float | None = DEFAULT_INVOICE_FINALIZE_DELAY,
    meter_validation: MeterValidation | None = None,
) -> None:
    """Serve an emulator until interrupted, printing each accepted meter event to stdout.

    With `webhook_url`, every event is delivered there, signed with `webhook_secret` (or a
    generated one, printed)."""
    emulator = StripeEmulator(
        rate_limit=rate_limit,
        fail_rate=fail_rate,
        drop_rate=drop_rate,
        latency_ms=latency_ms,
        seed=seed,
        log_events=log_events,
        invoice_finalize_delay=invoice_finalize_delay,
        meter_validation=meter_validation,
    )
    if webhook_url:
        registered = emulator.add_webhook_endpoint(webhook_url, secret=webhook_secret)
        print(
            f"[stripe-emulator] webhooks -> {webhook_url}  (endpoint {registered['id']}, "
            f"secret {registered['secret']})",
            flush=True,
        )
    faults = ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(emulator.faults).items() if v not in (None, 0)
    )

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port) as url:
            print(
                f'[stripe-emulator] listening on {url}  (billing: api_base = "{url}", any '
                f"api_key starting with sk_){'  faults: ' + faults if faults else ''}",
                flush=True,
            )
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    """``controlplane stripe-emulator`` (also ``python -m stripe_emulator``)."""
    parser = argparse.ArgumentParser(
        prog="controlplane stripe-emulator",
        description="Run a stateful Stripe emulator for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of POSTs -> 500")
    parser.add_argument(
        "--drop-rate", type=float, default=0.0, help="fraction of meter events cut off"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="do not print each meter event")
    parser.add_argument("--webhook-url", default=None, help="deliver every event to this URL")
    parser.add_argument(
        "--webhook-secret", default=None, help="whsec_... to sign with (default: generated)"
    )
    parser.add_argument(
        "--invoice-finalize-delay",
        type=float,
        default=DEFAULT_INVOICE_FINALIZE_DELAY,
        help="seconds from invoice.created to automatic finalization (negative: never)",
    )
    parser.add_argument(
        "--sync-checks",
        default="",
        help="meter-event checks answered 400 instead of reported later, comma-separated: "
        f"{', '.join(ASYNC_RULES)} (default: none, all reported asynchronously)",
    )
    parser.add_argument(
        "--report-window", type=int, default=60, help="error-report window, seconds"
    )
    parser.add_argument(
        "--summary-lag", type=float, default=0.0, help="seconds before summaries count an event"
    )
    args = parser.parse_args(argv)
    try:
        sync = [r for r in args.sync_checks.split(",") if r]
        unknown = sorted(set(sync) - set(ASYNC_RULES))
        if unknown:
            raise ValueError(f"--sync-checks: unknown {unknown}; known: {list(ASYNC_RULES)}")
        validation = MeterValidation(
            report_window_seconds=args.report_window, summary_lag_seconds=args.summary_lag
        )
        for rule in sync:
            setattr(validation, rule, "sync")
        validation.check()
        run(
            args.host,
            args.port,
            args.rate_limit,
            args.fail_rate,
            args.drop_rate,
            args.latency_ms,
            args.seed,
            log_events=not args.quiet,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            invoice_finalize_delay=(
                None if args.invoice_finalize_delay < 0 else args.invoice_finalize_delay
            ),
            meter_validation=validation,
        )
    except (ValueError, OSError) as exc:
        print(f"stripe-emulator: {exc}", file=sys.stderr)
        return 2
    return 0
