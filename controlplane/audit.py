"""The audit trail: append-only, hash-chained, signed records of every money-moving change.

Each record's hash covers its content and the previous record's hash, so editing or deleting
any record breaks every link after it. With a key in `[audit]`, each hash is also signed
(HMAC-SHA256 with a shared secret, or Ed25519, whose public key alone can verify), so a chain
rewritten from the edited record on, hashes recomputed, is still caught. :class:`Verifier`
walks the chain and names the first broken or unsigned link.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from controlplane.config import AuditConfig
from controlplane.errors import ConfigError
from controlplane.interfaces import AuditEntry, AuditRecord
from controlplane.registry import require
from controlplane.secrets import reveal

GENESIS = "0" * 64
UNSIGNED = "unsigned"  # the reason a record without a signature breaks a signed chain
_encoder = msgspec.json.Encoder(order="sorted")
_json = msgspec.json.Encoder()

Sign = Callable[[str], str]
"""Signs a record hash; the signature names its algorithm: ``"hmac-sha256:<hex>"``."""


def record_hash(prev_hash: str, at: int, entry: AuditEntry) -> str:
    """The chained hash of one record."""
    body: dict[str, Any] = {
        "prev": prev_hash,
        "at": at,
        "action": entry.action,
        "subject": entry.subject,
        "actor": entry.actor,
        "reason": entry.reason,
        "before": entry.before,
        "after": entry.after,
        "forced": entry.forced,
        "group_id": entry.group_id,
    }
    return hashlib.sha256(_encoder.encode(body)).hexdigest()


AuditRow = tuple[
    int, str, str, str, str | None, str | None, str | None, bool, str | None, str, str, str | None
]


def chain_rows(
    prev: str, at: int, entries: Sequence[AuditEntry], sign: Sign | None
) -> list[AuditRow]:
    """The rows to append after the record whose hash is `prev`: (at, action, subject, actor,
    reason, before JSON, after JSON, forced, group id, prev hash, hash, signature)."""
    rows: list[AuditRow] = []
    for e in entries:
        digest = record_hash(prev, at, e)
        rows.append(
            (
                at,
                e.action,
                e.subject,
                e.actor,
                e.reason,
                None if e.before is None else _json.encode(e.before).decode(),
                None if e.after is None else _json.encode(e.after).decode(),
                e.forced,
                e.group_id,
                prev,
                digest,
                sign(digest) if sign else None,
            )
        )
        prev = digest
    return rows


# signing ----------------------------------------------------------------------------------


class Keys(msgspec.Struct, frozen=True):
    """What `[audit]` yields: a signer (when a private key or secret is set) and a checker."""

    algorithm: str
    sign: Sign | None
    check: Callable[[str, str], bool]  # (hash, signature without prefix) -> valid?


def keys(config: AuditConfig) -> Keys | None:
    """The configured keys, or None when the audit chain is not signed."""
    if config.key is None and config.public_key is None:
        return None
    if config.algorithm == "hmac-sha256":
        if config.key is None:
            raise ConfigError("audit.key: hmac-sha256 needs the shared secret")
        secret = reveal(config.key, "audit.key").encode()

        def mac(digest: str) -> str:
            return hmac.new(secret, digest.encode(), hashlib.sha256).hexdigest()

        return Keys(
            algorithm="hmac-sha256",
            sign=lambda digest: f"hmac-sha256:{mac(digest)}",
            check=lambda digest, sig: hmac.compare_digest(mac(digest), sig),
        )
    ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "audit", "signing")
    exceptions = require("cryptography.exceptions", "audit", "signing")
    private = None
    if config.key is not None:
        private = ed.Ed25519PrivateKey.from_private_bytes(
            _hex32(reveal(config.key, "audit.key"), "audit.key")
        )
        public = private.public_key()
        if config.public_key is not None and public.public_bytes_raw() != _hex32(
            config.public_key, "audit.public_key"
        ):
            raise ConfigError("audit.public_key: does not belong to audit.key")
    else:
        assert config.public_key is not None
        public = ed.Ed25519PublicKey.from_public_bytes(
            _hex32(config.public_key, "audit.public_key")
        )

    def check(digest: str, sig: str) -> bool:
        try:
            public.verify(bytes.fromhex(sig), digest.encode())
        except (exceptions.InvalidSignature, ValueError):
            return False
        return True

    if private is None:
        return Keys(algorithm="ed25519", sign=None, check=check)
    signer = private

    def sign(digest: str) -> str:
        return f"ed25519:{signer.sign(digest.encode()).hex()}"

    return Keys(algorithm="ed25519", sign=sign, check=check)


def _hex32(text: str, setting: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{setting}: expected 64 hex digits (32 bytes)")
    return raw


def new_ed25519_key() -> tuple[str, str]:
    """A fresh Ed25519 key pair as hex: (private seed, public key)."""
    ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "audit", "signing")
    private = ed.Ed25519PrivateKey.generate()
    return private.private_bytes_raw().hex(), private.public_key().public_bytes_raw().hex()


# verifying --------------------------------------------------------------------------------


class Break(msgspec.Struct, frozen=True):
    """The first record whose link does not hold, and why."""

    id: int
    reason: str


class Verifier:
    """Walks a chain oldest first, one record at a time (a chain can be long)."""

    def __init__(self, keys: Keys | None = None, signed_from: int | None = None) -> None:
        self.keys = keys
        self.signed_from = signed_from  # records before it may be unsigned
        self.prev = GENESIS
        self.checked = 0

    def feed(self, rec: AuditRecord) -> Break | None:
        entry = AuditEntry(
            action=rec.action,
            subject=rec.subject,
            actor=rec.actor,
            reason=rec.reason,
            before=rec.before,
            after=rec.after,
            forced=rec.forced,
            group_id=rec.group_id,
        )
        if rec.prev_hash != self.prev:
            return Break(rec.id, "does not link to the record before it (deleted or reordered)")
        if rec.hash != record_hash(self.prev, rec.at, entry):
            return Break(rec.id, "its content does not match its hash (edited)")
        if self.keys is not None and rec.signature:
            algorithm, _, sig = rec.signature.partition(":")
            if algorithm != self.keys.algorithm or not self.keys.check(rec.hash, sig):
                return Break(rec.id, f"bad {algorithm or 'unknown'} signature")
        elif self.keys is not None and (self.signed_from is None or rec.id >= self.signed_from):
            return Break(rec.id, UNSIGNED)
        self.prev = rec.hash
        self.checked += 1
        return None


def verify(
    records: Iterable[AuditRecord], keys: Keys | None = None, signed_from: int | None = None
) -> Break | None:
    """The first broken (or, with `keys`, unsigned or badly signed) link, or None."""
    verifier = Verifier(keys, signed_from)
    for rec in records:
        broken = verifier.feed(rec)
        if broken:
            return broken
    return None
