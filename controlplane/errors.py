"""The control plane's errors, all under one root.

::

    ControlPlaneError
    ├── ConfigError (ValueError)          a setting is missing, misspelled or of the wrong type
    │   └── MissingExtraError (ImportError-like)  a plugin's optional driver is not installed
    ├── InvalidInput (ValueError)         a request or batch was refused; nothing was changed
    │   ├── Undecodable                   its body is no JSON that can be decoded safely
    │   ├── BadValue                      a value is none the field takes (a plan, a time)
    │   └── UnsupportedMediaType          a body of a content type the endpoint does not read
    ├── NotFound (LookupError)            the thing asked for does not exist
    ├── FlagRefused (ValueError)          a flag change broke a rule; no flag was changed
    ├── HandBackBusy                      another rollback is handing back: run it again later
    ├── StorageError                      the storage plugin failed
    │   ├── TransientStorageError         the same call may succeed when retried
    │   ├── MigrationError                the schema and the code disagree
    │   └── NoDatabase                    a read-only command found no database to read
    └── BillingError                      the billing provider failed unclassifiably
        └── BillingUnanswered             no definite answer: the call may have been applied

Each error's docstring is its default message.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


class ControlPlaneError(Exception):
    """The control plane failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(ControlPlaneError, ValueError):
    """The configuration is invalid."""


class MissingExtraError(ConfigError):
    """A plugin needs an optional dependency that is not installed."""

    def __init__(self, plugin: str, module: str, extra: str) -> None:
        super().__init__(
            f"plugin {plugin!r} needs the {module!r} package: "
            f"install it with `pip install 'controlplane[{extra}]'`"
        )


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with an input: where (`field`, and `index` within a batch) and why."""

    field: str
    message: str
    index: int | None = None


class InvalidInput(ControlPlaneError, ValueError):
    """The input is invalid; nothing was changed."""

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(field="", message=problems)]
        self.problems = list(problems)
        first = self.problems[0]
        where = (f"[{first.index}]" if first.index is not None else "") + (
            f".{first.field}" if first.index is not None and first.field else first.field
        )
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"{where}: {first.message}{more}" if where else first.message + more)


class Undecodable(InvalidInput):
    """The body cannot be decoded: malformed JSON, not UTF-8, or nested too deeply."""


class BadValue(InvalidInput):
    """A value is none the field takes (an unknown plan, a malformed time); nothing was
    changed."""


class UnsupportedMediaType(InvalidInput):
    """The body's content type is not one the endpoint reads; nothing was changed."""


class NotFound(ControlPlaneError, LookupError):
    """Not found."""


class FlagRefused(ControlPlaneError, ValueError):
    """The flag change was refused; no flag was changed."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {message}")


class HandBackBusy(ControlPlaneError):
    """Another rollback is handing back what the provider holds; nothing was changed: run
    this one again once that one ended (its hold lapses by itself if its process died)."""


class ReleaseRefused(ControlPlaneError, ValueError):
    """The held rows cannot be released yet; nothing was changed."""


class StorageError(ControlPlaneError):
    """The storage backend failed."""


class TransientStorageError(StorageError):
    """The storage backend failed in a way that may pass on retry."""


class MigrationError(StorageError):
    """The database schema does not match this version of the control plane."""


class NoDatabase(StorageError):
    """There is no database to read: check --config, or run `controlplane migrate`."""


class BillingError(ControlPlaneError):
    """The billing provider failed."""


class BillingUnanswered(BillingError):
    """The billing provider gave no definite answer: the call may or may not have been
    applied."""
