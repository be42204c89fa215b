"""Bearer tokens with scopes. Tokens are stored as their SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from controlplane.config import SCOPES, AuthConfig, Scope
from controlplane.errors import InvalidInput, Problem
from controlplane.secrets import reveal

TOKEN_PREFIX = "cp_"


class Principal(msgspec.Struct, frozen=True):
    name: str
    scopes: frozenset[str]


class Unauthorized(Exception):
    """Missing or unknown bearer token (401)."""


class Forbidden(Exception):
    """The token lacks the scope this call needs (403)."""


def digest(token: str) -> str:
    # surrogatepass: whatever a header decoded to hashes (and matches nothing), never raises
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    def __init__(self, config: AuthConfig) -> None:
        self._tokens = [
            (
                reveal(t.sha256, f"auth.tokens[{i}].sha256").strip().lower(),
                t.name,
                frozenset(t.scopes),
            )
            for i, t in enumerate(config.tokens)
        ]

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("send Authorization: Bearer <token>")
        presented = digest(authorization[7:].strip())
        match: Principal | None = None
        for stored, name, scopes in self._tokens:  # compare with every token: no timing hint
            if hmac.compare_digest(stored, presented):
                match = Principal(name=name, scopes=scopes)
        if match is None:
            raise Unauthorized("unknown token")
        return match

    def authorize(self, authorization: str | None, scope: Scope) -> Principal:
        principal = self.authenticate(authorization)
        if scope not in principal.scopes:
            raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope")
        return principal


def create_token(name: str, scopes: list[str]) -> tuple[str, str]:
    """A new random token and the config lines that accept it (only its hash is stored)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise InvalidInput(
            [Problem(field="scopes", message=f"unknown {unknown}; known: {list(SCOPES)}")]
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    scope_list = ", ".join(f'"{s}"' for s in scopes)
    lines = (
        f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{digest(token)}"\nscopes = [{scope_list}]\n'
    )
    return token, lines
