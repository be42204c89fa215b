"""Schema migrations: `<backend>/NNNN_name.sql` beside this file (package data, read through
`importlib.resources`), applied in order, each recorded.

Each file is applied in its own transaction and recorded with its SHA-256. The runner refuses
to go on when the database has a migration this code does not know (a newer schema) or when an
applied file has changed since.

One runner serves every backend (:func:`migrate`, :func:`status`): a backend gives a
:class:`Session`, its dialect's part (the bookkeeping table, how a file's statements run in one
transaction, which driver errors mean a statement failed).
"""

from __future__ import annotations

import abc
import hashlib
import re
import time
from importlib.resources import files
from importlib.resources.abc import Traversable

import msgspec

from controlplane.errors import MigrationError

MIGRATIONS_ROOT: Traversable = files(__name__)
NAME_PATTERN = re.compile(r"^(?P<number>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


class Migration(msgspec.Struct, frozen=True):
    name: str  # file stem, e.g. "0001_initial"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available(backend: str) -> list[Migration]:
    """The backend's migration files in order. Raises MigrationError on a misnamed file."""
    folder = MIGRATIONS_ROOT / backend
    found: list[Migration] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.is_file():
            continue
        if not NAME_PATTERN.match(path.name):
            raise MigrationError(f"{path}: migration files are named NNNN_lower_snake.sql")
        found.append(Migration(name=path.name.removesuffix(".sql"), sql=path.read_text()))
    numbers = [int(m.name[:4]) for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise MigrationError(f"{folder}: migration numbers must run 0001, 0002, ... without gaps")
    return found


def pending(known: list[Migration], applied: dict[str, str]) -> list[Migration]:
    """Migrations still to apply, after checking the applied ones against the files.

    `applied` maps name -> checksum as recorded in the database.
    """
    names = {m.name for m in known}
    unknown = sorted(set(applied) - names)
    if unknown:
        raise MigrationError(
            f"the database has migrations this version does not know: {unknown}; "
            "it was migrated by a newer control plane"
        )
    for migration in known:
        recorded = applied.get(migration.name)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(f"migration {migration.name} changed after it was applied")
    return [m for m in known if m.name not in applied]


class Session(abc.ABC):
    """One connection a migration run holds, alone among the processes sharing the store."""

    errors: tuple[type[BaseException], ...] = ()
    """The driver's errors a failed statement raises: the runner reports them as MigrationError."""

    @abc.abstractmethod
    async def applied(self) -> dict[str, str]:
        """Name -> checksum of every applied migration (creating their table when missing)."""

    @abc.abstractmethod
    async def apply(self, migration: Migration, at: int) -> None:
        """Run the migration's statements and record it (name, checksum, `at`), in one
        transaction: all of it, or none of it."""


async def migrate(session: Session, backend: str) -> list[str]:
    """Apply `backend`'s pending migrations in order; return the names applied."""
    done: list[str] = []
    for migration in pending(available(backend), await session.applied()):
        try:
            await session.apply(migration, int(time.time()))
        except session.errors as exc:
            raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
        done.append(migration.name)
    return done


async def status(session: Session, backend: str) -> tuple[list[str], list[str]]:
    """The applied migrations and the pending ones, by name. Raises MigrationError when the
    database and the files disagree."""
    applied = await session.applied()
    return sorted(applied), [m.name for m in pending(available(backend), applied)]
