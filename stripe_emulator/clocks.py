"""Test clocks over the API: ``POST /v1/test_helpers/test_clocks``, ``GET
/v1/test_helpers/test_clocks/{id}``, ``POST /v1/test_helpers/test_clocks/{id}/advance``.

Stripe's test clocks (TC-1 to TC-7 in ``docs/reference/stripe-behaviour.md``) move the time of
the objects attached to them. The emulator has one clock for the whole account, so every test
clock is a view of it: creating one with ``frozen_time`` (required, TC-2) ahead of the
emulator's time moves the clock there, one behind it is refused (the clock only moves
forward); ``advance`` takes a ``frozen_time`` after the current one (TC-4) and runs everything
that falls due on the way, in order (subscription renewals, automatic finalizations, payment
retries, incomplete expiries, Checkout expiries; TC-7). Advancing is finished when the answer
comes, so the status is ``ready`` (TC-5).
"""

from __future__ import annotations

from stripe_emulator.errors import Json, invalid, no_such
from stripe_emulator.params import ApiRequest, int_param, only_params, str_param
from stripe_emulator.records import DAY
from stripe_emulator.state import EmulatorState

DELETES_AFTER_SECONDS = 30 * DAY


class ClocksMixin(EmulatorState):
    """Test clocks, all views of the emulator's one clock."""

    test_clocks: dict[str, Json]

    def reset(self) -> None:
        super().reset()
        self.test_clocks = {}

    def create_test_clock(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"frozen_time", "name"}))
        frozen = int_param(params, "frozen_time", required=True)
        assert frozen is not None
        name = str_param(params, "name", max_length=300) or None
        now = int(self.now())
        if frozen < now:
            raise invalid(
                "frozen_time",
                f"The Stripe emulator has one clock, which only moves forward: frozen_time must "
                f"be at or after its current time ({now}).",
            )
        self.advance(max(0.0, frozen - self.now()))
        clock: Json = {
            "id": self._new_id("clock", 24),
            "object": "test_helpers.test_clock",
            "created": now,
            "deletes_after": now + DELETES_AFTER_SECONDS,
            "frozen_time": frozen,
            "livemode": False,
            "name": name,
            "status": "ready",
            "status_details": {},
        }
        self.test_clocks[clock["id"]] = clock
        return clock

    def retrieve_test_clock(self, request: ApiRequest) -> Json:
        clock = self._test_clock(request.args["id"])
        clock["frozen_time"] = int(self.now())
        return clock

    def advance_test_clock(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"frozen_time"}))
        clock = self._test_clock(request.args["id"])
        frozen = int_param(params, "frozen_time", required=True)
        assert frozen is not None
        now = int(self.now())
        if frozen <= now:
            raise invalid(
                "frozen_time",
                f"The frozen time must be after the current frozen time of the clock ({now}).",
            )
        self.advance(max(0.0, frozen - self.now()))
        clock.update(frozen_time=frozen, status="ready")
        return clock

    def _test_clock(self, ident: str) -> Json:
        clock = self.test_clocks.get(ident)
        if clock is None:
            raise no_such("test_helpers.test_clock", ident, "test_clock", status=404)
        return clock
