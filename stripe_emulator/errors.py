"""Stripe's error responses: :class:`EmulatedError` and the messages Stripe words itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Json = dict[str, Any]

MESSAGE_UNKNOWN_ERROR = (
    "Sorry, something went wrong on our end (injected by the Stripe emulator). "
    "Please retry the request."
)
MESSAGE_RATE_LIMIT = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
MESSAGE_LOCK_TIMEOUT = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request. If you see "
    "this error frequently and are making multiple concurrent requests to a single object, make "
    "your requests serially or at a lower rate."
)
MESSAGE_NO_API_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
)


class EmulatedError(Exception):
    """A Stripe error response: status, error type, message, and optional param/code/headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # Stripe's own field name
        param: str | None = None,
        code: str | None = None,
        decline_code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.decline_code = decline_code
        self.headers = tuple(headers)

    def body(self) -> Json:
        error: Json = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        if self.decline_code is not None:
            error["decline_code"] = self.decline_code
        return {"error": error}


def missing(param: str) -> EmulatedError:
    return EmulatedError(
        400, f"Missing required param: {param}.", param=param, code="parameter_missing"
    )


def invalid(param: str, message: str, code: str = "parameter_invalid") -> EmulatedError:
    return EmulatedError(400, message, param=param, code=code)


def no_such(kind: str, ident: str, param: str, status: int = 400) -> EmulatedError:
    return EmulatedError(status, f"No such {kind}: '{ident}'", param=param, code="resource_missing")


def one_of(*names: str) -> EmulatedError:
    return invalid(names[0], f"You may only specify one of these parameters: {', '.join(names)}.")


def card_error(code: str, decline_code: str | None, param: str | None = None) -> EmulatedError:
    """A declined card: HTTP 402 ``card_error`` (the SDK raises ``stripe.CardError``)."""
    message = CARD_MESSAGES.get(code, "Your card was declined.")
    return EmulatedError(
        402, message, type="card_error", code=code, decline_code=decline_code, param=param
    )


CARD_MESSAGES = {
    "card_declined": "Your card was declined.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
}
