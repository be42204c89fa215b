"""The audit chain: hash links and signatures; `controlplane audit verify` finds the first
broken or unsigned link, at exactly the record that was tampered with."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane import audit
from controlplane.cli import main
from controlplane.config import AuditConfig, Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from controlplane.flags import FlagChange

HMAC = {"algorithm": "hmac-sha256", "key": "audit-secret"}


@pytest.fixture
def sqlite_config(make_config: Callable[..., Config], tmp_path: Path) -> Callable[..., Config]:
    """Configs on a SQLite file, always: these tests edit the file behind the storage's back."""

    def make(**sections: Any) -> Config:
        storage = {"backend": "sqlite", "path": str(tmp_path / "audit.db")}
        return make_config(storage=storage, **sections)

    return make


async def _changes(cp: ControlPlane, n: int = 4) -> None:
    """`n` audited changes (org updates), one record each."""
    for i in range(n):
        await cp.set_org(f"org{i}", customer=f"cus_{i}", plan="pro", actor="t", reason=f"r{i}")


async def _verify(config: Config) -> tuple[int, audit.Break | None]:
    async with ControlPlane(config) as cp:
        return await cp.verify_audit(page=2)  # small pages: the walk crosses page boundaries


def _db(config: Config) -> sqlite3.Connection:
    return sqlite3.connect(config.storage.path)  # type: ignore[attr-defined]


async def test_signed_chain_verifies_and_an_edit_breaks_it_at_that_record(
    sqlite_config: Callable[..., Config],
) -> None:
    config = sqlite_config(audit=HMAC)
    async with ControlPlane(config) as cp:
        await _changes(cp)
        await cp.set_flags([FlagChange("authority", "controlplane")], actor="t", reason="go")
        records = await cp.storage.audit_chain(0, 100)
    assert len(records) == 5
    assert all(r.signature and r.signature.startswith("hmac-sha256:") for r in records)
    assert await _verify(config) == (5, None)

    with _db(config) as db:
        db.execute("UPDATE audit_log SET reason = 'nothing to see' WHERE id = 3")
    checked, broken = await _verify(config)
    assert (checked, broken) == (2, audit.Break(3, "its content does not match its hash (edited)"))


async def test_a_rewritten_chain_with_recomputed_hashes_fails_on_the_signature(
    sqlite_config: Callable[..., Config],
) -> None:
    config = sqlite_config(audit=HMAC)
    async with ControlPlane(config) as cp:
        await _changes(cp)
        records = await cp.storage.audit_chain(0, 100)
    # Whoever edits record 2 without the key can recompute every hash from there on...
    prev = records[0].hash
    with _db(config) as db:
        for r in records[1:]:
            entry = audit.AuditEntry(
                action=r.action,
                subject=r.subject,
                actor=r.actor,
                reason="forged" if r.id == 2 else r.reason,
                before=r.before,
                after=r.after,
                forced=r.forced,
                group_id=r.group_id,
            )
            digest = audit.record_hash(prev, r.at, entry)
            db.execute(
                "UPDATE audit_log SET reason = ?, prev_hash = ?, hash = ? WHERE id = ?",
                (entry.reason, prev, digest, r.id),
            )
            prev = digest
    # ...so the links hold, but not the signatures.
    unsigned_check = audit.verify(await _chain(config))
    assert unsigned_check is None
    assert (await _verify(config))[1] == audit.Break(2, "bad hmac-sha256 signature")


async def _chain(config: Config) -> list[audit.AuditRecord]:
    async with ControlPlane(config) as cp:
        return await cp.storage.audit_chain(0, 100)


async def test_deleted_record_and_records_written_before_signing(
    sqlite_config: Callable[..., Config],
) -> None:
    unsigned = sqlite_config()
    async with ControlPlane(unsigned) as cp:
        await _changes(cp, 3)
    assert await _verify(unsigned) == (3, None)
    signed = sqlite_config(audit=HMAC)
    assert (await _verify(signed))[1] == audit.Break(1, "unsigned")
    with _db(unsigned) as db:
        db.execute("DELETE FROM audit_log WHERE id = 2")
    assert (await _verify(unsigned))[1] == audit.Break(
        3, "does not link to the record before it (deleted or reordered)"
    )


async def test_signing_switched_on_later_verifies_from_the_first_signed_record(
    sqlite_config: Callable[..., Config],
) -> None:
    unsigned = sqlite_config()
    async with ControlPlane(unsigned) as cp:
        await _changes(cp, 3)
    signed = sqlite_config(audit=HMAC)
    async with ControlPlane(signed) as cp:
        await _changes(cp, 2)  # records 4 and 5, signed

    checked, broken = await _verify(signed)
    assert checked == 0 and broken is not None and broken.id == 1
    assert broken.reason.startswith("unsigned; the first signed record is 4:")
    assert "--signed-from 4" in broken.reason

    async def verify_from(first: int) -> tuple[int, audit.Break | None]:
        async with ControlPlane(signed) as cp:
            return await cp.verify_audit(page=2, signed_from=first)

    assert await verify_from(4) == (5, None)
    assert await verify_from(5) == (5, None)
    assert (await verify_from(3))[1] == audit.Break(3, "unsigned")
    with _db(signed) as db:  # a signature stripped after signing began
        db.execute("UPDATE audit_log SET signature = NULL WHERE id = 5")
    assert (await verify_from(4))[1] == audit.Break(5, "unsigned")
    with _db(signed) as db:  # before it, a signature that is present is still checked
        db.execute("UPDATE audit_log SET signature = 'hmac-sha256:00' WHERE id = 2")
    assert (await verify_from(4))[1] == audit.Break(2, "bad hmac-sha256 signature")


async def test_ed25519_signs_with_the_private_key_and_verifies_with_the_public_one(
    make_config: Callable[..., Config],
) -> None:
    private, public = audit.new_ed25519_key()
    config = make_config(audit={"algorithm": "ed25519", "key": private, "public_key": public})
    async with ControlPlane(config) as cp:
        await _changes(cp, 2)
    auditor = make_config(audit={"algorithm": "ed25519", "public_key": public})
    assert await _verify(auditor) == (2, None)
    _, stranger = audit.new_ed25519_key()
    wrong = make_config(audit={"algorithm": "ed25519", "public_key": stranger})
    assert (await _verify(wrong))[1] == audit.Break(1, "bad ed25519 signature")
    keys = audit.keys(AuditConfig(algorithm="ed25519", public_key=public))
    assert keys is not None and keys.sign is None  # a public key cannot sign


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm": "ed25519", "key": "abcd"}, "audit.key: expected 64 hex digits"),
        ({"algorithm": "hmac-sha256", "public_key": "00" * 32}, "audit.key: hmac-sha256 needs"),
    ],
)
def test_bad_keys_name_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        audit.keys(AuditConfig(**settings))


def test_ed25519_public_key_must_match_the_private_key() -> None:
    private, _ = audit.new_ed25519_key()
    _, other = audit.new_ed25519_key()
    with pytest.raises(ConfigError, match="does not belong"):
        audit.keys(AuditConfig(algorithm="ed25519", key=private, public_key=other))


def test_cli_audit_verify_reports_the_first_broken_record(
    sqlite_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = sqlite_config(audit=HMAC)

    async def setup() -> None:
        async with ControlPlane(config) as cp:
            await _changes(cp, 3)

    asyncio.run(setup())
    toml = tmp_path / "cp.toml"
    toml.write_text(
        f'[storage]\nbackend = "sqlite"\npath = "{config.storage.path}"\n'  # type: ignore[attr-defined]
        '[audit]\nalgorithm = "hmac-sha256"\nkey = { env = "CP_TEST_AUDIT_KEY" }\n'
    )
    env = pytest.MonkeyPatch()
    env.setenv("CP_TEST_AUDIT_KEY", HMAC["key"])
    try:
        assert main(["audit", "verify", "--config", str(toml)]) == 0
        assert "audit chain intact: 3 records (all signed)" in capsys.readouterr().out
        with _db(config) as db:
            db.execute("UPDATE audit_log SET actor = 'someone else' WHERE id = 2")
        assert main(["audit", "verify", "--config", str(toml)]) == 1
        out = capsys.readouterr().out
        assert "BROKEN at record 2: its content does not match its hash (edited)" in out
        assert HMAC["key"] not in out
    finally:
        env.undo()


def test_signature_is_over_the_record_hash() -> None:
    keys = audit.keys(AuditConfig(**HMAC))
    assert keys is not None and keys.sign is not None
    digest = hashlib.sha256(b"x").hexdigest()
    algorithm, _, sig = keys.sign(digest).partition(":")
    assert algorithm == "hmac-sha256" and keys.check(digest, sig)
    assert not keys.check(hashlib.sha256(b"y").hexdigest(), sig)


async def test_postgres_chain_edit_is_found_at_that_record(
    make_config: Callable[..., Config], postgres_dsn: str
) -> None:
    import asyncpg

    from tests.harness import fresh_database

    dsn = fresh_database(postgres_dsn)
    config = make_config(storage={"backend": "postgres", "dsn": dsn}, audit=HMAC)
    async with ControlPlane(config) as cp:
        await _changes(cp, 4)
    assert await _verify(config) == (4, None)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute('UPDATE audit_log SET after = \'{"customer": "cus_x"}\' WHERE id = 4')
    finally:
        await conn.close()
    assert await _verify(config) == (
        3,
        audit.Break(4, "its content does not match its hash (edited)"),
    )
