"""Capability tokens: signed statements of an org's plan that services check offline.

A token is a JWT (RFC 7519) signed with Ed25519 (``alg: EdDSA``, RFC 8037) by PyJWT, a
well-kept library that verifies the algorithm against the key type (so ``alg: none`` and
HS256 signed with the public key as secret are refused), publishes keys as JWKs, and is what
services in most languages already read. Claims:

==========  ==================================================================
``iss``     ``[capabilities] issuer``
``aud``     ``[capabilities] audience``
``sub``     the org
``plan``    the org's plan when issued (one of ``[[plans]]``)
``ent``     the plan's entitlements (``[[plans]] entitlements``)
``iat``     issued at; ``nbf`` not before (the same); ``exp`` expiry (unix seconds)
``jti``     a random id
==========  ==================================================================

The header's ``kid`` names the key. The first ``[[capabilities.keys]]`` entry signs; every
listed key verifies and is published at ``/.well-known/jwks.json``, so a key rotated out of
first place keeps verifying its tokens until they expire, after which it can be removed.
A token never appears in logs, errors or the audit trail: :func:`digest` stands for it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import OKPAlgorithm

from controlplane.config import CapabilitiesConfig
from controlplane.errors import ConfigError, ControlPlaneError
from controlplane.secrets import reveal

ALGORITHM = "EdDSA"


class Refused(ControlPlaneError):
    """The capability token is not valid."""


class Claims(msgspec.Struct, frozen=True):
    """A verified token's claims."""

    org: str
    plan: str
    entitlements: dict[str, Any]
    issued_at: int
    expires_at: int
    kid: str
    digest: str


class Issued(msgspec.Struct, frozen=True):
    token: str
    kid: str
    org: str
    plan: str
    issued_at: int
    expires_at: int
    digest: str  # what logs and the audit trail show instead of the token


def digest(token: str) -> str:
    """A short, non-reversible stand-in for a token (sha256, 16 hex digits)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


class Keys:
    """The configured keys: the first signs, all verify."""

    def __init__(self, config: CapabilitiesConfig) -> None:
        self.config = config
        self._private: dict[str, Ed25519PrivateKey] = {}
        for i, key in enumerate(config.keys):
            where = f"capabilities.keys[{i}].private_key"
            try:
                loaded = load_pem_private_key(reveal(key.private_key, where).encode(), None)
            except (ValueError, TypeError):
                raise ConfigError(f"{where}: not a PEM private key") from None
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ConfigError(f"{where}: an Ed25519 key is required")
            if key.kid in self._private:
                raise ConfigError(f"capabilities.keys[{i}].kid: {key.kid!r} is listed twice")
            self._private[key.kid] = loaded
        self.public: dict[str, Ed25519PublicKey] = {
            kid: k.public_key() for kid, k in self._private.items()
        }

    @property
    def signing_kid(self) -> str:
        if not self.config.keys:
            raise ConfigError("capabilities.keys: no signing key configured")
        return self.config.keys[0].kid

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The public keys as a JWK Set (RFC 7517), for offline verification."""
        out = []
        for kid, key in self.public.items():
            jwk = dict(OKPAlgorithm.to_jwk(key, as_dict=True))
            out.append({**jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"})
        return {"keys": out}

    def issue(self, org: str, plan: str, entitlements: Mapping[str, Any], now: int) -> Issued:
        kid = self.signing_kid
        exp = now + self.config.lifetime_seconds
        claims = {
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "sub": org,
            "plan": plan,
            "ent": dict(entitlements),
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": secrets.token_hex(8),
        }
        token = jwt.encode(claims, self._private[kid], algorithm=ALGORITHM, headers={"kid": kid})
        return Issued(token, kid, org, plan, now, exp, digest(token))

    def verify(self, token: str, *, org: str | None, at: int) -> Claims:
        """The token's claims, when it is signed by a listed key, for this audience and
        issuer, for `org` (when given), and valid at `at` (unix seconds) give or take
        ``max_skew_seconds``. Raises Refused with the reason; the token is never quoted."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Refused("capability token: malformed (not a signed JWT)") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM:
            raise Refused(f"capability token: algorithm {str(header.get('alg'))[:20]!r} refused")
        if not isinstance(kid, str) or kid not in self.public:
            raise Refused(f"capability token: unknown key id {str(kid)[:40]!r}")
        key = self.public[kid]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.config.audience,
                issuer=self.config.issuer,
                options={
                    "require": ["exp", "iat", "nbf", "sub", "aud", "iss"],
                    "verify_exp": False,  # checked at `at` (an event's time), below
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Refused("capability token: signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise Refused("capability token: wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Refused("capability token: wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Refused(f"capability token: no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise Refused(f"capability token: invalid ({type(exc).__name__})") from None
        return self._checked(claims, kid, token, org=org, at=at)

    def _checked(
        self, claims: dict[str, Any], kid: str, token: str, *, org: str | None, at: int
    ) -> Claims:
        skew = self.config.max_skew_seconds
        times = [claims.get(k) for k in ("exp", "nbf", "iat")]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in times):
            raise Refused("capability token: exp, nbf and iat must be integers")
        exp, nbf, iat = (int(t) for t in times)  # type: ignore[arg-type]
        if at > exp + skew:
            raise Refused(f"capability token: expired at {exp}, used at {at}")
        if at < nbf - skew:
            raise Refused(f"capability token: not valid before {nbf}, used at {at}")
        sub, plan, ent = claims.get("sub"), claims.get("plan"), claims.get("ent", {})
        if not isinstance(sub, str) or not isinstance(plan, str) or not isinstance(ent, dict):
            raise Refused("capability token: sub and plan must be strings, ent an object")
        if org is not None and sub != org:
            raise Refused("capability token: issued for another org")
        return Claims(sub, plan, ent, iat, exp, kid, digest(token))
