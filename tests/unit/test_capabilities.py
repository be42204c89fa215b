"""Capability tokens (controlplane/capabilities.py): issued, published and verified offline;
every forged or misused token refused with its reason, and never quoted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from controlplane.capabilities import Keys, Refused
from controlplane.config import CapabilitiesConfig, CapabilityKeyConfig
from controlplane.errors import ConfigError

NOW = 1_767_225_600


def pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


OLD, NEW, STRANGER = (Ed25519PrivateKey.generate() for _ in range(3))


def keys(*pairs: tuple[str, Ed25519PrivateKey], **settings: Any) -> Keys:
    entries = [CapabilityKeyConfig(kid=kid, private_key=pem(k)) for kid, k in pairs]
    return Keys(CapabilitiesConfig(keys=entries, **settings))


KEYS = keys(("2026-12", NEW), ("2026-06", OLD))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "iss": "controlplane",
        "aud": "controlplane",
        "sub": "acme",
        "plan": "pro",
        "ent": {"sandboxes": 10},
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 3600,
    }
    return {**base, **changes}


def test_a_token_states_the_org_plan_and_entitlements_and_verifies() -> None:
    issued = KEYS.issue("acme", "pro", {"sandboxes": 10}, NOW)
    assert (issued.kid, issued.expires_at) == ("2026-12", NOW + 3600)
    got = KEYS.verify(issued.token, org="acme", at=NOW + 10)
    assert (got.org, got.plan, got.entitlements) == ("acme", "pro", {"sandboxes": 10})
    assert got.digest == issued.digest and issued.digest not in issued.token


def test_a_service_verifies_offline_with_the_published_keys() -> None:
    issued = KEYS.issue("acme", "pro", {}, NOW)
    jwks = json.loads(json.dumps(KEYS.jwks()))  # as served
    assert {k["kid"] for k in jwks["keys"]} == {"2026-12", "2026-06"}
    assert all("d" not in k for k in jwks["keys"])  # public halves only
    kid = jwt.get_unverified_header(issued.token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK.from_dict(jwk).key
    decoded = jwt.decode(
        issued.token,
        key,
        algorithms=["EdDSA"],
        audience="controlplane",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert decoded["plan"] == "pro"


def test_a_rotated_key_verifies_its_tokens_until_they_expire() -> None:
    before = keys(("2026-06", OLD)).issue("acme", "pro", {}, NOW)
    assert KEYS.verify(before.token, org="acme", at=NOW + 60).kid == "2026-06"
    with pytest.raises(Refused, match="unknown key id '2026-06'"):
        keys(("2026-12", NEW)).verify(before.token, org="acme", at=NOW + 60)  # retired


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Any) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


PUBLIC_PEM = NEW.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (  # signed by a stranger's key under our key id
            jwt.encode(claims(), STRANGER, algorithm="EdDSA", headers={"kid": "2026-12"}),
            "signature does not verify",
        ),
        (
            jwt.encode(claims(), NEW, algorithm="EdDSA", headers={"kid": "2025-01"}),
            "unknown key id '2025-01'",
        ),
        (
            jwt.encode(claims(exp=NOW - 120), NEW, algorithm="EdDSA", headers={"kid": "2026-12"}),
            f"expired at {NOW - 120}",
        ),
        (
            jwt.encode(claims(nbf=NOW + 600), NEW, algorithm="EdDSA", headers={"kid": "2026-12"}),
            f"not valid before {NOW + 600}",
        ),
        (
            jwt.encode(claims(aud="other"), NEW, algorithm="EdDSA", headers={"kid": "2026-12"}),
            "wrong audience",
        ),
        (
            jwt.encode(claims(iss="evil"), NEW, algorithm="EdDSA", headers={"kid": "2026-12"}),
            "wrong issuer",
        ),
        (
            jwt.encode(claims(sub="globex"), NEW, algorithm="EdDSA", headers={"kid": "2026-12"}),
            "issued for another org",
        ),
        (
            forged({"alg": "none", "kid": "2026-12"}, claims(), lambda _: b""),
            "algorithm 'none' refused",
        ),
        (  # HS256 with the published public key as the HMAC secret
            forged(
                {"alg": "HS256", "kid": "2026-12"},
                claims(),
                lambda data: hmac.new(PUBLIC_PEM, data, hashlib.sha256).digest(),
            ),
            "algorithm 'HS256' refused",
        ),
        (
            jwt.encode(claims(), NEW, algorithm="EdDSA", headers={"kid": "2026-12"})[:-10],
            "signature does not verify",
        ),
        ("not-a-token", "malformed"),
        (
            jwt.encode(
                {k: v for k, v in claims().items() if k != "exp"},
                NEW,
                algorithm="EdDSA",
                headers={"kid": "2026-12"},
            ),
            "no 'exp' claim",
        ),
    ],
    ids=[
        "forged-signature",
        "unknown-kid",
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "another-org",
        "alg-none",
        "hs256-public-key",
        "truncated",
        "garbage",
        "no-exp",
    ],
)
def test_every_bad_token_is_refused_with_its_reason_and_never_quoted(
    token: str, reason: str
) -> None:
    with pytest.raises(Refused) as info:
        KEYS.verify(token, org="acme", at=NOW + 10)
    assert reason in str(info.value)
    assert token not in str(info.value) and token[-20:] not in str(info.value)


def test_skew_is_bounded() -> None:
    issued = KEYS.issue("acme", "pro", {}, NOW)
    assert KEYS.verify(issued.token, org="acme", at=NOW + 3600 + 60).plan == "pro"
    with pytest.raises(Refused, match="expired"):
        KEYS.verify(issued.token, org="acme", at=NOW + 3600 + 61)


def test_keys_must_be_ed25519_pem() -> None:
    with pytest.raises(ConfigError, match=r"capabilities.keys\[0\].private_key: not a PEM"):
        Keys(CapabilitiesConfig(keys=[CapabilityKeyConfig(kid="k", private_key="secret")]))
    with pytest.raises(ConfigError, match="no signing key"):
        Keys(CapabilitiesConfig()).issue("acme", "pro", {}, NOW)
