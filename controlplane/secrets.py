"""Secrets in config: either inline, or read from the environment at the moment of use.

    api_key = { env = "STRIPE_API_KEY" }    # recommended
    api_key = "sk_test_..."                 # allowed, for local use

A secret's value never appears in logs, errors or `repr`.
"""

from __future__ import annotations

import os

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
