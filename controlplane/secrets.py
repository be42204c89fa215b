"""Secrets in config: either inline, or read from the environment at the moment of use.

    api_key = { env = "STRIPE_API_KEY" }    # recommended
    api_key = "sk_test_..."                 # allowed, for local use

A secret's value never appears in logs, errors or `repr`.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import msgspec

from controlplane.errors import ConfigError


class EnvSecret(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    env: str

    def __repr__(self) -> str:
        return f"EnvSecret(env={self.env!r})"


Secret = str | EnvSecret


def reveal(secret: Secret, setting: str) -> str:
    """The secret's value; `setting` names it in the error when the variable is unset."""
    if isinstance(secret, str):
        return secret
    value = os.environ.get(secret.env)
    if not value:
        raise ConfigError(f"{setting}: environment variable {secret.env} is not set")
    return value


_URL_HINT = (
    "percent-encode reserved characters in the user name and password "
    "('/' as %2F, '#' as %23, '@' as %40, ':' as %3A)"
)


def check_url(url: str, setting: str) -> None:
    """Refuse a URL (a DSN) that does not parse, without repeating it: it may hold a password.

    Drivers parse it too, but their errors quote the piece they could not read, which for a
    password holding '/' or '#' is part of the password. Several hosts (`h1:5432,h2:5433`),
    IPv6 hosts and sockets given as a query parameter are valid."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{setting}: not a valid URL; {_URL_HINT}") from None
    if parts.fragment:
        raise ConfigError(f"{setting}: a '#' ends the URL early; {_URL_HINT}")
    if "@" in parts.path:  # a '/' in the password ended the host part early
        raise ConfigError(f"{setting}: an '@' after the host part; {_URL_HINT}")
    for host in parts.netloc.rpartition("@")[2].split(","):
        after_host = host.rpartition("]")[2] if host.startswith("[") else host
        port = after_host.partition(":")[2]
        if port and not port.isdigit():  # no port after ':': part of a password
            raise ConfigError(f"{setting}: not a valid URL; {_URL_HINT}")
